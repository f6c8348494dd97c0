"""Training models at real scale on the tiny ones: fp32 master weights for a model loaded in bf16,
and adapter-only checkpoints under LoRA (src/unveil/stages/base.py)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from omegaconf import open_dict

NO_VAL = ["eval.enabled=false", "trainer.val_check_interval=null", "+trainer.check_val_every_n_epoch=100"]


@pytest.fixture
def run(make_cfg, tmp_path, monkeypatch):
    """``run(name, *overrides, dtype=...)`` trains in ``tmp_path/name`` and returns (initial weights,
    last.ckpt, stage module); ``dtype`` is the dtype the backbone is loaded in (the tiny model is
    built in fp32: cast to bf16 as ``model.dtype: bfloat16`` loads a hub model). Every run starts
    from the same bf16-rounded weights."""
    import unveil.models.factory as factory
    import unveil.train as train_mod

    build_backbone, build_stage = factory.build_backbone, train_mod.build_stage

    def _run(name: str, *overrides: str, dtype=torch.bfloat16):
        got = {}

        def backbone(*a, **k):
            bb = build_backbone(*a, **k)
            bb.model.to(torch.bfloat16).to(dtype)
            got["init"] = {n: p.detach().clone() for n, p in bb.model.named_parameters()}
            return bb

        def stage(*a, **k):
            got["module"] = build_stage(*a, **k)
            return got["module"]

        monkeypatch.setattr(factory, "build_backbone", backbone)
        monkeypatch.setattr(train_mod, "build_stage", stage)
        cfg = make_cfg("debug=fast", "model.vision_pretrain.steps=0", *overrides)
        with open_dict(cfg):
            cfg.paths.output_dir = str(tmp_path / name)
        train_mod.train(cfg)
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        return got["init"], ckpt, got["module"]

    return _run


# --- fp32 master weights ------------------------------------------------------------------------
def _updates(init, ckpt) -> torch.Tensor:
    sd = ckpt["state_dict"]
    return torch.cat([(sd[f"model.{n}"].float() - w.float()).flatten() for n, w in init.items()])


def test_fp32_master_weights_move_the_weights_an_fp32_run_moves(run, caplog):
    """10 AdamW steps at lr 1e-6 on a model loaded in bf16, under bf16-mixed: with master weights
    (the default) they change the weights an fp32 run (fp32 weights, precision 32-true) changes, by
    as much up to bf16 autocast; with optim.master_weights=none (AdamW on the bf16 weights) most
    updates round to zero."""
    small_lr = [
        "trainer.max_steps=10",
        *NO_VAL,
        "stage.optim.lr=1e-6",
        "stage.optim.warmup_steps=0",
        "stage.optim.scheduler=constant",
        "stage.optim.weight_decay=0",  # changed = got a gradient, not just decayed
    ]
    init, fp32, _ = run("fp32", *small_lr, "trainer.precision=32-true", dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="unveil.stages.base"):
        init_bf16, master, module = run("master", *small_lr, "trainer.precision=bf16-mixed")
    assert "fp32 master weights" in caplog.text
    _, autocast32, _ = run("autocast32", *small_lr, "trainer.precision=bf16-mixed", dtype=torch.float32)
    _, off, _ = run("off", *small_lr, "trainer.precision=bf16-mixed", "stage.optim.master_weights=none")

    assert all(w.dtype == torch.bfloat16 for w in init_bf16.values())
    assert all(torch.equal(init_bf16[n].float(), init[n]) for n in init)  # the same start
    # the checkpoint holds the fp32 masters; after fit the model is back in the dtype it was loaded in
    assert all(master["state_dict"][f"model.{n}"].dtype == torch.float32 for n in init)
    assert all(p.dtype == torch.bfloat16 for p in module.model.parameters())

    ref, mw, bf = _updates(init, fp32), _updates(init, master), _updates(init, off)
    moved = ref != 0
    assert moved.float().mean() > 0.9  # nearly every weight gets a gradient
    assert ((mw != 0) != moved).sum() <= 1e-3 * moved.sum()  # the same weights move ...
    assert (mw - ref).norm() <= 0.1 * ref.norm()  # ... by as much (bf16 autocast: ~5% apart)
    assert torch.nn.functional.cosine_similarity(mw, ref, dim=0) > 0.99
    # exactly what fp32 weights under the same autocast do
    assert torch.equal(mw, _updates(init, autocast32))
    # without master weights few updates survive the rounding (4% of the weights move here)
    assert (bf != 0).sum() < 0.2 * moved.sum()
    assert (bf - ref).norm() > 0.5 * ref.norm()


def test_frozen_parts_and_the_reference_stay_in_the_loaded_dtype(run, tmp_path):
    """GRPO on an HF architecture with a frozen vision tower: the tower and the reference copy stay
    bf16 next to the fp32 trainable weights, the forward (rollouts, log-probs) runs under autocast,
    and the evaluation after fit sees the bf16 model."""
    init, ckpt, module = run(
        "grpo",
        "model=tiny_llava15",
        "model.freeze.vision=true",
        "stage=grpo",
        "reward=umed",
        "stage.max_new_tokens=8",
        "trainer.max_steps=2",
        "trainer.precision=bf16-mixed",
        "eval.max_new_tokens=8",
        "data.max_samples.test=4",
    )
    sd = ckpt["state_dict"]
    frozen = {n for n, p in module.model.named_parameters() if not p.requires_grad}
    assert frozen and len(frozen) < len(init)
    assert all(sd[f"model.{n}"].dtype == (torch.bfloat16 if n in frozen else torch.float32) for n in init)
    assert not any(torch.equal(sd[f"model.{n}"].float(), init[n].float()) for n in init if n not in frozen)
    assert all(p.dtype == torch.bfloat16 for p in module.reference.copy.parameters())
    assert all(p.dtype == torch.bfloat16 for p in module.model.parameters())  # back after fit
    assert "test/iou" in json.loads((tmp_path / "grpo" / "metrics.json").read_text())  # evaluated after fit


@pytest.mark.parametrize(
    ("stop", "stage"),
    [
        (6, ["stage=sft", "trainer.max_steps=10"]),
        (4, ["stage=ppo", "reward=umed", "trainer.max_steps=8", "stage.max_new_tokens=8", "peft=lora"]),
    ],
    ids=["sft", "ppo-lora"],
)
def test_a_run_with_master_weights_resumes_exactly(make_cfg, tmp_path, monkeypatch, stop, stage):
    """The fp32 masters are restored into fp32 weights (the upcast comes before Lightning loads the
    checkpoint), so a bf16 model stopped and resumed under bf16-mixed ends where it would have."""
    from test_resume import _assert_resume_is_exact

    import unveil.models.factory as factory

    build = factory.build_backbone

    def bf16_backbone(*a, **k):
        bb = build(*a, **k)
        bb.model.to(torch.bfloat16)
        return bb

    monkeypatch.setattr(factory, "build_backbone", bf16_backbone)
    common = ["debug=fast", "model.vision_pretrain.steps=0", "+data.max_samples.train=16", *stage, *NO_VAL]
    _assert_resume_is_exact(make_cfg, tmp_path, [*common, "trainer.precision=bf16-mixed"], stop)
    sd = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    trained = [
        v for k, v in sd["state_dict"].items() if k.endswith("weight") and ("lora_" in k or "peft" not in stage)
    ]
    assert trained and all(v.dtype == torch.float32 for v in trained)


def test_bf16_weights_without_autocast_are_left_alone_with_a_warning(run, caplog):
    """Under precision 32-true fp32 trainable layers next to frozen bf16 ones would not run (no
    autocast to meet in): the weights stay bf16 and the run says what to do."""
    with caplog.at_level(logging.WARNING, logger="unveil.stages.base"):
        init, ckpt, _ = run("t32", "trainer.max_steps=2", *NO_VAL, "trainer.precision=32-true")
    assert "trainer.precision=bf16-mixed keeps fp32 master weights" in caplog.text
    assert all(ckpt["state_dict"][f"model.{n}"].dtype == torch.bfloat16 for n in init)


# --- adapter-only checkpoints under LoRA -----------------------------------------------------------
RESUME = ["+data.max_samples.train=16", "peft=lora", *NO_VAL]


@pytest.mark.parametrize(
    ("stop", "stage"),
    [
        (6, ["stage=sft", "trainer.max_steps=10"]),
        (4, ["stage=ppo", "reward=umed", "trainer.max_steps=8", "stage.max_new_tokens=8"]),  # + the value head
    ],
    ids=["sft", "ppo"],
)
def test_lora_checkpoint_holds_no_frozen_weight_and_resumes_exactly(make_cfg, tmp_path, stop, stage):
    from test_resume import _assert_resume_is_exact

    _assert_resume_is_exact(make_cfg, tmp_path, ["debug=fast", "model.vision_pretrain.steps=0", *stage, *RESUME], stop)
    ckpt = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["frozen_weights"]["keys"] and not set(sd) & set(ckpt["frozen_weights"]["keys"])
    params = {k for k in sd if k.endswith(("weight", "bias"))}
    assert params and all("lora_" in k or k.startswith("value_head.") for k in params), sorted(params)[:5]
    if "stage=ppo" in stage:
        assert "value_head.linear.weight" in sd


def test_lora_checkpoint_is_under_5_percent_of_the_full_one(run, tmp_path):
    """The ratio is set by the adapter's share of the parameters. LoRA r16 on Mistral-7B's linear
    layers is 42M of 7.2B parameters (0.6%): fp32 adapters plus two AdamW moments, 0.5 GB, next to a
    14.5 GB bf16 base, about 3.4% of the full checkpoint. On the tiny LLaVA (128 wide, 0.69M
    parameters) r16 would be 10% of the model, so the adapters here are r1 (4,352 parameters, 0.6%
    of the model, the 7B proportion); the default rank is checked for what it must hold (no frozen
    weight) by the resume test above. The full checkpoint is the one the run would have written
    before: the same file with the module's whole state_dict. Measured: 134 kB of 2.9 MB (4.7%),
    of which ~40 kB do not grow with the model (random streams, loop state, per-tensor records)."""
    _, ckpt, module = run("r1", "trainer.max_steps=4", *NO_VAL, "peft=lora", "peft.r=1", dtype=torch.float32)
    path = tmp_path / "r1" / "checkpoints" / "last.ckpt"
    full = {**ckpt, "state_dict": module.state_dict()}
    full.pop("frozen_weights")
    torch.save(full, tmp_path / "full.ckpt")
    ratio = path.stat().st_size / (tmp_path / "full.ckpt").stat().st_size
    assert ratio < 0.05, f"adapter-only checkpoint is {ratio:.1%} of the full one"
    n_adapter = sum(p.numel() for p in module.trainable_parameters())
    assert n_adapter < 0.01 * sum(p.numel() for p in module.model.parameters())


def test_resuming_onto_another_base_or_without_an_adapter_fails(make_cfg, tmp_path):
    """An adapter-only checkpoint fits only the base it was trained on (a fingerprint of its frozen
    weights is in the checkpoint), and a trainable weight missing from it is still an error."""
    from unveil.train import train

    common = ["debug=fast", "model.vision_pretrain.steps=0", "trainer.max_steps=3", *RESUME]
    snap = tmp_path / "step2.ckpt"
    train(
        make_cfg(
            *common,
            "+callbacks.snap._target_=test_resume.SaveAtStep",
            "+callbacks.snap.step=2",
            f"+callbacks.snap.path={snap}",
        )
    )
    with pytest.raises(RuntimeError, match="differ from the base the checkpoint was trained on"):
        train(make_cfg(*common, "model.init_seed=1", f"ckpt_path={snap}"))
    ckpt = torch.load(snap, map_location="cpu", weights_only=True)
    lora = next(k for k in ckpt["state_dict"] if "lora_A" in k)
    del ckpt["state_dict"][lora]
    torch.save(ckpt, tmp_path / "broken.ckpt")
    with pytest.raises(RuntimeError, match="Missing key"):
        train(make_cfg(*common, f"ckpt_path={tmp_path / 'broken.ckpt'}"))
