"""Preference-data builders: ``python -m unveil.curate builder=<name> [overrides]``.

Reads records through the format adapters (the ``data`` config group, as training does:
``data=mau_jsonl data.root=<dir>``, or the synthetic default, generated if missing), runs the
builder on the ``build_splits`` and writes native MAU JSONL (``<split>.jsonl``, images
linked or copied next to it) to ``out_dir``; the other splits are passed through unchanged,
so ``python -m unveil.train stage=dpo data=mau_jsonl data.root=<out_dir>`` trains and
evaluates on the result. Prints a summary and saves it as ``summary.json``.

Builders (``conf/builder/``): ``hallucination`` (text pairs), ``lesion_noise`` (visual
pairs), ``relevance_weights`` (weights for existing pairs), ``self_training`` (STLLaVA-Med
self-questioning), ``mmedpo`` (text + visual pairs, weighted), ``mau`` (UMed-LVLM's MAU
records from segmentation / detection data sets: it reads ``builder.sources`` instead of
``data``, and builds every split it makes, split by patient).
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from unveil.utils import resolvers  # noqa: F401  (registers ${unveil.*} resolvers)

log = logging.getLogger("unveil.curate")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".nii", ".nii.gz")


def _limit(value, split: str):
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return int(value)
    v = dict(value).get(split)
    return int(v) if v is not None else None


def _image_folder_inputs(cfg: DictConfig) -> tuple[Path, dict]:
    """(folder, {"train": [Sample]}): one record per image under ``input_images``, no question yet."""
    from unveil.data.schema import Sample

    src = Path(str(cfg.input_images))
    files = sorted(src.rglob("*") if src.is_dir() else src.parent.glob(src.name))
    files = [f for f in files if f.is_file() and f.name.lower().endswith(IMAGE_SUFFIXES)]
    if not files:
        raise FileNotFoundError(f"input_images={src}: no images found")
    root = src if src.is_dir() else src.parent
    samples = [
        Sample(
            id=f.relative_to(root).with_suffix("").as_posix().replace("/", "_"),
            images=[str(f.resolve())],
            messages=[{"role": "user", "content": "<image>\n"}],
            meta={"source": "images"},
        )
        for f in files
    ]
    n = _limit(cfg.get("max_samples"), "train")
    return root.resolve(), {"train": samples[:n] if n else samples}


def load_inputs(cfg: DictConfig) -> tuple[Path, dict]:
    """(input root, {split: [Sample]}) from the ``data`` group or an ``input_images`` folder."""
    from unveil.utils.plug import instantiate

    if cfg.get("input_images"):
        return _image_folder_inputs(cfg)
    data = cfg.data
    root = Path(str(data.root))
    if data.get("synthetic"):
        from unveil.data.synthetic import make

        make(instantiate(data.synthetic, "data.synthetic"), root, progress=bool(cfg.progress))
    read = instantiate(data.adapter, "data.adapter")
    tasks = set(cfg.tasks) if cfg.get("tasks") else None
    out = {}
    for split, rel in (data.splits or {}).items():
        if rel is None:
            continue
        path = root / str(rel)
        if not path.exists():
            log.warning("input split %s: %s not found, skipped", split, path)
            continue
        samples = read(
            path,
            root=root,
            on_bad_record=data.get("on_bad_record", "raise"),
            check_images=bool(data.get("check_images", True)),
            max_tokens=data.get("max_tokens"),
        )
        if samples.skipped:
            log.warning("input split %s: %d bad record(s) skipped", split, samples.skipped)
        if tasks is not None:
            samples = [s for s in samples if s.task in tasks]
        n = _limit(cfg.get("max_samples"), split)
        out[split] = samples[:n] if n else samples
    if not out:
        raise FileNotFoundError(
            f"no input splits found under {root} (data.splits={OmegaConf.to_container(data.splits)})"
        )
    return root.resolve(), out


def _write_split(path: Path, outcomes, images, counts: Counter, written: list) -> None:
    from unveil.curate.common import NotRepresentable, to_record

    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for oc in outcomes:
            if oc.sample is None:
                counts[f"skipped/{oc.skipped or 'unknown'}"] += 1
                continue
            try:
                rec = to_record(oc.sample, images)
            except NotRepresentable:
                counts["skipped/not_single_turn"] += 1
                continue
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            counts["written"] += 1
            written.append(oc.sample)
    os.replace(tmp, path)


def format_summary(summary: dict) -> str:
    lines = [f"unveil.curate builder={summary['builder']} -> {summary['out_dir']}"]
    for split, c in summary["splits"].items():
        skipped = {k.split("/", 1)[1]: v for k, v in c.items() if k.startswith("skipped/")}
        extra = {
            k: v
            for k, v in c.items()
            if k not in ("read", "written", "weight_mean", "mode") and not k.startswith("skipped/")
        }
        line = (
            f"  {split:<6} {c.get('mode', 'built'):<11} read {c.get('read', 0):>6}  written {c.get('written', 0):>6}  "
            f"skipped {sum(skipped.values()):>6}"
        )
        if "weight_mean" in c:
            line += f"  mean weight {c['weight_mean']:.3f}"
        lines.append(line)
        if skipped:
            lines.append("         skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
        if extra:
            lines.append("         " + ", ".join(f"{k} {v}" for k, v in sorted(extra.items())))
    return "\n".join(lines)


def _context(cfg: DictConfig, out: Path, root: Path, splits: dict, images):
    """The builders' shared state: findings of all splits, the text corpus of train (or the first split)."""
    from unveil.curate.common import Context

    findings = sorted({f for ss in splits.values() for s in ss for f in s.findings})
    corpus_split = "train" if "train" in splits else next(iter(splits))
    return Context(
        out_dir=out,
        images=images,
        seed=int(cfg.seed),
        input_root=root,
        findings=findings,
        corpus=[m["content"] for s in splits[corpus_split] for m in s.messages],
        model_cfg=cfg.get("model"),
        cache_dir=str(cfg.paths.cache_dir),
        device=str(cfg.get("device", "auto")),
    )


def _build_split(builder, split: str, samples: list, ctx, path: Path, progress: bool) -> Counter:
    """Run the builder on one split and write it to ``path``; returns the split's counts."""
    from tqdm.auto import tqdm

    counts: Counter = Counter(read=len(samples))
    written: list = []
    ctx.split = split
    builder.stats.clear()
    bar = tqdm(total=len(samples), desc=f"{builder.name} [{split}]", disable=not progress, leave=False)
    ctx.advance = bar.update
    _write_split(path, builder.run(samples, ctx), ctx.images, counts, written)
    bar.close()
    builder.finish(ctx, written)
    counts.update(builder.stats)
    counts["mode"] = "built"
    pairs = [s for s in written if s.rejected is not None]
    if pairs:
        counts["weight_mean"] = round(sum(s.weight for s in pairs) / len(pairs), 4)
    return counts


def _pass_through(samples: list, images, path: Path) -> Counter:
    """Write a split the builder does not touch unchanged (images linked or copied as for built ones)."""
    from unveil.curate.common import Outcome

    counts: Counter = Counter(read=len(samples))
    _write_split(path, (Outcome(s) for s in samples), images, counts, [])
    counts["mode"] = "passthrough"
    return counts


def curate(cfg: DictConfig) -> dict:
    """Run one builder as configured; returns the summary (also written to summary.json)."""
    from unveil.curate.common import ImageStore
    from unveil.utils.secrets import scrub

    if cfg.get("num_threads"):
        import torch

        torch.set_num_threads(int(cfg.num_threads))
    out = Path(str(cfg.out_dir)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from unveil.utils.plug import instantiate

    builder = instantiate(cfg.builder, "builder", group="builder")  # a typo in a key (a judge's too): a clear error
    # a builder with its own inputs (builder=mau: segmentation sources) makes every split it returns
    own = hasattr(builder, "inputs")
    root, splits = builder.inputs(out, int(cfg.seed), bool(cfg.progress)) if own else load_inputs(cfg)
    images = ImageStore(out, root, mode=cfg.get("images", "link"))
    ctx = _context(cfg, out, root, splits, images)
    build = list(splits) if own else [s for s in cfg.build_splits if s in splits]
    if not build:
        raise ValueError(f"build_splits={list(cfg.build_splits)} matches none of the input splits {list(splits)}")
    summary = {
        "builder": builder.name,
        "out_dir": str(out),
        "input_root": str(root),
        "seed": int(cfg.seed),
        "builder_config": scrub(OmegaConf.to_container(cfg.builder, resolve=True)),
        "splits": {},
    }
    for split, samples in splits.items():
        path = out / f"{split}.jsonl"
        if split in build:
            counts = _build_split(builder, split, samples, ctx, path, bool(cfg.progress))
        elif cfg.passthrough:
            counts = _pass_through(samples, images, path)
        else:
            continue
        summary["splits"][split] = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in counts.items()}
    if ctx._backbone is not None:
        summary["model"] = scrub(OmegaConf.to_container(cfg.model, resolve=True))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    print("\n" + format_summary(summary))
    return summary


@hydra.main(version_base="1.3", config_path="../../../conf", config_name="curate")
def main(cfg: DictConfig) -> None:
    curate(cfg)


if __name__ == "__main__":
    main()
