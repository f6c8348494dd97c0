"""A run stopped mid-epoch and resumed from its checkpoint ends with the same weights as the run
that never stopped: the data order goes on where it was (the training loader's state is in the
checkpoint) and so do the random streams (sampling in RL, dropout, shuffling)."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import open_dict


class SaveAtStep(pl.Callback):
    """Writes a checkpoint after optimiser step ``step``, as ``every_n_train_steps`` would."""

    def __init__(self, step: int, path: str):
        self.step, self.path, self.done = int(step), path, False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and not self.done:
            trainer.save_checkpoint(self.path)
            self.done = True


def train_cli(*overrides: str) -> list[str]:
    """``python -m unveil.train debug=fast <overrides>`` as a subprocess command line."""
    import sys

    return [sys.executable, "-m", "unveil.train", "debug=fast", *overrides]


def run_cli(cmd: list[str]):
    """Run a command line with one torch thread per process (this test folder importable, for the
    callbacks it names); it must exit 0. Returns the CompletedProcess."""
    import os
    import subprocess
    from pathlib import Path

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def run_straight_and_resumed(common: list[str], tmp_path, step: int):
    """Run ``common`` (a ``python -m unveil.train`` command line) twice: straight through, saving a
    checkpoint after ``step`` (SaveAtStep), and resumed from that checkpoint. Returns (the snapshot
    path, the resumed run's CompletedProcess); run dirs: straight/, resumed/."""
    snap = tmp_path / f"step{step}.ckpt"
    snapshot = ["+callbacks.snap._target_=test_resume.SaveAtStep", f"+callbacks.snap.step={step}"]
    run_cli(common + [*snapshot, f"+callbacks.snap.path={snap}", f"hydra.run.dir={tmp_path / 'straight'}"])
    proc = run_cli(common + [f"ckpt_path={snap}", f"hydra.run.dir={tmp_path / 'resumed'}"])
    return snap, proc


def _weights(ckpt) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


def _assert_resume_is_exact(make_cfg, tmp_path, common: list[str], stop: int) -> None:
    """Train straight through (writing a checkpoint after step ``stop``), then resume from that
    checkpoint in another dir: both must end with bit-identical weights."""
    from unveil.train import train

    snap = tmp_path / f"step{stop}.ckpt"
    cfg = make_cfg(
        *common,
        f"+callbacks.snap._target_={__name__}.SaveAtStep",
        f"+callbacks.snap.step={stop}",
        f"+callbacks.snap.path={snap}",
    )
    train(cfg)
    straight = cfg.paths.output_dir
    cfg = make_cfg(*common, f"ckpt_path={snap}")
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "resumed")
    train(cfg)

    a, b = _weights(f"{straight}/checkpoints/last.ckpt"), _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], _weights(snap)[k])]
    assert changed, "training after the checkpoint changed no weight: the comparison would be empty"
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ after resuming, e.g. {differ[:3]}"


@pytest.mark.parametrize(
    ("stop", "stage"),
    [
        (6, ["stage=sft", "trainer.max_steps=10"]),  # stops in the second epoch, whose order is not the first's
        (6, ["stage=sft", "trainer.max_steps=10", "data.num_workers=2"]),  # loader workers run ahead of the step
        # no warm-up: a resumed run skips it, and without model.init_from GRPO's reference is the model as built
        (
            3,
            [
                "stage=grpo",
                "reward=umed",
                "trainer.max_steps=5",
                "stage.max_new_tokens=8",
                "model.vision_pretrain.steps=0",
            ],
        ),
        (
            4,
            [
                "stage=ppo",
                "reward=umed",
                "trainer.max_steps=8",
                "stage.max_new_tokens=8",
                "model.vision_pretrain.steps=0",
            ],
        ),
    ],
    ids=["sft", "sft-workers", "grpo", "ppo"],
)
def test_resumed_run_ends_where_the_uninterrupted_one_does(make_cfg, tmp_path, stop, stage):
    # 4 batches per epoch, so the stop and the resume fall inside an epoch
    common = [
        "debug=fast",
        *stage,
        "+data.max_samples.train=16",
        "eval.enabled=false",
        "trainer.val_check_interval=null",
        "+trainer.check_val_every_n_epoch=100",
    ]
    _assert_resume_is_exact(make_cfg, tmp_path, common, stop)


@pytest.mark.parametrize("kind", ["shuffle", "task_weights"])
def test_training_sampler_resumes_at_its_place_in_the_epoch_and_in_later_epochs(kind):
    """The training loader's samplers under the StatefulDataLoader: a loader restored from a state
    taken mid-epoch yields the rest of that epoch and then the same later epochs."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    from unveil.data.samplers import ResumableRandomSampler, ResumableWeightedSampler

    def loader():  # what the datamodule builds, in a new process: fresh generators, same seed
        ds, g = list(range(8)), torch.Generator().manual_seed(0)
        if kind == "shuffle":
            return StatefulDataLoader(ds, batch_size=2, sampler=ResumableRandomSampler(ds, g), generator=g)
        w = torch.tensor([1.0, 1.0, 4.0, 0.0, 2.0, 1.0, 1.0, 3.0])
        return StatefulDataLoader(ds, batch_size=2, sampler=ResumableWeightedSampler(w, 8, g))

    straight = loader()
    epochs = [[b.tolist() for b in straight] for _ in range(3)]
    assert epochs[0] != epochs[1]  # a new order each epoch
    if kind == "task_weights":
        assert all(3 not in b for e in epochs for b in e)  # weight 0: never drawn

    first = loader()
    assert [b.tolist() for b in first] == epochs[0]
    it = iter(first)
    seen = [next(it).tolist(), next(it).tolist()]  # half-way through the second epoch
    state = first.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    rest = [b.tolist() for b in resumed]
    assert seen + rest == epochs[1]
    assert [b.tolist() for b in resumed] == epochs[2]


def test_weighted_sampler_refuses_weights_it_cannot_draw_from():
    from unveil.data.samplers import ResumableWeightedSampler

    for bad in ([0.0, 0.0], [1.0, float("nan")], [1.0, -1.0]):
        with pytest.raises(ValueError, match="task_weights"):
            ResumableWeightedSampler(torch.tensor(bad), 2, torch.Generator())


@pytest.mark.parametrize("n, batch", [(10, 5), (11, 4), (3, 8)])
def test_resumable_samplers_draw_the_orders_torchs_samplers_drew(n, batch):
    """Checkpointing the loader's place must not change which data a run sees: with the same seed,
    every epoch's batches are those of torch's shuffled loader and WeightedRandomSampler, so
    the recorded tables still come out of their commands."""
    from torch.utils.data import DataLoader, WeightedRandomSampler
    from torchdata.stateful_dataloader import StatefulDataLoader

    from unveil.data.samplers import ResumableRandomSampler, ResumableWeightedSampler

    def epochs(loader):
        return [[b.tolist() for b in loader] for _ in range(4)]

    ds, w = list(range(n)), torch.rand(n, generator=torch.Generator().manual_seed(1)) + 0.1
    g, mine = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert epochs(
        StatefulDataLoader(ds, batch_size=batch, sampler=ResumableRandomSampler(ds, mine), generator=mine)
    ) == epochs(DataLoader(ds, batch_size=batch, shuffle=True, generator=g))
    ours = ResumableWeightedSampler(w, n, torch.Generator().manual_seed(0))
    theirs = WeightedRandomSampler(w, n, generator=torch.Generator().manual_seed(0))
    assert epochs(StatefulDataLoader(ds, batch_size=batch, sampler=ours)) == epochs(
        DataLoader(ds, batch_size=batch, sampler=theirs)
    )


def test_ckpt_path_last_starts_fresh_then_resumes_and_a_bad_path_fails_before_any_work(tmp_path, make_cfg):
    from unveil.train import resolve_ckpt_path

    run = tmp_path / "run"
    assert resolve_ckpt_path(None, run) is None
    assert resolve_ckpt_path("last", run) is None  # no checkpoint yet: a fresh start
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    assert resolve_ckpt_path("last", run) == str(run / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path(str(run), tmp_path / "other") == str(run / "checkpoints" / "last.ckpt")  # a run dir
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nope"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), run)

    from unveil.train import train

    cfg = make_cfg("debug=fast", f"ckpt_path={tmp_path / 'missing.ckpt'}")
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        train(cfg)
    assert not (tmp_path / "data").exists()  # failed before generating data or building a model


def test_last_ckpt_holds_the_final_step_when_it_falls_between_validations(make_cfg, tmp_path):
    """debug=fast validates every 3 steps; a 5-step run's last.ckpt is step 5, the model it saved."""
    from omegaconf import OmegaConf

    from unveil.eval import load_for_eval
    from unveil.train import train

    cfg = make_cfg("debug=fast", "trainer.max_steps=5", "eval.enabled=false")
    train(cfg)
    run = tmp_path / "run"
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # as the CLI writes it
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 5
    from_ckpt, _ = load_for_eval(run / "checkpoints" / "last.ckpt")
    saved, _ = load_for_eval(run / "backbone")
    a, b = from_ckpt.model.state_dict(), saved.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resuming_into_the_same_run_dir_keeps_the_curves_logged_before_the_checkpoint(make_cfg, tmp_path):
    """Lightning's CSVLogger deletes metrics.csv when it opens a dir that has one. The resumed run
    keeps the rows from before its checkpoint, so its curve is the uninterrupted run's, step for step."""
    import csv

    from unveil.train import train

    def losses(path):
        with open(path, newline="") as f:
            return [(int(r["step"]), float(r["train/loss"])) for r in csv.DictReader(f) if r.get("train/loss")]

    common = ["debug=fast", "trainer.max_steps=8", "trainer.log_every_n_steps=1", "eval.enabled=false"]
    snap = tmp_path / "step4.ckpt"
    train(
        make_cfg(
            *common,
            f"+callbacks.snap._target_={__name__}.SaveAtStep",
            "+callbacks.snap.step=4",
            f"+callbacks.snap.path={snap}",
        )
    )
    metrics = tmp_path / "run" / "csv" / "metrics.csv"
    straight = losses(metrics)
    assert [s for s, _ in straight] == list(range(8))

    train(make_cfg(*common, f"ckpt_path={snap}"))  # the same run dir, as ckpt_path=last re-runs would be
    assert losses(metrics) == straight


def test_drop_replayed_keeps_the_latest_attempt_at_each_step():
    """A chain of resumes that crashed before cleaning up: where the steps go back, the later rows win."""
    from unveil.utils.csv_history import drop_replayed

    attempts = [(0, range(0, 5)), (1, range(2, 6)), (2, range(3, 5))]
    rows = [{"step": str(s), "train/loss": f"{a}"} for a, steps in attempts for s in steps]
    rows.insert(3, {"step": "", "train/loss": "x"})  # a row without a step is kept where it stands
    kept = drop_replayed(rows)
    assert [(r["step"], r["train/loss"]) for r in kept if r["step"]] == [
        ("0", "0"),
        ("1", "0"),
        ("2", "1"),
        ("3", "2"),
        ("4", "2"),
    ]


def test_resumed_dpo_run_ends_where_the_uninterrupted_one_does(make_cfg, tmp_path, synthetic_dir):
    """DPO on preference records (text and visual pairs), stopped after step 3 of 6."""
    from test_dpo import _write_preference_set

    data = tmp_path / "pref"
    _write_preference_set(synthetic_dir, data)
    common = [
        "debug=fast",
        "stage=dpo",
        "data=mau_jsonl",
        f"data.root={data}",
        "data.synthetic=null",
        "data.batch_size=2",
        "+data.max_samples.train=8",
        "trainer.max_steps=6",
        "model.vision_pretrain.steps=0",
        "eval.enabled=false",
        "trainer.val_check_interval=null",
        "+trainer.check_val_every_n_epoch=100",
    ]
    _assert_resume_is_exact(make_cfg, tmp_path, common, 3)


def test_training_loader_workers_start_once_and_are_stopped_when_fit_ends(make_cfg, monkeypatch):
    """torchdata's workers are stopped when fit ends (Lightning stops only torch's), and the final
    last.ckpt is written while the loader still runs: asked for its state after fit, the loader
    would start a new set of workers."""
    import torchdata.stateful_dataloader.stateful_dataloader as sdl

    from unveil.train import train

    started, init = [], sdl._StatefulMultiProcessingDataLoaderIter.__init__

    def recording(self, *args, **kwargs):
        started.append(self)  # also keeps it from being collected, which would stop its workers
        init(self, *args, **kwargs)

    monkeypatch.setattr(sdl._StatefulMultiProcessingDataLoaderIter, "__init__", recording)
    train(make_cfg("debug=fast", "trainer.max_steps=5", "data.num_workers=2", "eval.enabled=false"))
    assert len(started) == 1  # one epoch's worth of steps: one set of workers
    assert started[0]._shutdown and not any(w.is_alive() for w in started[0]._workers)


def test_a_resumed_run_logs_on_to_its_wandb_run(make_cfg, tmp_path):
    import hydra

    from unveil.utils.wandb_run import previous_run_id, resume_kwargs

    cfg = make_cfg("logger=wandb")
    run = tmp_path / "run"
    assert previous_run_id(run) is None and resume_kwargs(cfg.logger.wandb, True) == {}  # nothing to go on with
    (run / "wandb" / "offline-run-20261202_143525-wth5k1ng").mkdir(parents=True)
    (run / "wandb" / "latest-run").symlink_to("offline-run-20261202_143525-wth5k1ng")  # what wandb leaves
    assert previous_run_id(run) == "wth5k1ng"
    assert resume_kwargs(cfg.logger.wandb, True) == {"id": "wth5k1ng", "resume": "allow"}
    assert resume_kwargs(cfg.logger.wandb, False) == {} and resume_kwargs(cfg.logger.csv, True) == {}
    logger = hydra.utils.instantiate(cfg.logger.wandb, **resume_kwargs(cfg.logger.wandb, True))  # no wandb.init yet
    assert logger._wandb_init["id"] == "wth5k1ng" and logger._wandb_init["resume"] == "allow"


def test_ranks_take_disjoint_shares_of_one_order_padded_as_distributed_sampler_pads():
    from unveil.data.samplers import ResumableRandomSampler, ResumableWeightedSampler

    ds = list(range(10))
    shards = [list(ResumableRandomSampler(ds, torch.Generator().manual_seed(0), rank=r, world=4)) for r in range(4)]
    assert [len(x) for x in shards] == [3, 3, 3, 3]  # 10 padded to 12
    assert set(i for x in shards for i in x) == set(ds)  # every sample is seen
    (alone,) = [list(ResumableRandomSampler(ds, torch.Generator().manual_seed(0)))]
    assert [alone[i] for i in range(0, 10, 4)] == shards[0][:3] and shards[1] == [alone[1], alone[5], alone[9]]
    w = torch.ones(10)
    two = [list(ResumableWeightedSampler(w, 10, torch.Generator().manual_seed(0), rank=r, world=2)) for r in range(2)]
    one = list(ResumableWeightedSampler(w, 10, torch.Generator().manual_seed(0)))
    assert two[0] == one[0::2] and two[1] == one[1::2]


def test_drop_replayed_sees_a_restart_behind_a_row_without_a_step():
    from unveil.utils.csv_history import drop_replayed

    rows = (
        [{"step": str(s), "v": "old"} for s in range(4)]
        + [{"step": "", "v": "hparams"}]
        + [{"step": str(s), "v": "new"} for s in range(2, 5)]
    )
    assert [(r["step"], r["v"]) for r in drop_replayed(rows)] == [
        ("0", "old"),
        ("1", "old"),
        ("", "hparams"),
        ("2", "new"),
        ("3", "new"),
        ("4", "new"),
    ]
