"""Generate the synthetic abnormality data set as MAU-style JSONL + PNG files.

It writes exactly what :mod:`unveil.data.adapters.mau_jsonl` reads, so the real loading path
is exercised on every run. Deterministic per seed; splits by patient id.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image
from tqdm.auto import tqdm

from unveil.data.synthetic import anatomy, lesions, text

log = logging.getLogger(__name__)

# Bumped whenever the same config renders different data, so cached sets are rebuilt.
GENERATOR_VERSION = 2


@dataclass
class SyntheticConfig:
    n_patients: int = 900
    studies_per_patient: tuple[int, int] = (1, 3)  # inclusive range
    image_size: int = 128
    modalities: list[str] = field(default_factory=lambda: ["ct", "xray", "fundus"])
    findings: list[str] = field(default_factory=lambda: list(lesions.FINDINGS))
    p_normal: float = 0.3
    max_lesions: int = 2
    p_multi: float = 0.2  # share of abnormal studies with more than one lesion
    val_fraction: float = 0.1
    test_fraction: float = 0.15
    closed_questions: bool = True
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


def _place(rng, zone: np.ndarray, r: float, taken: list[tuple[float, float, float]]):
    """Pick a centre inside the zone, with the lesion fully in the image and apart from others."""
    size = zone.shape[0]
    ys, xs = np.nonzero(zone)
    for _ in range(200):
        i = int(rng.integers(len(xs)))
        cx, cy = (xs[i] + 0.5) / size, (ys[i] + 0.5) / size
        if not (r < cx < 1 - r and r < cy < 1 - r):
            continue
        if all((cx - ox) ** 2 + (cy - oy) ** 2 > (r + orr + 0.03) ** 2 for ox, oy, orr in taken):
            return cx, cy
    return None


def render_study(cfg: SyntheticConfig, rng: np.random.Generator, modality: str, n_lesions: int):
    """One image with 0..k lesions; returns (uint8 image, boxes, findings)."""
    img, zone = anatomy.MODALITIES[modality](rng, cfg.image_size)
    img = img.copy()
    boxes, findings, taken = [], [], []
    for _ in range(n_lesions):
        kind = cfg.findings[int(rng.integers(len(cfg.findings)))]
        lo, hi = lesions.FINDINGS[kind]
        r = float(rng.uniform(lo, hi))
        c = _place(rng, zone, r, taken)
        if c is None:
            continue
        mask = lesions.draw(rng, img, kind, c[0], c[1], r)
        taken.append((c[0], c[1], r))
        boxes.append([round(v, 5) for v in lesions.mask_box(mask)])
        findings.append(kind)
    # reading order (left to right), so "the first box" means the same thing in every answer
    order = sorted(range(len(boxes)), key=lambda k: (boxes[k][0], boxes[k][1]))
    boxes, findings = [boxes[k] for k in order], [findings[k] for k in order]
    img = np.clip(img + rng.normal(0, 0.02, img.shape), 0, 1)  # acquisition noise
    arr = (img * 255).astype(np.uint8)
    return arr, boxes, findings


def _records(cfg, rng, pid: str, sid: str, rel: str, modality: str, boxes, findings) -> list[dict]:
    mod = anatomy.MODALITY_NAMES[modality]
    base = {"images": [rel], "modality": modality, "source": "synthetic", "patient_id": pid, "study_id": sid}
    recs = [
        {
            **base,
            "id": f"{sid}-loc",
            "task": "localize",
            "query": text.pick(rng, text.LOCALIZE_QUERIES, mod=mod),
            "answer": text.localize_answer(boxes, findings),
            "boxes": boxes,
            "box_units": "normalized",
            "findings": findings,
        }
    ]
    if cfg.closed_questions:
        yn = "yes" if boxes else "no"
        recs.append(
            {
                **base,
                "id": f"{sid}-presence",
                "task": "vqa_closed",
                "query": text.pick(rng, text.PRESENCE_QUERIES, mod=mod),
                "answer": yn,
                "short_answer": yn,
                "boxes": boxes,
                "box_units": "normalized",
                "findings": findings,
            }
        )
        if boxes:
            kind = findings[0]
            recs.append(
                {
                    **base,
                    "id": f"{sid}-type",
                    "task": "vqa_closed",
                    "query": text.pick(rng, text.TYPE_QUERIES, choices=", ".join(cfg.findings)),
                    "answer": kind,
                    "short_answer": kind,
                    "boxes": boxes,
                    "box_units": "normalized",
                    "findings": findings,
                }
            )
    return recs


def generate(cfg: SyntheticConfig, out_dir: str | Path, progress: bool = True) -> Path:
    """Write ``images/``, ``{train,val,test}.jsonl`` and ``info.json`` under out_dir.

    Skips the work when out_dir already holds a finished set with the same fingerprint.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # runs of a sweep may start on one set at once: one writes it, the others wait, then reuse it
    with FileLock(str(out) + ".lock"):
        return _generate(cfg, out, progress)


def _generate(cfg: SyntheticConfig, out: Path, progress: bool = True) -> Path:
    done = out / "info.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == cfg.fingerprint():
        return out
    if not done.exists() and any(out.glob("*.jsonl")):
        # Never overwrite someone's real data: e.g. `data=mau_jsonl` combined with a synthetic override.
        raise FileExistsError(
            f"{out} holds JSONL files that the synthetic generator did not write; "
            "refusing to generate into it (set data.synthetic=null to read them instead)"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg.seed)
    split_rng = np.random.default_rng([cfg.seed, 1])
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    counts = {"normal": 0, "abnormal": 0}
    lo, hi = cfg.studies_per_patient
    for p in tqdm(range(cfg.n_patients), desc="synthetic data", disable=not progress):
        pid = f"p{p:05d}"
        u = split_rng.uniform()
        split = "test" if u < cfg.test_fraction else "val" if u < cfg.test_fraction + cfg.val_fraction else "train"
        modality = cfg.modalities[int(rng.integers(len(cfg.modalities)))]  # a patient keeps one modality
        for s in range(int(rng.integers(lo, hi + 1))):
            sid = f"{pid}_s{s}"
            if rng.uniform() < cfg.p_normal:
                n = 0
            else:
                n = (
                    1
                    if cfg.max_lesions < 2 or rng.uniform() >= cfg.p_multi
                    else int(rng.integers(2, cfg.max_lesions + 1))
                )
            arr, boxes, findings = render_study(cfg, rng, modality, n)
            rel = f"images/{sid}.png"
            Image.fromarray(arr if arr.ndim == 3 else arr, mode=None).save(out / rel)
            counts["abnormal" if boxes else "normal"] += 1
            splits[split].extend(_records(cfg, rng, pid, sid, rel, modality, boxes, findings))
    for name, recs in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    info = {
        "fingerprint": cfg.fingerprint(),
        "config": asdict(cfg),
        "studies": counts,
        "records": {k: len(v) for k, v in splits.items()},
    }
    done.write_text(json.dumps(info, indent=2, default=list))
    log.info("synthetic data set in %s: %s", out, info["records"])
    return out
