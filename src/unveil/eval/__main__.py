"""Evaluation entry point: ``python -m unveil.eval ckpt_path=<run dir | .ckpt | model dir>``.

Rebuilds the data and backbone of the run that produced the checkpoint (its
``.hydra/config.yaml``), generates greedily on the chosen split and writes ``metrics.json``
and ``predictions.jsonl`` into this evaluation's own run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from unveil.data.records import load_records
from unveil.eval.old_configs import upgrade
from unveil.utils import resolvers  # noqa: F401

log = logging.getLogger("unveil.eval")


def find_run_dir(path: Path) -> Path | None:
    for p in [path, *path.parents]:
        if (p / ".hydra" / "config.yaml").exists():
            return p
    return None


def load_for_eval(ckpt_path: str | Path, data_cfg=None):
    """(backbone, datamodule) for a run dir, a Lightning .ckpt or a save_pretrained dir."""
    from unveil.models.factory import build_backbone

    ckpt = Path(str(ckpt_path)).resolve()
    if not ckpt.exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such file or directory")
    run_dir = find_run_dir(ckpt)
    if run_dir is None and data_cfg is None:
        raise ValueError(
            f"{ckpt}: not inside a training run (no .hydra/config.yaml above it); pass data=... explicitly"
        )
    run_cfg = upgrade(OmegaConf.load(run_dir / ".hydra" / "config.yaml")) if run_dir else None
    dcfg = data_cfg if data_cfg is not None else run_cfg.data
    dm = load_records(dcfg)
    if ckpt.suffix == ".ckpt":
        model_cfg = run_cfg.model.copy()
        with open_dict(model_cfg):
            model_cfg.init_from = str(ckpt)
        peft = run_cfg.get("peft")
    else:
        from omegaconf import OmegaConf as OC

        src = ckpt / "backbone" if (ckpt / "backbone" / "config.json").exists() else ckpt
        model_cfg = (
            run_cfg.model.copy()
            if run_cfg
            else OC.create({"_target_": "unveil.models.factory.hf", "box_format": "int100"})
        )
        with open_dict(model_cfg):
            model_cfg.init_from = str(src)
        peft = None  # saved backbones have LoRA merged
    backbone = build_backbone(
        model_cfg, peft=peft, corpus=dm.corpus(), cache_dir=(run_cfg or {}).get("paths", {}).get("cache_dir")
    )
    return backbone, dm


@hydra.main(version_base="1.3", config_path="../../../conf", config_name="eval")
def main(cfg: DictConfig) -> float | None:
    from unveil.eval.evaluate import evaluate, format_table
    from unveil.utils.io import write_metrics

    backbone, dm = load_for_eval(cfg.ckpt_path, cfg.get("data"))
    samples = dm.data[cfg.split]
    if cfg.get("max_samples"):
        samples = samples[: int(cfg.max_samples)]
    out = Path(cfg.paths.output_dir)
    metrics = evaluate(
        backbone,
        samples,
        out,
        prefix="test",
        batch_size=cfg.batch_size,
        max_new_tokens=cfg.max_new_tokens,
        vocab=dm.findings(),
        coord_decoding=cfg.coord_decoding,
    )
    write_metrics(out / "metrics.json", metrics)
    print(f"\nMetrics of {cfg.ckpt_path} on the {cfg.split} split ({out}):\n" + format_table(metrics))
    return metrics.get("test/iou")


if __name__ == "__main__":
    main()
