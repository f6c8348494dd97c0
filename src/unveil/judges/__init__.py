"""Judges: score an answer against a reference in [0, 1], with a paper's rubric, looking at the image.

Used by the relevance reward head (RL) and by the curation builders (MMedPO weights, STLLaVA-Med
preferences, hallucination picking). Plugged in with Hydra's ``_target_``
(``judge: {_target_: unveil.judges.openai_compat.OpenAIJudge, model: ..., rubric: ...}``) through
:func:`build_judge`; rubrics in :mod:`unveil.judges.rubrics`.
"""

from unveil.judges.base import Judge, JudgeItem, OverlapJudge, as_item, build_judge
from unveil.judges.rubrics import Rubric, load_rubric

__all__ = ["Judge", "JudgeItem", "OverlapJudge", "Rubric", "as_item", "build_judge", "load_rubric"]
