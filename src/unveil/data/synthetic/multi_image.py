"""Multi-image synthetic studies in Med-MIM's style (docs/methods.md#med-mim): multiple choice per ability.

Three abilities, each a multiple-choice question over 2-3 images of one patient:

- ``comparison``: prior vs current study; the lesion has grown, shrunk, is new, has resolved
  or is unchanged.
- ``temporal``: a series of 3 time points; the lesion is increasing, decreasing, stable, or
  appears then resolves.
- ``coreference``: "which image shows the <finding>?" among 2-3 views of the patient.

Longitudinal images of a patient share one background: the anatomy is drawn from the same
RNG state each time, so between time points only the lesion (and acquisition noise) changes.
A lesion keeps its centre and shape across time points (same shape RNG); only its radius
changes. Grown/shrunk pairs differ by a factor of ``grow_factor`` in radius, and radii are
drawn so that a lesion's absolute size in one image does not tell the answer: the question
needs both images.

Records are MAU JSONL (what :mod:`unveil.data.adapters.mau_jsonl` reads): ``images`` (list),
``query`` with all ``<image>`` placeholders together at the start and the options after the
question as lines ``A: ...`` (Med-MIM style), ``answer`` = ``"B: <option text>"`` (also in
``short_answer``, which evaluation scores by option letter), ``task: mcq``, ``ability``,
``modality``, ``patient_id``, the current image's ``boxes``/``findings`` (``box_image`` says
which image) and every image's boxes in ``image_boxes``. Option order is shuffled per record,
so answer letters are uniform (``shuffle_options=False``: the config's label order in every
question). ``localize_train`` adds single-image localisation records of the question images to
the training split, for the tiny model's vision warm-up. Splits are by patient; everything is
deterministic per seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from filelock import FileLock
from PIL import Image

from unveil.data.schema import IMAGE_PLACEHOLDER
from unveil.data.synthetic import anatomy, lesions, text

log = logging.getLogger(__name__)

_VERSION = 4  # bump when the rendering changes: cached sets are regenerated

# label -> option text, per ability (the option text is what the answer names after the letter)
COMPARISON = {
    "grown": "grown",
    "shrunk": "shrunk",
    "new": "new lesion",
    "resolved": "resolved",
    "unchanged": "unchanged",
}
TEMPORAL = {
    "increasing": "increasing",
    "decreasing": "decreasing",
    "stable": "stable",
    "transient": "appears then resolves",
}
ABILITIES = ("comparison", "temporal", "coreference")

# Short on purpose: the tiny default model pays for every token, and 2-3 images already cost
# 16-64 image tokens each. Two phrasings per ability keep the model from keying on one string.
COMPARISON_QUERIES = [
    "Prior (first) and current (second) {mod} of one patient. How has the lesion changed?",
    "Compare the current {mod} (second image) with the prior (first). What happened to the lesion?",
]
TEMPORAL_QUERIES = [
    "{n} {mod} studies of one patient, oldest first. How does the lesion evolve?",
    "Follow the lesion across these {n} {mod} studies in time order. What is its course?",
]
COREFERENCE_QUERIES = [
    "Which image shows the {finding}?",
    "{n} {mod} views of one patient. Which one shows a {finding}?",
]


@dataclass
class MultiImageConfig:
    n_patients: int = 600
    # records per patient and ability; an ability left out (or 0) is not generated
    abilities: dict[str, int] = field(default_factory=lambda: {"comparison": 2, "temporal": 1, "coreference": 1})
    image_size: int = 64
    modalities: list[str] = field(default_factory=lambda: ["ct", "xray", "fundus"])
    findings: list[str] = field(default_factory=lambda: list(lesions.FINDINGS))
    comparison_labels: list[str] = field(default_factory=lambda: list(COMPARISON))
    temporal_labels: list[str] = field(default_factory=lambda: list(TEMPORAL))
    coreference_images: tuple[int, int] = (2, 3)  # inclusive range of views per question
    # radius (fraction of the image side) of the smaller lesion of a grown/shrunk pair, and the
    # factor between the two; unchanged/new/resolved lesions span the whole range of both
    small_radius: tuple[float, float] = (0.045, 0.07)
    grow_factor: tuple[float, float] = (1.8, 2.1)
    # per time step of an increasing/decreasing series (two steps)
    step_factor: tuple[float, float] = (1.4, 1.55)
    noise: float = 0.02  # acquisition noise, drawn independently per image
    # also ask each question open-ended (no options; answer = the option text, task
    # vqa_closed) on the same images, as Med-MIM mixes open and multiple-choice items
    open_questions: bool = False
    # "Image 1: <image>\nImage 2: <image>\n..." before the question (interleaved, Mantis-style)
    # instead of Med-MIM's bare "<image><image>" at the start: the tags tell a causal LM which
    # image a token belongs to, which a small model trained from scratch otherwise learns slowly
    image_labels: bool = False
    # training split only: also one single-image localisation record (task localize, the
    # single-image generator's query/answer wording) per image of each comparison/temporal
    # item. A tower built in code has no pretrained encoder; these boxes are what the vision
    # warm-up (model.vision_pretrain) learns lesion features from. Val/test stay questions only.
    localize_train: bool = False
    # Shuffle the option order per record (letters uniform, the letter says nothing without the
    # option lines). False: every question of an ability lists its options in the config's
    # label order, so a letter always names the same answer; the images still decide it, and
    # chance is the label distribution. The tiny model trained from scratch reads the answer off
    # the images in CPU minutes but had not learnt to look a shuffled letter up after 800-1500
    # steps (experiments/results/multi_image.md).
    shuffle_options: bool = True
    val_fraction: float = 0.1
    test_fraction: float = 0.15
    seed: int = 0

    def __post_init__(self):
        self.abilities = {str(k): int(v) for k, v in dict(self.abilities).items()}
        unknown = set(self.abilities) - set(ABILITIES)
        if unknown:
            raise ValueError(f"unknown abilities {sorted(unknown)}; known: {ABILITIES}")
        for name, labels, known in (
            ("comparison_labels", self.comparison_labels, COMPARISON),
            ("temporal_labels", self.temporal_labels, TEMPORAL),
        ):
            if not set(labels) <= set(known) or len(labels) < 2:
                raise ValueError(f"{name}: at least two of {list(known)}, got {labels}")
        lo, hi = self.coreference_images
        if not 2 <= lo <= hi <= 8:
            raise ValueError(f"coreference_images must be a range within [2, 8], got {self.coreference_images}")
        self.coreference_images = (int(lo), int(hi))
        self.small_radius = tuple(self.small_radius)
        self.grow_factor = tuple(self.grow_factor)
        self.step_factor = tuple(self.step_factor)

    @property
    def radius_range(self) -> tuple[float, float]:
        """Range of a single lesion's radius: the smallest small one to the largest grown one."""
        return self.small_radius[0], self.small_radius[1] * self.grow_factor[1]

    def fingerprint(self) -> str:
        blob = json.dumps({"v": _VERSION, **asdict(self)}, sort_keys=True, default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:10]


# --- rendering ------------------------------------------------------------------------------


@dataclass
class Lesion:
    kind: str
    cx: float
    cy: float
    shape_seed: int  # the same lesion keeps its shape when its radius changes


def _background(cfg: MultiImageConfig, modality: str, seed: list[int]):
    """The patient's anatomy; the same seed gives the same image (the RNG state is reused)."""
    img, zone = anatomy.MODALITIES[modality](np.random.default_rng(seed), cfg.image_size)
    return img.astype(np.float32), zone


def _place(rng, zone: np.ndarray, r: float):
    """A centre inside the lesion zone with a disk of radius r fully in the image."""
    size = zone.shape[0]
    ys, xs = np.nonzero(zone)
    for _ in range(200):
        i = int(rng.integers(len(xs)))
        cx, cy = (xs[i] + 0.5) / size, (ys[i] + 0.5) / size
        if r < cx < 1 - r and r < cy < 1 - r:
            return cx, cy
    return 0.5, 0.5


def _render(
    cfg: MultiImageConfig, bg: np.ndarray, lesion: Lesion | None, r: float, noise_rng
) -> tuple[np.ndarray, list]:
    """One image: background + the lesion at radius r (None or r=0: no lesion) + noise."""
    img = bg.copy()
    boxes = []
    if lesion is not None and r > 0:
        mask = lesions.draw(np.random.default_rng(lesion.shape_seed), img, lesion.kind, lesion.cx, lesion.cy, r)
        boxes.append([round(v, 5) for v in lesions.mask_box(mask)])
    img = np.clip(img + noise_rng.normal(0, cfg.noise, img.shape), 0, 1)
    return (img * 255).astype(np.uint8), boxes


def _options(
    rng, labels: list[str], texts: dict[str, str], answer: str, shuffle: bool = True
) -> tuple[str, str, dict[str, str]]:
    """Option lines ``A: ...`` (shuffled unless told); returns (lines, "B: <text>", {letter: text}).

    The options dict has the shape the Med-MIM adapter puts in ``meta["options"]``.
    """
    order = [labels[i] for i in rng.permutation(len(labels))] if shuffle else list(labels)
    opts = {string.ascii_uppercase[i]: texts[l] for i, l in enumerate(order)}
    lines = "\n".join(f"{k}: {t}" for k, t in opts.items())
    k = string.ascii_uppercase[order.index(answer)]
    return lines, f"{k}: {opts[k]}", opts


def _images_prefix(cfg: MultiImageConfig, n: int) -> str:
    if cfg.image_labels:
        return "".join(f"Image {i + 1}: {IMAGE_PLACEHOLDER}\n" for i in range(n))
    return IMAGE_PLACEHOLDER * n


def _query(cfg, rng, templates: list[str], n_images: int, options: str, **kw) -> str:
    """Images, the question, then the option lines (the open twin is the part before the options)."""
    q = templates[int(rng.integers(len(templates)))].format(n=n_images, **kw)
    return _images_prefix(cfg, n_images) + q + "\n" + options


def _comparison(cfg, rng, modality, bg_seed) -> tuple[dict, list[np.ndarray]]:
    label = cfg.comparison_labels[int(rng.integers(len(cfg.comparison_labels)))]
    bg, zone = _background(cfg, modality, bg_seed)
    lo, hi = cfg.radius_range
    if label in ("grown", "shrunk"):
        small = float(rng.uniform(*cfg.small_radius))
        large = small * float(rng.uniform(*cfg.grow_factor))
        radii = (small, large) if label == "grown" else (large, small)
    else:
        r = float(rng.uniform(lo, hi))
        radii = {"new": (0.0, r), "resolved": (r, 0.0), "unchanged": (r, r)}[label]
    kind = cfg.findings[int(rng.integers(len(cfg.findings)))]
    cx, cy = _place(rng, zone, max(radii))
    lesion = Lesion(kind, cx, cy, int(rng.integers(2**31)))
    images, image_boxes = [], []
    for r in radii:
        arr, boxes = _render(cfg, bg, lesion, r, rng)
        images.append(arr)
        image_boxes.append(boxes)
    lines, answer, opts = _options(rng, cfg.comparison_labels, COMPARISON, label, cfg.shuffle_options)
    mod = anatomy.MODALITY_NAMES[modality]
    rec = {
        "query": _query(cfg, rng, COMPARISON_QUERIES, 2, lines, mod=mod),
        "answer": answer,
        "label": label,
        "options": opts,
        "image_boxes": image_boxes,
        "image_findings": [[kind] * len(b) for b in image_boxes],
        "radii": [round(r, 5) for r in radii],
        "current": 1,
    }
    return rec, images


def _temporal(cfg, rng, modality, bg_seed) -> tuple[dict, list[np.ndarray]]:
    label = cfg.temporal_labels[int(rng.integers(len(cfg.temporal_labels)))]
    bg, zone = _background(cfg, modality, bg_seed)
    lo, hi = cfg.radius_range
    if label in ("increasing", "decreasing"):
        r0 = float(rng.uniform(lo, hi / cfg.step_factor[1] ** 2))
        f1, f2 = (float(rng.uniform(*cfg.step_factor)) for _ in range(2))
        radii = (r0, r0 * f1, r0 * f1 * f2)
        radii = radii if label == "increasing" else radii[::-1]
    else:
        r = float(rng.uniform(lo, hi))
        radii = (r, r, r) if label == "stable" else (0.0, r, 0.0)
    kind = cfg.findings[int(rng.integers(len(cfg.findings)))]
    cx, cy = _place(rng, zone, max(radii))
    lesion = Lesion(kind, cx, cy, int(rng.integers(2**31)))
    images, image_boxes = [], []
    for r in radii:
        arr, boxes = _render(cfg, bg, lesion, r, rng)
        images.append(arr)
        image_boxes.append(boxes)
    lines, answer, opts = _options(rng, cfg.temporal_labels, TEMPORAL, label, cfg.shuffle_options)
    mod = anatomy.MODALITY_NAMES[modality]
    rec = {
        "query": _query(cfg, rng, TEMPORAL_QUERIES, 3, lines, mod=mod),
        "answer": answer,
        "label": label,
        "options": opts,
        "image_boxes": image_boxes,
        "image_findings": [[kind] * len(b) for b in image_boxes],
        "radii": [round(r, 5) for r in radii],
        "current": 2,
    }
    return rec, images


def _coreference(cfg, rng, modality, patient_seed) -> tuple[dict, list[np.ndarray]]:
    lo_n, hi_n = cfg.coreference_images
    n = int(rng.integers(lo_n, hi_n + 1))
    target = cfg.findings[int(rng.integers(len(cfg.findings)))]
    others = [f for f in cfg.findings if f != target]
    k = int(rng.integers(n))  # the image that shows the asked finding
    lo, hi = cfg.radius_range
    images, image_boxes, image_findings = [], [], []
    for v in range(n):
        # each view is its own acquisition of the patient: its own anatomy draw
        bg, zone = _background(cfg, modality, [*patient_seed, 100 + v])
        kind = (
            target if v == k else (others[int(rng.integers(len(others)))] if others and rng.uniform() < 0.5 else None)
        )
        r = float(rng.uniform(*lesions.FINDINGS[kind])) if kind else 0.0
        lesion = None
        if kind:
            cx, cy = _place(rng, zone, r)
            lesion = Lesion(kind, cx, cy, int(rng.integers(2**31)))
        arr, boxes = _render(cfg, bg, lesion, r, rng)
        images.append(arr)
        image_boxes.append(boxes)
        image_findings.append([kind] * len(boxes))
    labels = [f"image {i + 1}" for i in range(n)]
    lines, answer, opts = _options(rng, labels, {l: l for l in labels}, labels[k], cfg.shuffle_options)
    mod = anatomy.MODALITY_NAMES[modality]
    rec = {
        "query": _query(cfg, rng, COREFERENCE_QUERIES, n, lines, mod=mod, finding=target),
        "answer": answer,
        "label": labels[k],
        "options": opts,
        "image_boxes": image_boxes,
        "image_findings": image_findings,
        "target_finding": target,
        "current": k,
    }
    return rec, images


_BUILDERS = {"comparison": _comparison, "temporal": _temporal}


def _split_of(cfg: MultiImageConfig, p: int) -> str:
    u = np.random.default_rng([cfg.seed, p, 1]).uniform()
    return "test" if u < cfg.test_fraction else "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


def _mcq_record(rec: dict, sid: str, rels: list[str], ability: str, modality: str, pid: str) -> dict:
    """The study's multiple-choice record; the boxes are those of the image the question is about."""
    cur, answer = rec.pop("current"), rec.pop("answer")
    boxes = rec["image_boxes"][cur]
    query = rec.pop("query")
    return {
        "id": sid,
        "images": rels,
        "query": query,
        "answer": answer,
        "short_answer": answer,
        "answer_letter": answer[0],
        "task": "mcq",
        "ability": ability,
        "modality": modality,
        "source": "synthetic_mim",
        "patient_id": pid,
        "study_id": sid,
        "boxes": boxes,
        "box_units": "normalized",
        "box_image": [cur] * len(boxes),
        "findings": rec["image_findings"][cur],
        **rec,
    }


def _open_twin(mcq: dict) -> dict:
    """The same question without its option list, answered with the right option's text."""
    query, opt = mcq["query"], mcq["options"][mcq["answer"][0]]
    return {
        **{k: v for k, v in mcq.items() if k not in ("options", "answer_letter")},
        "id": f"{mcq['id']}-open",
        "query": query[: query.index("\nA: ")],
        "answer": opt,
        "short_answer": opt,
        "task": "vqa_closed",
    }


def _localize_records(
    rec: dict, sid: str, rels: list[str], ability: str, modality: str, pid: str, rng: np.random.Generator
) -> list[dict]:
    """One single-image localisation record per image of the study (the query drawn from rng)."""
    mod = anatomy.MODALITY_NAMES[modality]
    recs = []
    for i, (rel, img_boxes) in enumerate(zip(rels, rec["image_boxes"])):
        img_findings = rec["image_findings"][i]
        recs.append(
            {
                "id": f"{sid}-loc{i}",
                "images": [rel],
                "task": "localize",
                "query": text.pick(rng, text.LOCALIZE_QUERIES, mod=mod),
                "answer": text.localize_answer(img_boxes, img_findings),
                "boxes": img_boxes,
                "box_units": "normalized",
                "findings": img_findings,
                "ability": ability,
                "modality": modality,
                "source": "synthetic_mim",
                "patient_id": pid,
                "study_id": sid,
            }
        )
    return recs


def patient_records(cfg: MultiImageConfig, p: int, out: Path | None = None) -> list[dict]:
    """All records of patient p (images written under ``out/images`` when out is given)."""
    pid = f"p{p:05d}"
    prng = np.random.default_rng([cfg.seed, p, 0])
    modality = cfg.modalities[int(prng.integers(len(cfg.modalities)))]  # a patient keeps one modality
    bg_seed = [cfg.seed, p, 2]  # the patient's anatomy, shared by all longitudinal studies
    recs = []
    localize = cfg.localize_train and _split_of(cfg, p) == "train"
    for ability in ABILITIES:
        for j in range(cfg.abilities.get(ability, 0)):
            sid = f"{pid}_{ability[:4]}{j}"
            rng = np.random.default_rng([cfg.seed, p, 3 + ABILITIES.index(ability), j])
            if ability == "coreference":
                rec, images = _coreference(cfg, rng, modality, [cfg.seed, p, 50 + j])
            else:
                rec, images = _BUILDERS[ability](cfg, rng, modality, bg_seed)
            rels = [f"images/{sid}_{i}.png" for i in range(len(images))]
            if out is not None:
                for rel, arr in zip(rels, images):
                    Image.fromarray(arr).save(out / rel)
            mcq = _mcq_record(rec, sid, rels, ability, modality, pid)
            recs.append(mcq)
            if cfg.open_questions:
                recs.append(_open_twin(mcq))
            if localize and ability != "coreference":
                recs += _localize_records(rec, sid, rels, ability, modality, pid, rng)
    return recs


def chance(records: list[dict]) -> dict[str, float]:
    """Expected accuracy of a uniform guess over the options: overall and per ability."""
    out: dict[str, list[float]] = {"overall": []}
    for r in records:
        if r["task"] != "mcq":
            continue
        p = 1.0 / len(r["options"])
        out["overall"].append(p)
        out.setdefault(r["ability"], []).append(p)
    return {k: float(np.mean(v)) for k, v in out.items() if v}


def generate_multi_image(cfg: MultiImageConfig, out_dir: str | Path, progress: bool = False) -> Path:
    """Write ``images/``, ``{train,val,test}.jsonl`` and ``info.json`` under out_dir.

    Skips the work when out_dir already holds a finished set with the same fingerprint.
    """
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    # runs of a sweep may start on one set at once: one writes it, the others wait, then reuse it
    with FileLock(str(out) + ".lock"):
        return _generate_multi_image(cfg, out, progress)


def _generate_multi_image(cfg: MultiImageConfig, out: Path, progress: bool = False) -> Path:
    done = out / "info.json"
    if done.exists() and json.loads(done.read_text()).get("fingerprint") == cfg.fingerprint():
        return out
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"train": [], "val": [], "test": []}
    for p in range(cfg.n_patients):
        splits[_split_of(cfg, p)].extend(patient_records(cfg, p, out))
        if progress and (p + 1) % 100 == 0:
            log.info("multi-image synthetic: %d/%d patients", p + 1, cfg.n_patients)
    for name, recs in splits.items():
        with open(out / f"{name}.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
    info = {
        "fingerprint": cfg.fingerprint(),
        "config": asdict(cfg),
        "records": {k: len(v) for k, v in splits.items()},
        "abilities": {
            k: {a: sum(r["ability"] == a and r["task"] == "mcq" for r in v) for a in ABILITIES}
            for k, v in splits.items()
        },
        "labels": {k: {f"{r['ability']}/{r['label']}": 0 for r in v if r["task"] == "mcq"} for k, v in splits.items()},
        "chance": {k: chance(v) for k, v in splits.items() if v},
    }
    for k, v in splits.items():
        for r in (r for r in v if r["task"] == "mcq"):
            info["labels"][k][f"{r['ability']}/{r['label']}"] += 1
    done.write_text(json.dumps(info, indent=2, default=list))
    log.info("multi-image synthetic set in %s: %s", out, info["records"])
    return out
