"""Data layer: Sample schema, box contract, format adapters, synthetic generator, datamodule."""

from unveil.data.errors import RecordError
from unveil.data.schema import Rejected, Sample

__all__ = ["RecordError", "Rejected", "Sample"]
