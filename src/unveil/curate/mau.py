"""MAU-style records from segmentation / detection data sets (UMed-LVLM's data construction).

``python -m unveil.curate builder=mau 'builder.sources=[...]' builder.label_names=... out_dir=DIR``

UMed-LVLM made its MAU data set by showing GPT-4V medical images whose abnormal areas were already
identified (public segmentation and detection sets), marked on the image, and asking for a
diagnosis. This builder does the same:

1. **Areas** come from the sources of :mod:`unveil.curate.mau_sources` (2D masks, NIfTI label +
   image volumes, DICOM SEG, box tables): one box per connected lesion component, finding names
   from ``label_names``; studies without areas are normal, kept at ``normal_ratio`` normal per
   abnormal study (a seeded sample of the normal candidates).
2. **Split by patient**: patients are shuffled (seeded) and cut by ``split`` fractions, every
   split with a fraction > 0 getting at least one patient when there are enough; no patient is in
   two splits.
3. **The visual prompt** (``endpoint.model`` set): the image with each area outlined (``draw:
   outline``, the component's edge; box-table areas get their box) or boxed (``draw: box``) in its
   finding's colour and numbered in reading order, sent as a PNG data URL with ``prompt`` (fields
   ``{modality}``, ``{areas}``, ``{n_areas}``, ``{findings}``, ``{labels}``; ``normal_prompt`` for
   normal studies) to an OpenAI-compatible chat endpoint (the key from the environment variable
   named by ``endpoint.api_key_env``; redirects refused; :func:`unveil.judges.openai_compat.post_chat`).
   The reply names the areas by tag, ``<area1>``, ``<area2>``, ...; each tag's first mention becomes
   the area's box on the 0-100 grid (later mentions: "that region"). A reply is refused (the study
   skipped, counted and logged in ``failures.jsonl``) when it writes coordinates itself, names an
   area that does not exist, leaves one out (``missing_areas: fail``; ``append`` adds
   "Region [box]: finding." for it), mentions them out of reading order, calls a normal study
   abnormal, or (``require_labels``) does not name each box's finding after it.
4. **Template-only mode** (``endpoint.model: null``, the default): the answer is written from the
   labels, "Abnormality detected. Region [x1, y1, x2, y2]: finding. ..." as in the synthetic set.

Per study: a ``localize`` record (that answer, ``boxes`` normalised, ``findings``, ``modality``),
and with ``closed_questions`` a presence yes/no question and, when the areas share one finding,
its type; with ``open_questions`` a ``vqa_open`` question whose answer lists the findings.
For a long curation: a progress bar, a content-hash cache (``cache_dir``; key = SHA-256 of the
request body, image included; a re-run sends no request for a cached study), retries with
exponential back-off, ``max_requests`` (HTTP attempts per run; studies past it are skipped as
``budget_exhausted``), ``max_workers`` requests in flight. A failed study writes none of its
records. NIfTI slices are written as PNGs under ``<out_dir>/slices/`` (record files have no syntax
for one slice of a volume).
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from unveil.curate.common import CANON, BaseBuilder, Context, Outcome, rng_for
from unveil.curate.mau_sources import MaskRules, Region, Study, read_sources, safe_id
from unveil.data.schema import Sample
from unveil.data.synthetic import text as qa

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are an experienced radiologist writing concise, factual diagnostic reports."
PROMPT = (
    "This is a {modality} image. {n_areas} abnormal area(s) identified by experts are marked on it and numbered "
    "in reading order:\n{areas}\nWrite a short diagnosis of the image: say that an abnormality is detected, then "
    "describe each marked area (what it is, where it lies, how it looks). Refer to each area by its tag, "
    "<area1>, <area2>, ..., once each and in that order, followed by its finding name, e.g. "
    '"<area1>: {first_finding}, ...". Do not write coordinates.'
)
NORMAL_PROMPT = (
    "This is a {modality} image in which experts found no abnormality. Write a short report that says no "
    "abnormality is detected and the study appears normal, and describe what is visible. Do not write coordinates."
)
PALETTE = [
    ("red", (255, 0, 0)),
    ("green", (0, 255, 0)),
    ("blue", (0, 128, 255)),
    ("yellow", (255, 255, 0)),
    ("magenta", (255, 0, 255)),
    ("cyan", (0, 255, 255)),
]
MODALITY_WORDS = {"ct": "CT", "mri": "MRI", "mr": "MRI", "xray": "X-ray", "cxr": "chest X-ray", "us": "ultrasound"}
OPEN_QUERY = "Which abnormal findings does this {mod} image show?"
TAG = re.compile(r"<\s*area\s*(\d+)\s*>", re.I)
ENDPOINT = {
    "model": None,
    "base_url": "https://api.openai.com/v1",
    "api_key_env": "OPENAI_API_KEY",
    "timeout": 60.0,
    "retries": 3,
    "backoff": 2.0,
    "temperature": 0.0,
    "max_tokens": 400,
    "image_detail": "high",
    "extra_body": {},
}


# --- the visual prompt ----------------------------------------------------------------------------
def _edge(mask: np.ndarray, width: int) -> np.ndarray:
    """The outer ``width`` pixels of a bool mask, on a canvas padded by ``width`` on every side."""
    from scipy import ndimage

    pad = np.pad(mask, width)
    edge = pad & ~ndimage.binary_erosion(pad)
    return ndimage.binary_dilation(edge, iterations=width - 1) if width > 1 else edge


def mark_image(img: Image.Image, regions: list[Region], colours: dict, style: str = "outline", width: int = 2):
    """The image with each region's outline (or box) in its finding's colour and its number (reading order)."""
    arr = np.asarray(img.convert("RGB")).copy()
    h, w = arr.shape[:2]
    boxed = []
    for r in regions:
        colour = colours[r.finding][1]
        if style != "outline" or r.mask is None:
            boxed.append(r)
            continue
        edge = _edge(r.mask, width)
        r0, c0 = r.origin[0] - width, r.origin[1] - width
        ys, xs = np.nonzero(edge)
        ys, xs = ys + r0, xs + c0
        ok = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
        arr[ys[ok], xs[ok]] = colour
    out = Image.fromarray(arr)
    draw = ImageDraw.Draw(out)
    for r in boxed:
        x1, y1, x2, y2 = r.box
        xy = [x1 * w, y1 * h, max(x1 * w, x2 * w - 1), max(y1 * h, y2 * h - 1)]
        draw.rectangle(xy, outline=colours[r.finding][1], width=width)
    for k, r in enumerate(regions, start=1):
        x, y = r.box[0] * w, r.box[1] * h
        draw.text((x, max(0.0, y - 11)), str(k), fill=colours[r.finding][1])
    return out


def data_url(img: Image.Image, max_side: int | None = None) -> str:
    """A PNG data URL of the image, shrunk so its long side is at most ``max_side``."""
    if max_side and max(img.size) > max_side:
        s = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * s)), max(1, round(img.size[1] * s))), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- reading the reply ----------------------------------------------------------------------------
def parse_reply(
    reply: str, regions: list[Region], vocab: list[str], missing_areas: str = "fail", require_labels: bool = True
) -> tuple[str | None, str | None]:
    """(answer with each area's tag replaced by its box on the 0-100 grid, None) or (None, why refused)."""
    from unveil.eval.parse import parse_answer

    text = re.sub(r"\s+", " ", str(reply).replace("<image>", " ")).strip()
    if not text:
        return None, "empty"
    if CANON.parse_spans(text) or CANON.off_grid(text):
        return None, "own_coordinates"
    seen: list[int] = []
    bad: list[int] = []

    def box_for(m: re.Match) -> str:
        k = int(m.group(1))
        if not 1 <= k <= len(regions):
            bad.append(k)
            return m.group(0)
        if k in seen:
            return "that region"
        seen.append(k)
        return CANON.format_box(regions[k - 1].box)

    text = TAG.sub(box_for, text)
    if bad:
        return None, "unknown_area"
    missing = [k for k in range(1, len(regions) + 1) if k not in seen]
    if missing and missing_areas != "append":
        return None, "missing_area"
    for k in missing:
        r = regions[k - 1]
        text += f" Region {CANON.format_box(r.box)}: {r.finding}."
        seen.append(k)
    if seen != sorted(seen):
        return None, "out_of_order"
    pred = parse_answer(text, CANON, vocab)
    if not regions and pred.abnormal:
        return None, "says_abnormal"
    if regions and require_labels and pred.labels != [r.finding for r in regions]:
        return None, "labels_mismatch"
    return text, None


# --- the patient-level split ----------------------------------------------------------------------
def split_patients(patients, fractions: dict, seed: int) -> dict[str, str]:
    """{patient: split}: a seeded shuffle cut by the fractions (largest remainder), each split with a
    fraction > 0 getting at least one patient when there are as many patients as such splits."""
    names = [k for k, v in fractions.items() if float(v) > 0]
    if not names:
        raise ValueError(f"builder.split needs a fraction > 0, got {dict(fractions)}")
    total = sum(float(fractions[k]) for k in names)
    order = [str(p) for p in rng_for(seed, "mau_split").permutation(sorted({str(p) for p in patients}))]
    n = len(order)
    raw = [float(fractions[k]) / total * n for k in names]
    counts = [int(x) for x in raw]
    for i in sorted(range(len(names)), key=lambda i: raw[i] - counts[i], reverse=True)[: n - sum(counts)]:
        counts[i] += 1
    for i in range(len(names)):
        while counts[i] == 0 and n >= len(names):
            j = max(range(len(names)), key=lambda j: counts[j])
            counts[j] -= 1
            counts[i] += 1
    out, at = {}, 0
    for name, c in zip(names, counts):
        out.update({p: name for p in order[at : at + c]})
        at += c
    return out


class MAUBuilder(BaseBuilder):
    """Builds MAU records from segmentation sources (reads its own inputs: see :meth:`inputs`)."""

    name = "mau"

    def __init__(
        self,
        sources: list,
        label_names: dict | None = None,
        ignore_labels: list | None = None,
        min_component_px: int = 10,
        connectivity: int = 8,
        modality: str = "unknown",
        normal_ratio: float = 0.25,
        split: dict | None = None,
        closed_questions: bool = True,
        open_questions: bool = True,
        endpoint: dict | None = None,
        system_prompt: str = SYSTEM_PROMPT,
        prompt: str = PROMPT,
        normal_prompt: str = NORMAL_PROMPT,
        draw: str = "outline",
        line_width: int = 2,
        max_side: int | None = 1024,
        missing_areas: str = "fail",
        require_labels: bool = True,
        max_requests: int | None = None,
        max_workers: int = 4,
        cache_dir: str | None = None,
        image_dir: str = "slices",
    ):
        super().__init__()
        from unveil.judges.openai_compat import check_key_env

        self.sources = [dict(s) for s in (sources or [])]
        self.rules = MaskRules(label_names or {}, tuple(ignore_labels or ()), int(min_component_px), int(connectivity))
        self.modality, self.normal_ratio = str(modality), float(normal_ratio)
        self.split = dict(split or {"train": 0.8, "val": 0.1, "test": 0.1})
        self.closed_questions, self.open_questions = bool(closed_questions), bool(open_questions)
        self.endpoint = {**ENDPOINT, **dict(endpoint or {})}
        check_key_env(self.endpoint["api_key_env"], "builder.endpoint")
        self.system_prompt, self.prompt, self.normal_prompt = system_prompt, prompt, normal_prompt
        if draw not in ("outline", "box") or missing_areas not in ("fail", "append"):
            raise ValueError(
                f"builder.draw must be outline|box ({draw!r}), missing_areas fail|append ({missing_areas!r})"
            )
        self.draw, self.line_width, self.max_side = draw, max(1, int(line_width)), max_side
        self.missing_areas, self.require_labels = missing_areas, bool(require_labels)
        self.max_requests = None if max_requests is None else int(max_requests)
        self.max_workers, self.cache_dir, self.image_dir = max(1, int(max_workers)), cache_dir, image_dir
        self._check_templates()
        self._studies: dict[str, Study] = {}
        self._lock = threading.Lock()
        self._sent = 0
        self._out: Path | None = None
        self.vocab: list[str] = []

    @property
    def online(self) -> bool:
        return bool(self.endpoint.get("model"))

    def _check_templates(self) -> None:
        fields = {"modality": "CT", "areas": "", "n_areas": 1, "findings": "", "labels": "", "first_finding": "x"}
        for name in ("prompt", "normal_prompt"):
            try:
                getattr(self, name).format(**fields)
            except (KeyError, IndexError, ValueError) as e:
                raise ValueError(f"builder.{name}: unknown field {e} (known: {sorted(fields)})") from None

    # --- inputs: studies -> patient-level splits of study samples -------------------------------------
    def inputs(self, out_dir: str | Path, seed: int = 0, progress: bool = True) -> tuple[Path, dict]:
        """(root of the source images, {split: [one Sample per study]}); writes ``inputs.json``."""
        self._out = Path(out_dir).resolve()
        stats: Counter = Counter()
        roots, studies = read_sources(self.sources, self.rules, rng_for(seed, "mau_sources"), stats, progress)
        abnormal = [s for s in studies if s.regions]
        normal = [s for s in studies if not s.regions]
        n_normal = min(len(normal), int(round(self.normal_ratio * len(abnormal))))
        pick = sorted(rng_for(seed, "mau_normals").choice(len(normal), n_normal, replace=False).tolist())
        kept = sorted(abnormal + [normal[i] for i in pick], key=lambda s: s.study_id)
        if not kept:
            raise ValueError(f"builder.sources gave no study (counts: {dict(stats)})")
        where = split_patients([s.patient_id for s in kept], self.split, seed)
        names = {**{str(v): str(v) for v in self.rules.label_names.values()}}
        self.vocab = sorted({*names, *(r.finding for s in kept for r in s.regions)})
        splits: dict[str, list[Sample]] = {k: [] for k in self.split if float(self.split[k]) > 0}
        for st in kept:
            splits[where[st.patient_id]].append(self._study_sample(st))
        (self._out / "failures.jsonl").unlink(missing_ok=True)
        info = {
            **stats,
            "studies_abnormal": len(abnormal),
            "normal_candidates": len(normal),
            "studies_normal": n_normal,
            "patients": {k: len({s.meta["patient_id"] for s in v}) for k, v in splits.items()},
            "studies": {k: len(v) for k, v in splits.items()},
        }
        (self._out / "inputs.json").write_text(json.dumps(info, indent=1) + "\n")
        log.info("mau inputs: %s", info)
        root = Path(os.path.commonpath([str(r) for r in roots])) if roots else self._out
        return root, splits

    def _study_sample(self, st: Study) -> Sample:
        """The input of ``run``: one study, its image on disk (NIfTI slices written now)."""
        if st.image is None:
            path = self._out / self.image_dir / f"{st.study_id}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            st.render(path)
            st.image = str(path)
        self._studies[st.study_id] = st
        return Sample(
            id=st.study_id,
            images=[st.image],
            messages=[{"role": "user", "content": "<image>\n"}],
            boxes=[list(r.box) for r in st.regions],
            findings=[r.finding for r in st.regions],
            task="localize",
            meta={
                "study_id": st.study_id,
                "patient_id": st.patient_id,
                "modality": st.modality or self.modality,
                "source": f"mau:{st.source}",
                **st.meta,
            },
        )

    # --- run: answers -> records ----------------------------------------------------------------------
    def run(self, samples: list[Sample], ctx: Context) -> Iterator[Outcome]:
        pool = ThreadPoolExecutor(self.max_workers) if self.online and self.max_workers > 1 else None
        answers = pool.map(self._answer, samples) if pool else map(self._answer, samples)
        try:
            for s, (answer, how, why, detail) in zip(samples, answers):
                ctx.advance(1)
                if answer is None:
                    self._log_failure(ctx.split, s, why, detail)
                    yield Outcome(skipped=why)
                    continue
                self.stats[f"answers/{how}"] += 1
                for rec in self.records(s, answer, how, ctx.seed):
                    yield Outcome(rec)
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)

    def _answer(self, s: Sample) -> tuple[str | None, str, str | None, str]:
        """(answer or None, how it was made: template | endpoint | cache, why it failed, detail)."""
        st = self._studies[s.id]
        if not self.online:
            return (
                qa.localize_answer([list(r.box) for r in st.regions], [r.finding for r in st.regions]),
                "template",
                None,
                "",
            )
        try:
            body = self.request_body(st, s.meta["modality"])
        except Exception as e:  # an unreadable image: this study only
            return None, "", "image_unreadable", f"{type(e).__name__}: {e}"
        key = hashlib.sha256(body).hexdigest()
        reply, how = self._cache_get(key), "cache"
        if reply is None:
            reply, why = self._send(body)
            if reply is None:
                return None, "", why if why == "budget_exhausted" else f"request_{why}", why
            self._cache_put(key, reply)
            how = "endpoint"
        answer, why = parse_reply(reply, st.regions, self.vocab, self.missing_areas, self.require_labels)
        if answer is None:
            return None, how, f"reply_{why}", reply[:500]
        return answer, how, None, ""

    def request_body(self, st: Study, modality: str) -> bytes:
        """The chat-completions request (JSON bytes, keys sorted: its hash is the cache key)."""
        from unveil.data.images import load_image

        colours = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(self.vocab)}
        img = mark_image(load_image(st.image), st.regions, colours, self.draw, self.line_width)
        mod = MODALITY_WORDS.get(modality.lower(), modality)
        areas = "\n".join(f"<area{k}> ({colours[r.finding][0]}): {r.finding}" for k, r in enumerate(st.regions, 1))
        findings = sorted({r.finding for r in st.regions})
        fields = {
            "modality": mod,
            "areas": areas,
            "n_areas": len(st.regions),
            "findings": ", ".join(findings),
            "labels": ", ".join(self.vocab),
            "first_finding": st.regions[0].finding if st.regions else "",
        }
        text = (self.prompt if st.regions else self.normal_prompt).format(**fields)
        image_part = {"url": data_url(img, self.max_side), "detail": self.endpoint["image_detail"]}
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append(
            {
                "role": "user",
                "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": image_part}],
            }
        )
        body = {
            "model": self.endpoint["model"],
            "messages": msgs,
            "temperature": float(self.endpoint["temperature"]),
            "max_tokens": int(self.endpoint["max_tokens"]),
            **dict(self.endpoint.get("extra_body") or {}),
        }
        return json.dumps(body, sort_keys=True).encode()

    def _take_budget(self) -> bool:
        with self._lock:
            if self.max_requests is not None and self._sent >= self.max_requests:
                return False
            self._sent += 1
            self.stats["requests"] += 1
            return True

    def _send(self, body: bytes) -> tuple[str | None, str | None]:
        from unveil.judges.openai_compat import auth_headers, post_chat

        e = self.endpoint
        url = f"{str(e['base_url']).rstrip('/')}/chat/completions"
        return post_chat(
            url, body, auth_headers(e["api_key_env"]), float(e["timeout"]), int(e["retries"]), float(e["backoff"]),
            who="mau builder", allow=self._take_budget,
        )  # fmt: skip

    # --- the content-hash cache: one small JSON file per request --------------------------------------
    def _cache_path(self, key: str) -> Path:
        root = Path(self.cache_dir) if self.cache_dir else self._out / "mau_cache"
        return root / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> str | None:
        p = self._cache_path(key)
        try:
            reply = json.loads(p.read_text(encoding="utf-8"))["reply"]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        with self._lock:
            self.stats["cache_hits"] += 1
        return reply if isinstance(reply, str) else None

    def _cache_put(self, key: str, reply: str) -> None:
        p = self._cache_path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"reply": reply, "model": self.endpoint["model"]}, ensure_ascii=False))
        os.replace(tmp, p)  # a crash leaves no half-written entry

    def _log_failure(self, split: str, s: Sample, why: str, detail: str) -> None:
        self.stats[f"failed/{why}"] += 1
        log.warning("mau builder: study %s skipped: %s", s.id, why)
        rec = {
            "split": split,
            "study_id": s.id,
            "patient_id": s.meta.get("patient_id"),
            "reason": why,
            "detail": detail,
        }
        with open(self._out / "failures.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    # --- the records of one study ---------------------------------------------------------------------
    def records(self, s: Sample, answer: str, how: str, seed: int) -> list[Sample]:
        """The localize record, then the closed / open questions derived from the same labels."""
        rng = rng_for(seed, "mau_queries", s.id)
        modality = s.meta["modality"]
        mod = MODALITY_WORDS.get(modality.lower(), modality)
        findings = list(dict.fromkeys(s.findings))
        # a cached reply is the endpoint's: the records of a re-run are byte-identical
        meta = {**s.meta, "answer_source": "endpoint" if how == "cache" else how, "curate_builder": self.name}
        items = [("loc", "localize", qa.pick(rng, qa.LOCALIZE_QUERIES, mod=mod), answer, None)]
        if self.closed_questions:
            yn = "yes" if s.boxes else "no"
            items.append(("presence", "vqa_closed", qa.pick(rng, qa.PRESENCE_QUERIES, mod=mod), yn, yn))
            if len(findings) == 1:
                q = qa.pick(rng, qa.TYPE_QUERIES, choices=", ".join(self.vocab))
                items.append(("type", "vqa_closed", q, findings[0], findings[0]))
        if self.open_questions:
            text = (", ".join(findings) + ".") if findings else qa.NORMAL_ANSWER
            items.append(("open", "vqa_open", OPEN_QUERY.format(mod=mod), text[:1].upper() + text[1:], None))
        return [
            Sample(
                id=f"{s.id}-{suffix}",
                images=list(s.images),
                messages=[{"role": "user", "content": f"<image>\n{query}"}, {"role": "assistant", "content": text}],
                boxes=[list(b) for b in s.boxes],
                findings=list(s.findings),
                task=task,
                answer=short,
                meta=dict(meta),
            )
            for suffix, task, query, text, short in items
        ]


__all__ = ["MAUBuilder", "mark_image", "parse_reply", "split_patients", "safe_id"]
