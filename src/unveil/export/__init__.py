"""Export a finished run as a plain Hugging Face model directory: ``python -m unveil.export <run dir> <out dir>``.

- merged (default): the run's ``backbone/`` (``save_pretrained`` model + processor, LoRA already
  merged by :meth:`unveil.models.factory.Backbone.save`), loadable with ``from_pretrained``;
- ``--adapter-only`` (runs trained with ``peft=lora``): the LoRA adapter of ``checkpoints/last.ckpt``
  as PEFT writes it (``adapter_config.json``, ``adapter_model.safetensors``) and the processor,
  pointing at the base the run trained on (``model.init_from`` or ``model.name_or_path``), checked
  against the fingerprint of that base the checkpoint holds.

Both get a model card (``README.md``): how the run was trained (the command, stage, model, LoRA),
its data, its metrics table and its resolved config.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from unveil.export.card import MARK, model_card
from unveil.export.weights import copy_merged, write_adapter


def export_run(run_dir: str | Path, out_dir: str | Path, adapter_only: bool = False, force: bool = False) -> Path:
    """Write the export of ``run_dir`` into ``out_dir`` (which must not exist or be empty, unless
    ``force``) and return ``out_dir``."""
    from unveil.report.collect import read_run

    run = read_run(Path(run_dir))  # the run's metrics, config and overrides (an error if unfinished)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        earlier = (out / "README.md").exists() and MARK in (out / "README.md").read_text(encoding="utf-8")
        if not (force and earlier):  # --force replaces an earlier export only, never another folder
            raise FileExistsError(
                f"{out}: exists and is not empty; choose another directory"
                + (" or pass --force to replace this earlier export" if earlier else "")
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    base = write_adapter(run, out) if adapter_only else copy_merged(run, out)
    (out / "README.md").write_text(model_card(run, out, base=base, adapter_only=adapter_only), encoding="utf-8")
    return out


__all__ = ["export_run"]
