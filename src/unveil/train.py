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


def check_config(cfg: DictConfig) -> None:
    """Fail before any work on a typo: every component's ``_target_`` and keys (data and its adapter,
    model, LoRA, stage), the optimiser keys and the scheduler, each error listing the valid choices."""
    from unveil.models.factory import check_model
    from unveil.stages.optim import check_optim
    from unveil.utils.plug import as_dict, check, locate

    check(as_dict(cfg.data), "data", group="data")
    check_model(cfg.model)
    if cfg.get("peft") and cfg.peft.get("_target_"):
        check(as_dict(cfg.peft), "peft", group="peft")
    stage = locate(cfg.stage.get("_target_"), "stage", group="stage")
    check(as_dict(cfg.stage), "stage", group="stage", given=("backbone", "rewards"))
    check_optim(cfg.stage.get("optim"))
    if getattr(stage, "needs_rewards", False):
        for name, head in as_dict(cfg.get("reward")).items():
            if isinstance(head, dict) and "_target_" in head:
                check(head, f"reward.{name}", group="reward", given=("weight", "norm", "missing"))


def build_stage(cfg: DictConfig, backbone, records):
    """The stage module ``stage._target_`` names; a stage class that ``needs_rewards`` (RL) also gets
    the ``reward`` group's heads, bound to this backbone and the data's finding vocabulary."""
    from unveil.utils.plug import as_dict, instantiate, locate

    kwargs = {"backbone": backbone}
    if getattr(locate(cfg.stage.get("_target_"), "stage", group="stage"), "needs_rewards", False):
        from unveil.rewards import build_rewards

        kwargs["rewards"] = build_rewards(cfg.reward, backbone=backbone, vocab=records.findings())
    return instantiate(as_dict(cfg.stage), "stage", group="stage", **kwargs)


def _is_checkpoint(path: Path) -> bool:
    """A ``.ckpt`` file, or the folder of a sharded one (trainer=fsdp: one shard per rank and meta.pt)."""
    return path.is_file() or (path / "meta.pt").is_file()


def resolve_ckpt_path(value, output_dir: Path) -> str | None:
    """What ``ckpt_path`` resumes from: a ``.ckpt`` file, a run dir (its ``checkpoints/last.ckpt``), or
    ``last``: this run's own ``last.ckpt`` if it has one, else a fresh start, so that a preempted
    sweep re-run with fixed run dirs picks every job up where it stopped. Checked before any work."""
    if value in (None, ""):
        return None
    if str(value) == "last":
        last = output_dir / "checkpoints" / "last.ckpt"
        if _is_checkpoint(last):
            log.info("ckpt_path=last: resuming from %s", last)
            return str(last)
        log.info("ckpt_path=last: %s has no checkpoint yet, starting fresh", last.parent)
        return None
    path = Path(str(value))
    if path.is_dir() and _is_checkpoint(path / "checkpoints" / "last.ckpt"):
        return str(path / "checkpoints" / "last.ckpt")
    if not _is_checkpoint(path):
        raise FileNotFoundError(
            f"ckpt_path={value}: not a checkpoint file, a run dir with checkpoints/last.ckpt, or 'last'"
        )
    return str(path)


def _build_trainer(cfg: DictConfig, module, resuming: bool):
    """(trainer, loggers, CSV history) for ``module``; the loggers have logged the resolved config."""
    from unveil.utils.cluster import trainer_plugins
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
    # a SLURM job of hydra/launcher=slurm: Lightning's SLURM environment, submitit requeues (utils/cluster.py)
    manual.update(trainer_plugins(cfg.trainer, cfg.get("ckpt_path")))
    trainer = hydra.utils.instantiate(cfg.trainer, logger=loggers or False, callbacks=callbacks, **manual)
    hparams = scrub(OmegaConf.to_container(cfg, resolve=True))
    for lg in loggers:
        lg.log_hyperparams(hparams)
    return trainer, loggers, history


def _final_eval(cfg: DictConfig, backbone, records, out: Path, metrics: dict, loggers, step: int) -> None:
    """Score the trained backbone on ``eval.split`` into ``metrics`` (predictions.jsonl into ``out``),
    log the test/ metrics and print the table. Every rank of a distributed run calls it (each
    generates its share); rank 0 alone scores, logs and prints."""
    from unveil.eval.evaluate import evaluate, format_table
    from unveil.utils.dist import rank

    split = cfg.eval.split
    if not records.data.get(split):  # a data set released as training pairs only (MMedPO, STLLaVA-Med DPO)
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
            records.data[split],
            out,
            prefix="test",
            batch_size=cfg.eval.batch_size,
            max_new_tokens=cfg.eval.max_new_tokens,
            vocab=records.findings(),
            coord_decoding=cfg.eval.get("coord_decoding", "argmax"),
            progress=rank() == 0,
        )
    )
    if rank() != 0:
        return
    for lg in loggers:
        lg.log_metrics({k: v for k, v in metrics.items() if k.startswith("test/") and v == v}, step=step)
    print(f"\nFinal metrics on the {split} split ({out}):\n" + format_table(metrics))


def _paper_fidelity(cfg: DictConfig, out: Path) -> None:
    """The experiment's paper preset on a real backbone (``paper.values``; the run dir's
    ``.hydra/config.yaml`` is rewritten with it, so ``unveil.eval`` rebuilds what trained), then a
    warning per deviation from the paper (``deviations``; docs/fidelity.md)."""
    from unveil.utils.paper import apply_paper_preset, log_deviations

    if apply_paper_preset(cfg) and (out / ".hydra" / "config.yaml").is_file():
        OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    log_deviations(cfg)


def train(cfg: DictConfig) -> dict:
    import pytorch_lightning as pl
    import torch

    from unveil.data.datamodule import UnveilDataModule
    from unveil.data.records import load_records
    from unveil.models.factory import build_backbone
    from unveil.utils.cluster import apply_num_threads
    from unveil.utils.io import write_metrics
    from unveil.utils.wandb_run import finish_runs

    out = Path(cfg.paths.output_dir)
    _paper_fidelity(cfg, out)
    check_config(cfg)
    apply_num_threads(cfg.get("num_threads"))  # a job's share of the cores when jobs run side by side
    torch.set_float32_matmul_precision("high")
    pl.seed_everything(cfg.seed, workers=True)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), out)

    # records -> backbone -> stage module -> datamodule(records, module.collator) -> trainer
    records = load_records(cfg.data)
    backbone = build_backbone(
        cfg.model,
        peft=cfg.get("peft"),
        records=records,
        cache_dir=cfg.paths.cache_dir,
        resuming=bool(ckpt_path),
        seed=cfg.seed,
    )
    if cfg.eval.enabled:  # a decoding this backbone cannot do fails now, not after training
        from unveil.models.generation import coord_processor

        coord_processor(backbone, cfg.eval.get("coord_decoding", "argmax"))
    module = build_stage(cfg, backbone, records)
    dm = UnveilDataModule(records, collate_fn=module.collator)
    trainer, loggers, history = _build_trainer(cfg, module, resuming=bool(ckpt_path))
    try:
        metrics = _fit_and_evaluate(cfg, trainer, module, dm, backbone, loggers, history, ckpt_path)
    except BaseException:
        finish_runs(loggers, failed=True)  # marked failed now, and the next job of a multirun gets its own run
        raise
    finish_runs(loggers, failed=False)
    if trainer.is_global_zero:
        write_metrics(out / "metrics.json", metrics)
    return metrics


def _fit_and_evaluate(cfg: DictConfig, trainer, module, dm, backbone, loggers, history, ckpt_path):
    """Fit, save ``backbone/`` (rank 0) and score the test split (sharded over the ranks); the run's metrics."""
    from unveil.stages.guard import assert_finite_weights
    from unveil.utils.fsdp import full_params

    out = Path(cfg.paths.output_dir)
    # our checkpoints hold plain tensors only (RNG states, held RL groups included), so resuming
    # never unpickles code
    trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)
    history.finish()

    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    metrics.update(dm.records.counts())
    metrics.update(backbone.build_metrics)
    # FSDP: the whole model gathered on every rank for the check, the export and the evaluation
    with full_params(trainer):
        assert_finite_weights(backbone.model)
        if trainer.is_global_zero:
            backbone.save(out / "backbone")
        if cfg.eval.enabled:  # every rank generates its share of the split, rank 0 scores it
            _final_eval(cfg, backbone, dm.records, out, metrics, loggers, trainer.global_step)
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
