"""python -m unveil.export: a run as a plain HF model directory (merged, or the LoRA adapter alone)
with a model card, loaded back with from_pretrained; on the runs of the debug sweep (conftest)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

import unveil.models.conv_vision  # noqa: F401  (the tiny model's tower, registered with the Auto classes)
from unveil.export import export_run
from unveil.export.__main__ import main
from unveil.report.tables import fmt

pytestmark = pytest.mark.slow  # the debug sweep trains (an SFT run and two GRPO runs)


def _load(path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(path), AutoProcessor.from_pretrained(path)


def _same(a: dict, b: dict, atol: float = 0.0) -> bool:
    return set(a) == set(b) and all(torch.allclose(a[k].float(), b[k].float(), atol=atol, rtol=0) for k in a)


def test_merged_export_of_the_tiny_llava_loads_and_has_a_card(debug_sweep, tmp_path):
    run = debug_sweep / "sft"
    out = main([str(run), str(tmp_path / "tiny-sft")])
    model, processor = _load(out)
    assert _same(model.state_dict(), _load(run / "backbone")[0].state_dict())
    assert processor.tokenizer("Region [12, 30, 25, 44]").input_ids  # the run's own tokenizer came along
    card = (out / "README.md").read_text()
    metrics = json.loads((run / "metrics.json").read_text())
    assert card.startswith("---\nlibrary_name: transformers\n") and "- sft\n" in card
    assert "python -m unveil.train debug=fast" in card  # the run's command
    assert "| format | `mau_jsonl` |" in card and "n_patients 24" in card  # the data (debug size)
    assert "| root | `${paths.data_dir}/synthetic/n24-s0-px128` |" in card  # not this machine's folder
    assert f"| overall | {fmt(metrics['test/presence_acc'])} |" in card
    assert f"| train/loss | {fmt(metrics['train/loss'])} |" in card
    assert "import unveil.models.conv_vision" in card  # the tiny tower needs unveil to load
    assert "## Config" in card and "optimized_metric: test/iou" in card


def test_lora_run_merged_and_adapter_only(debug_sweep, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    run, base_dir = debug_sweep / "rl" / "0", debug_sweep / "sft" / "backbone"
    merged = export_run(run, tmp_path / "merged")
    m = _load(merged)[0].state_dict()
    assert _same(m, _load(run / "backbone")[0].state_dict())  # LoRA merged, as the run saved it

    adapter = main([str(run), str(tmp_path / "adapter"), "--adapter-only"])
    assert (adapter / "adapter_model.safetensors").exists() and not (adapter / "model.safetensors").exists()
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir.resolve()
    )
    base = AutoModelForImageTextToText.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    a = PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()
    assert _same(a, m, atol=1e-6)  # base + the exported adapter = the run's merged model
    assert not _same(a, before, atol=1e-5)  # and the adapter is not a no-op: GRPO moved the weights
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\n") and "PeftModel.from_pretrained" in card
    assert f"| started from | `{base_dir.resolve()}` |" in card and "| LoRA | r 16, alpha 32 |" in card


def test_adapter_only_refused_without_lora_or_on_another_base(debug_sweep, tmp_path):
    with pytest.raises(SystemExit, match="trained without LoRA"):
        main([str(debug_sweep / "sft"), str(tmp_path / "a"), "--adapter-only"])
    # the LoRA run copied, its config pointing at a base whose weights moved: the checkpoint's
    # fingerprint of its base catches it
    run = shutil.copytree(debug_sweep / "rl" / "0", tmp_path / "run", ignore=shutil.ignore_patterns("backbone"))
    base = shutil.copytree(debug_sweep / "sft" / "backbone", tmp_path / "other_base")
    model = _load(base)[0]
    with torch.no_grad():
        model.model.language_model.layers[0].mlp.up_proj.weight.add_(0.01)
    model.save_pretrained(base)
    cfg = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    cfg["model"]["init_from"] = str(base)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(RuntimeError, match="frozen weights of the model built now differ"):
        export_run(run, tmp_path / "b", adapter_only=True)


def test_out_dir_is_never_overwritten_unless_an_earlier_export(debug_sweep, tmp_path):
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="exists and is not empty"):
        main([str(debug_sweep / "sft"), str(other), "--force"])
    assert (other / "notes.txt").read_text() == "keep me"
    out = export_run(debug_sweep / "sft", tmp_path / "exp")
    with pytest.raises(FileExistsError, match="pass --force"):
        export_run(debug_sweep / "sft", out)
    assert export_run(debug_sweep / "sft", out, force=True) == out and (out / "config.json").exists()
