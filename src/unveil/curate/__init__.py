"""Preference-data builders (docs/methods.md#mmedpo, #stllava-med): ``python -m unveil.curate builder=...``.

- :mod:`~unveil.curate.hallucination`: text pairs (sampled + judged, or rule-written hallucinations)
- :mod:`~unveil.curate.lesion_noise`: visual pairs (lesion region noised, local or global)
- :mod:`~unveil.curate.relevance_weights`: clinical-relevance weights (judge agreement, visual scorer)
- :mod:`~unveil.curate.self_training`: STLLaVA-Med self-questioning pairs and virtual-user dialogues
- :mod:`~unveil.curate.mmedpo`: text + visual pairs, weighted, in one pass

Each builder writes native MAU JSONL (``rejected`` + ``weight``) that ``data=mau_jsonl`` reads back.
"""

from unveil.curate.common import BaseBuilder, Context, ImageStore, Outcome, to_record

__all__ = ["BaseBuilder", "Context", "ImageStore", "Outcome", "to_record"]
