"""Two-process DDP on the CPU (gloo): an RL run with dynamic sampling trains, validates and is
evaluated without a collective mismatch. Each rank logs its own per-head validation stats; only
synced values (``val/loss``) must be logged by every rank, and rank 0 alone scores the test split."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_resume import run_cli, run_straight_and_resumed, train_cli


def test_grpo_with_dynamic_sampling_under_two_process_ddp(tmp_path):
    out = tmp_path / "run"
    cmd = train_cli(
        "stage=grpo",
        "reward=umed",
        "stage.fill_batch=true",
        "trainer.max_steps=3",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "data.max_samples.test=8",
        "stage.max_new_tokens=12",
        f"hydra.run.dir={out}",
    )
    run_cli(cmd)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/presence_acc" in metrics and "val/loss" in metrics
    assert 0 <= metrics["train/kept_frac"] <= 1
    # the checkpoint holds each rank's groups waiting for the refill (rank 0 alone writes it)
    state = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["grpo_fill_batch"]
    assert len(state["held_by_rank"]) == 2


def _gather_held(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from unveil.utils.dist import all_gather_objects

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        held = [{"texts": [f"rank {rank}"] * (rank + 1), "group": torch.full((rank + 1,), rank)}]
        torch.save(all_gather_objects(held), f"{out_dir}/gathered{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_gather_objects_gives_every_rank_every_ranks_held_groups(tmp_path):
    """What GRPO's checkpoint stores under DDP: the held groups of each rank, in rank order."""
    import torch.multiprocessing as mp

    from unveil.utils.dist import all_gather_objects

    assert all_gather_objects({"x": 1}) == [{"x": 1}]  # no process group: just this process's
    mp.spawn(_gather_held, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        gathered = torch.load(tmp_path / f"gathered{rank}.pt", weights_only=True)
        assert [g[0]["texts"] for g in gathered] == [["rank 0"], ["rank 1", "rank 1"]]
        assert torch.equal(gathered[1][0]["group"], torch.tensor([1, 1]))


def test_dpo_under_two_process_ddp(tmp_path, synthetic_dir):
    """DPO logs a fixed key set on every rank (margins, accuracies, weights), so it should sync
    cleanly; this checks it, and that rank 0's test evaluation does not wait for rank 1."""
    from test_dpo import _write_preference_set

    data, out = tmp_path / "pref", tmp_path / "run"
    _write_preference_set(synthetic_dir, data)
    cmd = train_cli(
        "stage=dpo",
        "stage.weight_norm=mmedpo",
        "data=mau_jsonl",
        f"data.root={data}",
        "data.synthetic=null",
        "data.num_workers=0",
        "data.batch_size=2",
        "trainer.max_steps=3",
        "trainer.val_check_interval=3",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "data.max_samples.test=8",
        f"hydra.run.dir={out}",
    )
    run_cli(cmd)
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/presence_acc" in metrics and "val/rewards/margins" in metrics


@pytest.mark.parametrize(
    "weights", ["data.task_weights=null", "data.task_weights.localize=3.0"], ids=["shuffle", "task_weights"]
)
def test_two_process_grpo_resumed_mid_epoch_ends_where_the_uninterrupted_run_does(tmp_path, weights):
    """Stopped after step 5 of 12 (two batches per epoch per rank, so in the third epoch) and
    resumed: every rank goes on with its own next batch and random stream."""
    common = train_cli(
        "stage=grpo",
        "reward=umed",
        "trainer.max_steps=12",
        "stage.max_new_tokens=8",
        "model.vision_pretrain.steps=0",
        "eval.enabled=false",
        weights,
        "+data.max_samples.train=16",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "+trainer.strategy=ddp",
        "trainer.val_check_interval=null",
        "+trainer.check_val_every_n_epoch=100",
    )
    snap, proc = run_straight_and_resumed(common, tmp_path, 5)
    a, b, s = (
        torch.load(p, map_location="cpu", weights_only=True)
        for p in (
            tmp_path / "straight" / "checkpoints" / "last.ckpt",
            tmp_path / "resumed" / "checkpoints" / "last.ckpt",
            snap,
        )
    )
    assert a["global_step"] == b["global_step"] == 12 and len(s["rng_by_rank"]) == 2
    assert any(not torch.equal(a["state_dict"][k], s["state_dict"][k]) for k in a["state_dict"])
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])


_EVAL: dict = {}  # the backbone and samples the forked ranks inherit (fork: nothing is pickled)


def _evaluate_rank(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from unveil.eval.evaluate import evaluate

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        bb, samples = _EVAL["bb"], _EVAL["samples"]
        out = Path(out_dir) / f"rank{rank}"
        metrics = evaluate(bb, samples, out, progress=False, batch_size=4, max_new_tokens=24)
        torch.save(metrics, Path(out_dir) / f"metrics{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_evaluation_sharded_over_two_ranks_equals_the_one_process_evaluation(make_cfg, tmp_path):
    """12 test samples in batches of 4: rank 0 generates batches 0 and 2, rank 1 batch 1; rank 0
    scores the gathered predictions into the same metrics and predictions.jsonl as one process."""
    import torch.multiprocessing as mp

    from unveil.data.records import load_records
    from unveil.eval.evaluate import evaluate
    from unveil.models.factory import build_backbone

    cfg = make_cfg("debug=fast")
    records = load_records(cfg.data)
    bb = build_backbone(cfg.model, corpus=records.corpus(), cache_dir=cfg.paths.cache_dir)
    samples = records.data["test"][:12]
    assert len({s.task for s in samples}) > 1
    single = evaluate(bb, samples, tmp_path / "single", progress=False, batch_size=4, max_new_tokens=24)
    _EVAL.update(bb=bb, samples=samples)
    mp.start_processes(
        _evaluate_rank, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    sharded = torch.load(tmp_path / "metrics0.pt", weights_only=True)
    assert torch.load(tmp_path / "metrics1.pt", weights_only=True) == {}  # rank 1 only generates
    assert sharded.keys() == single.keys() and single
    assert all(sharded[k] == single[k] or (sharded[k] != sharded[k] and single[k] != single[k]) for k in single)
    assert (tmp_path / "rank0" / "predictions.jsonl").read_text() == (
        tmp_path / "single" / "predictions.jsonl"
    ).read_text()
    assert not (tmp_path / "rank1" / "predictions.jsonl").exists()
