"""How much IoU could RL on a localisation reward buy over a trained model? Best-of-G headroom.

RL with a reward scored against the ground-truth box can only move the policy towards answers it
already samples. This measures that room on held-out studies, without training: for each abnormal
localisation study, the matched IoU (the metric of ``unveil.eval``) of the greedy answer, the mean
over G sampled answers, and the best of the G (an oracle: it picks with the ground truth). Split by
the number of ground-truth boxes, because a lesion the model never samples is out of RL's reach.

    python experiments/rl_headroom.py logs/umed_ablation/sft [--split test] [--n 300] [--G 8] [--temperatures 0.7 1.0]

Several runs are scored on the studies of the first one (its config's data and split), e.g. an RL
run on the very prompts it trained on and the SFT it started from:

    python experiments/rl_headroom.py <rl run> logs/umed_ablation/sft --split train

Prints a Markdown table; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def study_iou(text: str, sample, box_format, vocab, frame=None) -> float:
    from unveil.data.boxes import match_boxes
    from unveil.eval.parse import parse_answer

    pred = parse_answer(text, box_format, vocab, frame)
    pairs, m = match_boxes(pred.boxes, sample.boxes)
    per_gt = np.zeros(len(sample.boxes))
    for p, g in pairs:
        per_gt[g] = m[p, g]
    return float(per_gt.mean())


def headroom(backbone, samples, vocab, G: int, temperature: float, batch_size: int = 32, max_new_tokens: int = 48):
    """{n_gt_boxes: {"greedy": [...], "sampled": [...], "best": [...]}} over abnormal localisation studies."""
    from unveil.data.collate import PromptCollator
    from unveil.models.generation import generate

    collate, out = PromptCollator(backbone), collections.defaultdict(lambda: collections.defaultdict(list))
    from unveil.data.frames import answer_frame

    for i in range(0, len(samples), batch_size):
        chunk = samples[i : i + batch_size]
        batch = collate(chunk)
        greedy = generate(backbone, batch, max_new_tokens=max_new_tokens)["texts"]
        sampled = generate(
            backbone,
            batch,
            max_new_tokens=max_new_tokens,
            do_sample=True,
            num_return_sequences=G,
            temperature=temperature,
        )["texts"]
        for j, s in enumerate(chunk):
            scores = [
                study_iou(t, s, backbone.box_format, vocab, answer_frame(backbone, s))
                for t in sampled[j * G : (j + 1) * G]
            ]
            row = out[len(s.boxes)]
            row["greedy"].append(study_iou(greedy[j], s, backbone.box_format, vocab, answer_frame(backbone, s)))
            row["sampled"].append(float(np.mean(scores)))
            row["best"].append(max(scores))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path, nargs="+", help="training run dirs; all are scored on the first one's studies")
    ap.add_argument("--split", default="test")
    ap.add_argument("--n", type=int, default=300, help="abnormal localisation studies (the first n of the split)")
    ap.add_argument("--G", type=int, default=8, help="samples per study")
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sys.path.insert(0, str(ROOT / "src"))
    from unveil.eval.__main__ import load_for_eval

    backbone, dm = load_for_eval(a.runs[0])
    models = [(a.runs[0], backbone)] + [(r, load_for_eval(r)[0]) for r in a.runs[1:]]
    samples = [s for s in dm.data[a.split] if s.task == "localize" and s.boxes][: a.n]
    lines = [
        f"Best-of-G headroom on {len(samples)} abnormal localisation studies of `{a.split}` (the data of "
        f"`{a.runs[0]}`), G={a.G} (matched IoU; `best` picks with the ground truth, an upper bound for a "
        "GT-scored reward).",
        "",
        "| run | T | GT boxes | studies | greedy | sampled (mean of G) | best of G |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, bb in models:
        for t in a.temperatures:
            torch.manual_seed(a.seed)
            res = headroom(bb, samples, dm.findings(), a.G, t)
            pooled = {k: sum((r[k] for r in res.values()), []) for k in ("greedy", "sampled", "best")}
            for k, r in sorted(res.items()) + [("all", pooled)]:
                lines.append(
                    f"| `{run}` | {t} | {k} | {len(r['greedy'])} | {np.mean(r['greedy']):.3f} | "
                    f"{np.mean(r['sampled']):.3f} | {np.mean(r['best']):.3f} |"
                )
    text = "\n".join(lines)
    print(text)
    if a.out:
        a.out.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
