"""What every preference-data builder shares: the run context, outcomes, record writing.

A builder is a small object with ``name``, a ``stats`` counter and ``run(samples, ctx)``
that yields one :class:`Outcome` per record it writes or skips. Outcomes carry Samples whose
image paths are absolute; :func:`to_record` turns them into the native MAU JSONL record
(``unveil.data.adapters.mau_jsonl``) with paths relative to the output directory, so
``data=mau_jsonl data.root=<out_dir>`` reads them straight back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from unveil.data.boxes import IntGridFormat
from unveil.data.frames import IDENTITY
from unveil.data.schema import Rejected, Sample

log = logging.getLogger(__name__)

CANON = IntGridFormat(100)  # box text in record files is on the 0-100 grid
# Fields the MAU adapter reads itself; anything else in a record goes to Sample.meta.
_MAU_KNOWN = {
    "id",
    "image",
    "images",
    "query",
    "answer",
    "boxes",
    "box_units",
    "box_image",
    "findings",
    "task",
    "short_answer",
    "rejected",
    "weight",
}
_META_DROP = {"image_sizes"}  # recomputed by the adapter on read


def stable_int(*parts: Any) -> int:
    """A process-independent 32-bit integer from any parts (Python's hash() is salted per run)."""
    blob = "\x1f".join(str(p) for p in parts)
    return int(hashlib.sha1(blob.encode()).hexdigest()[:8], 16)


def rng_for(seed: int, *parts: Any):
    """A numpy Generator that depends only on the seed and the parts (e.g. the sample id)."""
    import numpy as np

    return np.random.default_rng([int(seed) & 0xFFFFFFFF, stable_int(*parts)])


@dataclass
class Outcome:
    """One result of a builder: a record to write, or the reason an input was skipped."""

    sample: Sample | None = None
    skipped: str | None = None


class NotRepresentable(ValueError):
    """A Sample the single-turn MAU record cannot hold (e.g. a multi-turn dialogue)."""


class ImageStore:
    """Places images under the output directory so records can name them relatively.

    Inputs under the input root keep their relative path; others go to ``external/``.
    Files are hard-linked where possible (no extra disk), else copied. Symlinks are not used:
    the adapters resolve paths and refuse ones that leave the data root.
    """

    def __init__(self, out_dir: str | Path, input_root: str | Path | None, mode: str = "link"):
        if mode not in ("link", "copy"):
            raise ValueError(f"images mode must be 'link' or 'copy', got {mode!r}")
        self.out = Path(out_dir).resolve()
        self.root = Path(input_root).resolve() if input_root is not None else None
        self.mode = mode
        self._done: dict[str, str] = {}

    def rel(self, path: str | Path) -> str:
        """Relative path (under out_dir) of an existing image, placing it there if needed."""
        src = Path(path).resolve()
        key = str(src)
        if key in self._done:
            return self._done[key]
        if src == self.out or self.out in src.parents:
            rel = src.relative_to(self.out).as_posix()  # already in the output (e.g. a noised copy)
        else:
            if self.root is not None and self.root in src.parents:
                rel = src.relative_to(self.root).as_posix()
            else:
                rel = f"external/{stable_int(key):08x}_{src.name}"
            dst = self.out / rel
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                if self.mode == "link":
                    try:
                        os.link(src, dst)
                    except OSError:
                        shutil.copy2(src, dst)
                else:
                    shutil.copy2(src, dst)
        self._done[key] = rel
        return rel

    def new(self, rel: str) -> Path:
        """Absolute path for an image a builder creates (parents made)."""
        p = self.out / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


@dataclass
class Context:
    """What a builder may use: output dir, images, seed, findings vocabulary, a lazy model."""

    out_dir: Path
    images: ImageStore
    seed: int = 0
    input_root: Path | None = None
    findings: list[str] = field(default_factory=list)
    corpus: list[str] = field(default_factory=list)
    model_cfg: Any = None
    cache_dir: str | None = None
    device: str = "auto"  # resolved when the model is built (cuda if available)
    split: str = "train"
    advance: Callable[[int], None] = lambda n: None  # progress bar hook: n input samples consumed
    _backbone: Any = None

    def backbone(self):
        """The model of the ``model`` config group, built once on first use, in eval mode."""
        if self.device == "auto":
            import torch

            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self._backbone is None:
            from unveil.models.factory import build_backbone, built_in_code

            if self.model_cfg is None:
                raise ValueError("this builder needs a model: pass a `model` config")
            if built_in_code(self.model_cfg):
                log.warning(
                    "sampling from an untrained tiny model (model.init_from is unset): "
                    "answers will be noise; use model.init_from=<SFT run> for real data"
                )
            bb = build_backbone(self.model_cfg, peft=None, corpus=self.corpus, cache_dir=self.cache_dir)
            bb.model.to(self.device).eval()
            self._backbone = bb
        return self._backbone

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.out_dir / name
        p.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n")
        return p


def make_judge(spec, where: str = "builder.judge"):
    """A judge from a config (``{_target_: <judge class>, ...}``; None: the offline overlap judge)
    or a ready object with ``score_batch`` (Hydra instantiates a nested ``_target_`` before a
    builder sees it). See :func:`unveil.judges.build_judge`."""
    from unveil.judges import build_judge

    return build_judge(spec, where=where)


def user_query(s: Sample) -> str:
    """The single user turn of a single-turn sample (what the MAU record calls ``query``)."""
    prompt = [m for m in s.prompt_messages if m["role"] != "system"]
    if len(prompt) != 1 or prompt[0]["role"] != "user":
        raise NotRepresentable(f"{s.id}: {len(prompt)} prompt turn(s); the MAU record holds one user turn")
    return prompt[0]["content"]


def rejected_answer(s: Sample) -> str:
    if s.rejected is None or not s.rejected.messages:
        return s.target
    for m in reversed(s.rejected.messages):
        if m["role"] == "assistant":
            return m["content"]
    return s.target


def _json_safe(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if hasattr(v, "item"):
        return _json_safe(v.item())
    return str(v)


def to_record(s: Sample, images: ImageStore) -> dict:
    """A Sample as one MAU JSONL record (image paths relative to the output directory)."""
    rec: dict[str, Any] = {
        "id": s.id,
        "images": [images.rel(p) for p in s.images],
        "query": user_query(s),
        "answer": s.target,
    }
    if s.boxes:
        rec.update(
            boxes=[[float(v) for v in b] for b in s.boxes],
            box_units="normalized",
            box_image=list(s.box_images),
            findings=list(s.findings),
        )
    rec["task"] = s.task
    if s.answer is not None:
        rec["short_answer"] = s.answer
    for k, v in s.meta.items():
        if k not in _MAU_KNOWN and k not in _META_DROP:
            rec[k] = _json_safe(v)
    if s.rejected is not None:
        rj_images = None
        if s.rejected.images is not None:
            rj_images = [images.rel(p) for p in s.rejected.images]
        rec["rejected"] = {"answer": rejected_answer(s), "images": rj_images}
    if s.rejected is not None or s.weight != 1.0:
        w = float(s.weight)
        rec["weight"] = w if math.isfinite(w) else 1.0
    return rec


def with_rejected(
    s: Sample,
    *,
    answer: str | None = None,
    images: list[str] | None = None,
    suffix: str = "",
    weight: float | None = None,
    **meta,
) -> Sample:
    """A copy of a sample with a dispreferred side (answer text and/or images) and extra meta."""
    prompt = s.prompt_messages
    rj_msgs = [*prompt, {"role": "assistant", "content": s.target if answer is None else answer}]
    return Sample(
        id=s.id + suffix,
        images=list(s.images),
        messages=[dict(m) for m in s.messages],
        boxes=[list(b) for b in s.boxes],
        box_images=list(s.box_images),
        findings=list(s.findings),
        task=s.task,
        answer=s.answer,
        rejected=Rejected(messages=rj_msgs, images=images),
        weight=s.weight if weight is None else float(weight),
        meta={**s.meta, **meta},
    )


# --- box text in model output -> the canonical 0-100 grid of record files -------------------


def to_canonical(text: str, box_format, frame=None) -> str:
    """Rewrite a backbone's box text (e.g. Qwen2-VL tokens) into ``[x1, y1, x2, y2]`` on 0-100 of the
    original image (``frame``: where the model saw it, :mod:`unveil.data.frames`)."""
    if box_format is None or (box_format.name == CANON.name and (frame is None or frame.identity)):
        return text
    spans = (frame or IDENTITY).parse_spans(box_format, text)
    if not spans:
        return text
    out, last = [], 0
    for p in spans:
        out.append(text[last : p.start])
        out.append(CANON.format_box(p.box))
        last = p.end
    out.append(text[last:])
    return "".join(out)


def clean_text(text: str) -> str:
    return re.sub(r"\s+", " ", str(text)).strip()


class BaseBuilder:
    """Builders subclass this: ``run`` yields Outcomes; ``stats`` collects extra counts."""

    name = "builder"

    def __init__(self):
        self.stats: Counter = Counter()

    def run(self, samples: list[Sample], ctx: Context) -> Iterator[Outcome]:
        raise NotImplementedError

    def finish(self, ctx: Context, written: list[Sample]) -> None:
        """Called once per split after its records are written (extra files, e.g. LLaVA JSON)."""
