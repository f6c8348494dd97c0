"""trainer=fsdp (unveil.utils.fsdp): the wrap policy from the backbone, the config, and a two-process
SFT run on the CPU over gloo (sharded checkpoint, consolidated export, evaluation on every rank)."""

from __future__ import annotations

import json

import hydra
import pytest
import torch
from test_resume import run_cli, run_straight_and_resumed, train_cli


def test_layer_classes_are_the_backbones_no_split_modules(make_cfg):
    from unveil.data.records import load_records
    from unveil.models.factory import build_backbone
    from unveil.utils.fsdp import layer_classes

    cfg = make_cfg("debug=fast")
    bb = build_backbone(cfg.model, corpus=load_records(cfg.data).corpus(), cache_dir=cfg.paths.cache_dir)
    classes = layer_classes(bb.model)
    assert "LlamaDecoderLayer" in {c.__name__ for c in classes}
    n_layers = sum(isinstance(m, tuple(classes)) for m in bb.model.modules())
    assert n_layers == bb.model.config.text_config.num_hidden_layers
    assert layer_classes(bb.model, ["LlamaRMSNorm"]) == {type(bb.model.model.language_model.norm)}
    with pytest.raises(ValueError, match="no module of"):
        layer_classes(bb.model, ["NoSuchLayer"])


def test_fsdp_config_builds_the_strategy(make_cfg):
    from torch.distributed.fsdp import ShardingStrategy

    from unveil.utils.fsdp import UnveilFSDPStrategy

    cfg = make_cfg("debug=fast", "trainer=fsdp", "trainer.strategy.activation_checkpointing=true")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, UnveilFSDPStrategy)
    assert strategy.mixed_precision.param_dtype == torch.bfloat16
    assert strategy.mixed_precision.reduce_dtype == torch.float32
    assert strategy.sharding_strategy == ShardingStrategy.FULL_SHARD and strategy.kwargs["use_orig_params"]
    assert strategy.activation_checkpointing_on and strategy.reference_mode == "shard"
    with pytest.raises(ValueError, match="reference"):
        UnveilFSDPStrategy(reference="everywhere")


def test_sft_under_two_process_fsdp_on_cpu_exports_and_evaluates(tmp_path):
    from transformers import AutoModelForImageTextToText

    out = tmp_path / "run"
    cmd = train_cli(
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "data.max_samples.test=8",
        "data.eval_batch_size=4",
        "eval.batch_size=4",
        f"hydra.run.dir={out}",
    )
    proc = run_cli(cmd)
    assert "FSDP units: ['LlamaDecoderLayer']" in proc.stderr + proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert "test/presence_acc" in metrics and metrics["train/loss"] == metrics["train/loss"]
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 8  # both ranks' shares
    assert (out / "checkpoints" / "last.ckpt").is_dir()  # state_dict_type=sharded: a shard per rank
    # the consolidated export: whole weights, not a rank's shard
    model = AutoModelForImageTextToText.from_pretrained(out / "backbone")
    emb = model.get_input_embeddings().weight
    assert emb.ndim == 2 and emb.shape[0] == model.config.text_config.vocab_size and emb.abs().sum() > 0


def test_fsdp_resumed_from_a_sharded_checkpoint_ends_with_the_uninterrupted_weights(tmp_path):
    """Stopped after step 2 of 4 (a sharded checkpoint: a folder of per-rank shards) and resumed:
    the consolidated export equals the one of the run that never stopped, bit for bit."""

    from safetensors.torch import load_file

    common = train_cli(
        "trainer=fsdp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "eval.enabled=false",
        "model.vision_pretrain.steps=0",
        "trainer.max_steps=4",
        "trainer.val_check_interval=null",
        "+trainer.check_val_every_n_epoch=100",
    )
    snap, proc = run_straight_and_resumed(common, tmp_path, 2)
    assert snap.is_dir() and (snap / "meta.pt").is_file()
    assert "Restored all states from the checkpoint" in proc.stderr + proc.stdout
    a, b = (load_file(tmp_path / r / "backbone" / "model.safetensors") for r in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
