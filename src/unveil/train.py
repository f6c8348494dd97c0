"""Training entry point: ``python -m unveil.train [overrides]``.

Composes data -> backbone -> stage -> trainer from config, fits, saves the backbone
(``<run>/backbone``, loadable with ``model=hf`` or ``model.init_from``), evaluates on the
test split and writes ``metrics.json`` and ``predictions.jsonl`` into the run directory.
Returns ``cfg.optimized_metric`` for sweepers.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from unveil.utils import resolvers  # noqa: F401  (registers ${unveil.*} resolvers)

log = logging.getLogger("unveil.train")


def build_stage(cfg: DictConfig, backbone, datamodule):
    """Instantiate the stage module; RL stages also get their reward heads."""
    kwargs = {"backbone": backbone}
    if cfg.stage.get("needs_rewards", False):
        from unveil.rewards import build_rewards

        kwargs["rewards"] = build_rewards(cfg.reward, backbone=backbone, vocab=datamodule.findings())
    stage_cfg = OmegaConf.to_container(cfg.stage, resolve=True)
    stage_cfg.pop("needs_rewards", None)
    # _partial_: objects like the backbone must not pass through OmegaConf (it would copy them)
    return hydra.utils.instantiate(stage_cfg, _partial_=True, _convert_="all")(**kwargs)


def resolve_ckpt_path(value, output_dir: Path) -> str | None:
    """What ``ckpt_path`` resumes from: a ``.ckpt`` file, a run dir (its ``checkpoints/last.ckpt``), or
    ``last``: this run's own ``last.ckpt`` if it has one, else a fresh start, so that a preempted
    sweep re-run with fixed run dirs picks every job up where it stopped. Checked before any work."""
    if value in (None, ""):
        return None
    if str(value) == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if last.is_file():
            log.info("ckpt_path=last: resuming from %s", last)
            return str(last)
        log.info("ckpt_path=last: %s has no checkpoint yet, starting fresh", last.parent)
        return None
    path = Path(str(value))
    if path.is_dir() and (path / "checkpoints" / "last.ckpt").is_file():
        return str(path / "checkpoints" / "last.ckpt")
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={value}: not a checkpoint file, a run dir with checkpoints/last.ckpt, or 'last'"
        )
    return str(path)


def _warm_up_vision(cfg: DictConfig, backbone, dm, ckpt_path: str | None) -> dict:
    """Warm a tower built in code up on the training split's boxes (``model.vision_pretrain``) at the
    start of a fresh run; returns the warm-up's stats (empty when it does not run)."""
    warmup = dict(cfg.model.get("vision_pretrain") or {})
    built_in_code = cfg.model.kind == "tiny_llava"  # checkpoints bring their own pretrained tower
    if not (built_in_code and warmup.get("steps", 0) > 0):
        return {}
    if ckpt_path and not cfg.model.get("init_from") and not str(cfg.stage.get("_target_", "")).endswith("SFTModule"):
        # the checkpoint restores the policy, but a reference model (KL anchor) is taken from the model as built
        log.warning(
            "resuming %s without model.init_from: the first run warmed the vision tower up before "
            "taking its reference model, the resumed run does not, so its reference differs. Start "
            "RL/DPO from model.init_from=<SFT run>, which a resume reloads.",
            cfg.stage.get("_target_"),
        )
    if cfg.model.get("init_from") or ckpt_path:
        return {}
    # a model built in code has no pretrained vision encoder: warm its tower up first
    from unveil.models.vision_pretrain import pretrain_vision_tower

    if any(s.task == "localize" and s.images for s in dm.data["train"]):
        return pretrain_vision_tower(
            backbone, dm.data["train"], seed=cfg.seed, val_samples=dm.data.get("val"), **warmup
        )
    log.warning(
        "model.vision_pretrain skipped: the training split has no 'localize' records to learn "
        "lesion features from, so the tower starts untrained"
    )
    return {}


def _build_trainer(cfg: DictConfig, module, resuming: bool):
    """(trainer, loggers, CSV history) for ``module``; the loggers have logged the resolved config."""
    from unveil.utils.csv_history import CSVHistory
    from unveil.utils.secrets import scrub
    from unveil.utils.wandb_run import resume_kwargs

    # a resume into this run dir logs on to the same wandb run
    loggers = [hydra.utils.instantiate(c, **resume_kwargs(c, resuming)) for c in (cfg.get("logger") or {}).values()]
    history = CSVHistory(loggers, resuming=resuming)  # a resume into this dir keeps its earlier curves
    callbacks = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    # Stages that step their own optimiser (RL: several updates per rollout) clip gradients
    # themselves; Lightning refuses gradient_clip_val under manual optimisation.
    manual = {} if module.automatic_optimization else {"gradient_clip_val": None}
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **manual)
    hparams = scrub(OmegaConf.to_container(cfg, resolve=True))
    for lg in loggers:
        lg.log_hyperparams(hparams)
    return trainer, loggers, history


def _final_eval(cfg: DictConfig, backbone, dm, out: Path, metrics: dict, loggers, step: int) -> None:
    """Score the trained backbone on ``eval.split`` into ``metrics`` (predictions.jsonl into ``out``),
    log the test/ metrics and print the table."""
    from unveil.eval.evaluate import evaluate, format_table

    split = cfg.eval.split
    if not dm.data.get(split):  # a data set released as training pairs only (MMedPO, STLLaVA-Med DPO)
        log.warning(
            "eval.split=%s: this data set has no %s split (data.splits.%s is null or empty), so there is "
            "no evaluation; metrics.json holds the training metrics. Evaluate with `python -m unveil.eval` "
            "on the data set's own VQA table.",
            split,
            split,
            split,
        )
        return
    metrics.update(
        evaluate(
            backbone,
            dm.data[split],
            out,
            prefix="test",
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            vocab=dm.findings(),
            coord_decoding=cfg.eval.get("coord_decoding", "argmax"),
        )
    )
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if k.startswith("test/") and v == v}, step=step)
    print(f"\nFinal metrics on the {split} split ({out}):\n" + format_table(metrics))


def train(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl
    import torch

    from unveil.models.factory import build_backbone, check_model
    from unveil.stages.guard import assert_finite_weights
    from unveil.stages.optim import check_optim
    from unveil.utils.io import write_metrics

    check_model(cfg.model)  # a typo in the model kind, an optimiser key or the scheduler fails before any work
    check_optim(cfg.stage.get("optim"))
    torch.set_float32_matmul_precision("high")
    pl.seed_everything(cfg.seed, workers=True)
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out)

    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup()
    backbone = build_backbone(cfg.model, peft=cfg.get("peft"), corpus=dm.corpus(), cache_dir=cfg.paths.cache_dir)
    if cfg.eval.enabled:  # a decoding this backbone cannot do fails now, not after training
        from unveil.models.generation import coord_processor

        coord_processor(backbone, cfg.eval.get("coord_decoding", "argmax"))
    warmup_stats = _warm_up_vision(cfg, backbone, dm, ckpt_path)
    module = build_stage(cfg, backbone, dm)
    dm.collate_fn, dm.eval_collate_fn = module.collator, getattr(module, "eval_collator", None)
    trainer, loggers, history = _build_trainer(cfg, module, resuming=bool(ckpt_path))

    # our checkpoints hold plain tensors only (RNG states, held RL groups included), so resuming
    # never unpickles code
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    history.finish()

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update({f"data/skipped_{k}": v for k, v in dm.skipped.items()})
    metrics.update(warmup_stats)
    assert_finite_weights(backbone.model)
    if trainer.is_global_zero:
        backbone.save(out / "backbone")
        if cfg.eval.enabled:
            _final_eval(cfg, backbone, dm, out, metrics, loggers, trainer.global_step)
        write_metrics(out / "metrics.json", metrics)
    return metrics


@hydra.main(version_base="1.3", config_path="../../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except BaseException:
        log.exception("the run failed")  # so the job's own train.log ends with its traceback
        raise
    value = metrics.get(cfg.get("optimized_metric") or "")
    return float(value) if value is not None else None


if __name__ == "__main__":
    main()
