"""Judges: score an answer against a reference in [0, 1].

Used by the relevance reward head (RL) and by the clinical-relevance weight builder (curate).
``build_judge(cfg)`` takes ``{kind: overlap | hf | openai, ...}``.
"""

from unveil.judges.base import JUDGES, Judge, OverlapJudge, build_judge

__all__ = ["JUDGES", "Judge", "OverlapJudge", "build_judge"]
