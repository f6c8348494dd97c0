"""Generate on a split, parse with the backbone's BoxFormat, score, and save predictions."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from tqdm.auto import tqdm

from unveil.data.collate import PromptCollator
from unveil.data.frames import answer_frame
from unveil.data.schema import Sample
from unveil.eval.metrics import GroupedMetrics
from unveil.eval.parse import closed_correct, parse_answer
from unveil.models.generation import generate

log = logging.getLogger(__name__)

# A standalone option letter: "B: ...", "(C)", "D.", "A or B", "answer is E" (but not the article in "A mass").
_OPTION = re.compile(r"(?:^|[\s(])([A-H])(?=\s*[:.)]|\s*$|\s+(?:or|and)\b|\s*[,/])")
_ANSWER_IS = re.compile(r"\b(?:answer|option)\s*(?:is)?\s*:?\s*\(?([A-H])\b", re.I)


def mcq_letter(text: str) -> str | None:
    """The single option letter an answer commits to; None when it names none or several."""
    text = (text or "").strip()
    letters = set(_OPTION.findall(text)) | {m.upper() for m in _ANSWER_IS.findall(text)}
    return letters.pop() if len(letters) == 1 else None


OPEN_TASKS = ("vqa_open",)
REPORT_TASKS = ("report", "describe")


def findings_vocab(samples: list[Sample]) -> list[str]:
    return sorted({f for s in samples for f in s.findings})


def _score(s: Sample, text: str, metrics: GroupedMetrics, group_by, backbone, vocab: list[str]) -> dict:
    """Add one prediction to the overall and its groups' metrics; returns its predictions.jsonl record."""
    # image paths, so a notebook can draw the boxes (unveil.eval.runs.draw_study)
    rec = {
        "id": s.id,
        "task": s.task,
        "modality": s.modality,
        "images": s.images,
        "prediction": text,
        "reference": s.target,
    }
    groups = [(g, str(s.task if g == "task" else s.meta[g])) for g in group_by if g == "task" or g in s.meta]
    targets = [metrics.overall] + [metrics.of(g, v) for g, v in groups]
    if s.task == "localize":
        # boxes back in the original image's frame (padding, resized pixels: unveil.data.frames)
        pred = parse_answer(text, backbone.box_format, vocab, answer_frame(backbone, s))
        for m in targets:
            scores = m.update_study(pred, s.boxes, s.findings)
        rec.update(
            scores,
            pred_boxes=[list(b) for b in pred.boxes],
            pred_labels=pred.labels,
            gt_boxes=s.boxes,
            gt_findings=s.findings,
        )
    elif s.task == "mcq":
        ok = mcq_letter(text) is not None and mcq_letter(text) == mcq_letter(s.answer or "")
        for m in targets:
            m.update_mcq(ok)
        rec["correct"] = ok
    elif s.task in OPEN_TASKS:  # free text: never exact-matched into closed_acc
        ref = s.answer if s.answer is not None else s.target  # Med-MIM conv items: the assistant turn
        for m in targets:
            rec.update(m.update_open(text, ref))
    elif s.task in REPORT_TASKS:
        for m in targets:
            m.update_report(text, s.target)
    elif s.answer is not None:  # vqa_closed, and any other task with a short reference
        ok = closed_correct(text, s.answer)
        for m in targets:
            m.update_closed(ok)
        rec["correct"] = ok
    return rec


def _generate_sharded(backbone, samples, batch_size, max_new_tokens, coord_decoding, prefix, progress):
    """Greedy texts for ``samples`` in their order, on rank 0 (None on the other ranks).

    Under a process group every rank generates its share: the batches a single process would
    make, dealt round-robin (rank r takes batches r, r + world, ...), so each batch, its padding
    included, is the one the one-process evaluation generates; the texts are gathered to rank 0
    (``all_gather_object``) and put back in sample order. Every rank must call it."""
    from unveil.utils.dist import all_gather_objects, rank, world_size

    world, me = world_size(), rank()
    collate = PromptCollator(backbone)
    device = next(backbone.model.parameters()).device
    starts = list(range(0, len(samples), batch_size))[me::world]
    mine: dict[int, list[str]] = {}
    for i in tqdm(starts, desc=f"eval {prefix}", disable=not progress or me != 0):
        batch = collate(samples[i : i + batch_size])
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        mine[i] = generate(backbone, batch, max_new_tokens=max_new_tokens, coord_decoding=coord_decoding)["texts"]
    gathered = all_gather_objects(mine)
    if me != 0:
        return None
    merged = {i: t for part in gathered for i, t in part.items()}
    return [text for i in sorted(merged) for text in merged[i]]


def evaluate(
    backbone,
    samples: list[Sample],
    out_dir: str | Path | None = None,
    prefix: str = "test",
    batch_size: int = 32,
    max_new_tokens: int = 48,
    vocab: list[str] | None = None,
    group_by: tuple[str, ...] = ("modality", "ability", "task"),
    progress: bool = True,
    coord_decoding: str = "argmax",
) -> dict[str, float]:
    """Greedy generation on ``samples``; writes ``predictions.jsonl`` into out_dir.
    Under a process group (DDP, FSDP with full parameters summoned) every rank must call it: the
    generation is sharded across ranks, rank 0 scores the gathered predictions and writes the file,
    the other ranks return ``{}``.
    ``coord_decoding="median"`` reads each box coordinate as the median grid value
    (:func:`unveil.models.generation.generate`)."""
    vocab = vocab or findings_vocab(samples)
    texts = _generate_sharded(backbone, samples, batch_size, max_new_tokens, coord_decoding, prefix, progress)
    if texts is None:  # a rank other than 0 of a distributed run: rank 0 scores and writes
        return {}
    # one process scores the whole split, once: no metric syncs with other ranks
    metrics = GroupedMetrics(sync_on_compute=False)
    records = [_score(s, text, metrics, group_by, backbone, vocab) for s, text in zip(samples, texts)]
    result = metrics.compute(prefix)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ("predictions.jsonl" if prefix == "test" else f"predictions_{prefix}.jsonl"), "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return result


def format_table(metrics: dict[str, float], prefix: str = "test") -> str:
    """A readable table: rows = overall and each group value, columns = metrics."""
    cols = [
        "presence_acc",
        "iou",
        "acc50",
        "finding_acc",
        "fpr_normal",
        "closed_acc",
        "mcq_acc",
        "open_em",
        "open_recall",
        "bleu1",
        "bleu2",
        "bleu3",
        "bleu4",
        "rouge_l",
    ]
    rows: dict[str, dict[str, float]] = {}
    for k, v in metrics.items():
        if not k.startswith(prefix + "/"):
            continue
        parts = k.split("/")[1:]
        row = "overall" if len(parts) == 1 else "/".join(parts[:-1])
        rows.setdefault(row, {})[parts[-1]] = v
    used = [c for c in cols if any(c in r and r[c] == r[c] for r in rows.values())]
    width = max(len(r) for r in rows) if rows else 8
    lines = [f"{'':<{width}}  " + "  ".join(f"{c:>12}" for c in used)]
    for name, r in rows.items():
        lines.append(f"{name:<{width}}  " + "  ".join(f"{r.get(c, float('nan')):>12.3f}" for c in used))
    return "\n".join(lines)
