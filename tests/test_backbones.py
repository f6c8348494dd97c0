"""Real backbone architectures, tiny and random, built in code (``model=tiny_<arch>``).

For LLaVA-1.5, Qwen2-VL, Qwen2.5-VL, Idefics3 and SmolVLM: the model is that exact HF class with
its real processor class; it saves and loads back through ``model=hf`` offline; the SFT labels
are exactly the answer (in the model's BoxFormat) plus the end-of-turn markup; a two-image
sample collates; SFT, GRPO and DPO steps run through ``unveil.train.train``.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unveil.utils.resolvers  # noqa: F401
from unveil.data.collate import IGNORE, SFTCollator, backbone_messages
from unveil.data.frames import answer_frame
from unveil.data.records import load_records
from unveil.data.schema import Sample

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CONF = str(Path(__file__).resolve().parents[1] / "conf")
ARCHS = ["llava15", "qwen2_vl", "qwen25_vl", "idefics3", "smolvlm"]

# What each family's real checkpoint is, and what the SFT labels of one assistant turn decode to:
# lead + answer + end-of-turn (+ the template's newline after it, trained on as Qwen's and
# SmolVLM's own fine-tuning scripts do).
EXPECT = {
    "llava15": dict(
        model="LlavaForConditionalGeneration",
        processor="LlavaProcessor",
        box="int100",
        lead=" ",
        tail="</s>",
        image_token="<image>",
    ),
    "qwen2_vl": dict(
        model="Qwen2VLForConditionalGeneration",
        processor="Qwen2VLProcessor",
        box="qwen2vl",
        lead="",
        tail="<|im_end|>\n",
        image_token="<|image_pad|>",
    ),
    "qwen25_vl": dict(
        model="Qwen2_5_VLForConditionalGeneration",
        processor="Qwen2_5_VLProcessor",
        box="qwen25_abs",
        lead="",
        tail="<|im_end|>\n",
        image_token="<|image_pad|>",
    ),
    "idefics3": dict(
        model="Idefics3ForConditionalGeneration",
        processor="Idefics3Processor",
        box="int100",
        lead=" ",
        tail="<end_of_utterance>\n",
        image_token="<image>",
    ),
    "smolvlm": dict(
        model="SmolVLMForConditionalGeneration",
        processor="SmolVLMProcessor",
        box="int100",
        lead=" ",
        tail="<end_of_utterance>\n",
        image_token="<image>",
    ),
}
# LLaVA-Med v1.5 and Mantis-LLaVA: the llava15 architecture with their own conversation formats.
TEMPLATE_VARIANTS = {"llava_med": dict(lead=" ", tail=" </s>"), "mantis": dict(lead=" ", tail="</s>")}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=["debug=fast", *overrides])


@pytest.fixture(scope="module")
def dm():

    d = load_records(compose([]).data)
    return d


@pytest.fixture(scope="module")
def make_backbone(dm, tmp_path_factory):
    """Backbones built through build_backbone (model=tiny_<arch>), cached per override set."""
    from unveil.models.factory import build_backbone

    cache, tok_dir = {}, tmp_path_factory.mktemp("tok")

    def make(arch: str, *overrides: str):
        key = (arch, overrides)
        if key not in cache:
            c = compose([f"model=tiny_{arch}", *overrides])
            cache[key] = build_backbone(c.model, peft=c.peft, corpus=dm.corpus(), cache_dir=tok_dir)
        return cache[key]

    return make


def localize_samples(dm, n: int = 3) -> list[Sample]:
    """Localisation samples with boxes (one with two when there is one) and a closed question."""
    train = dm.data["train"]
    boxed = sorted((s for s in train if s.task == "localize" and s.boxes), key=lambda s: -len(s.boxes))[:n]
    closed = [s for s in train if s.task == "vqa_closed"][:1]
    assert boxed and boxed[0].boxes and closed
    return boxed + closed


def two_image_sample(dm) -> Sample:
    """A prior / current comparison over two of the data set's images."""
    paths = sorted({p for s in dm.data["train"] for p in s.images})[:2]
    return Sample(
        id="mim-0",
        images=paths,
        task="compare",
        messages=[
            {"role": "user", "content": "Prior: <image>\nCurrent: <image>\nWhich image shows the lesion?"},
            {"role": "assistant", "content": "The second image, at [10, 20, 30, 40]."},
        ],
    )


def label_text(bb, batch, i: int) -> str:
    lab = batch["labels"][i]
    return bb.tokenizer.decode(lab[lab != IGNORE], skip_special_tokens=False)


# --- build, save, load ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_builds_the_real_architecture_and_processor_offline(make_backbone, arch):
    bb = make_backbone(arch)
    e = EXPECT[arch]
    assert type(bb.base_model).__name__ == e["model"]
    assert type(bb.processor).__name__ == e["processor"]
    assert bb.box_format.name == e["box"] and bb.structured_chat
    assert sum(p.numel() for p in bb.model.parameters()) < 2_000_000
    tok = bb.tokenizer
    # the family's special tokens are single tokens, the image token is the model's
    specials = {
        "llava15": ["<image>", "</s>"],
        "qwen2_vl": ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|box_start|>"],
        "idefics3": ["<fake_token_around_image>", "<end_of_utterance>", "<global-img>", "<row_1_col_1>"],
        "smolvlm": ["<|im_start|>", "<fake_token_around_image>", "<row_2_col_2>"],
    }
    for t in specials.get(arch, specials["qwen2_vl"]):
        assert len(tok(t, add_special_tokens=False)["input_ids"]) == 1, t
    cfg = bb.base_model.config
    image_id = getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index", None)
    assert image_id == tok.convert_tokens_to_ids(e["image_token"])
    assert image_id in bb.image_token_ids and tok.eos_token_id not in bb.image_token_ids
    prompt = bb.render([{"role": "user", "content": "<image>\nWhere?"}], add_generation_prompt=True)
    marker = {
        "llava15": "USER: <image>\nWhere? ASSISTANT:",
        "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>Where?",
        "idefics3": "<|begin_of_text|>User:<image>Where?<end_of_utterance>\nAssistant:",
        "smolvlm": "<|im_start|>User:<image>Where?<end_of_utterance>\nAssistant:",
    }
    assert marker.get(arch, marker["qwen2_vl"]) in prompt
    if arch.startswith("qwen"):
        assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>system\n" in prompt


@pytest.mark.parametrize("arch", ARCHS)
def test_save_and_load_back_as_model_hf_offline(make_backbone, dm, tmp_path, arch):
    from unveil.models.factory import build_backbone
    from unveil.models.generation import generate

    bb = make_backbone(arch)
    bb.save(tmp_path / "saved")
    over = [
        f"model.name_or_path={tmp_path / 'saved'}",
        "model.local_files_only=true",
        "model.dtype=float32",
        f"model.box_format={bb.box_format.name}",
        "model.freeze.vision=false",
    ]
    c = compose(["model=hf", *over])
    loaded = build_backbone(c.model, peft=c.peft)
    assert type(loaded.base_model) is type(bb.base_model) and type(loaded.processor) is type(bb.processor)
    assert loaded.processor.chat_template == bb.processor.chat_template
    assert loaded.tokenizer.eos_token == bb.tokenizer.eos_token and loaded.image_token_ids == bb.image_token_ids
    assert loaded.extra["image_aspect"] == bb.extra["image_aspect"] == ("pad" if arch == "llava15" else "native")
    samples = localize_samples(dm, 2)
    b1, b2 = SFTCollator(bb)(samples), SFTCollator(loaded)(samples)
    assert b1.keys() == b2.keys()
    for k in b1:
        torch.testing.assert_close(b1[k], b2[k])
    bb.model.eval(), loaded.model.eval()
    with torch.no_grad():
        from unveil.models.inputs import model_inputs

        torch.testing.assert_close(bb.model(**model_inputs(b1)).logits, loaded.model(**model_inputs(b2)).logits)
    from unveil.data.collate import PromptCollator

    prompts = PromptCollator(loaded)(samples)
    out1, out2 = (
        generate(bb, PromptCollator(bb)(samples), max_new_tokens=4),
        generate(loaded, prompts, max_new_tokens=4),
    )
    assert torch.equal(out1["sequences"], out2["sequences"]) and out1["texts"] == out2["texts"]
    # image placeholder tokens are never generated
    assert not set(out2["completion_ids"].flatten().tolist()) & set(loaded.image_token_ids)


# --- labels and box text ----------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS + list(TEMPLATE_VARIANTS))
def test_sft_labels_are_exactly_the_answer_in_the_models_box_format(make_backbone, dm, arch):
    if arch in TEMPLATE_VARIANTS:
        bb, e = (
            make_backbone("llava15", f"model.spec.chat_template={arch}"),
            {**EXPECT["llava15"], **TEMPLATE_VARIANTS[arch]},
        )
    else:
        bb, e = make_backbone(arch), EXPECT[arch]
    samples = localize_samples(dm)
    batch = SFTCollator(bb)(samples)
    for i, s in enumerate(samples):
        answer = backbone_messages(bb, s)[-1]["content"]
        assert label_text(bb, batch, i) == e["lead"] + answer + e["tail"], (arch, s.id)
        if not s.boxes:
            continue
        # the boxes in the answer are written in the model's format and read back to the ground truth
        frame = answer_frame(bb, s)
        parsed = [p.box for p in frame.parse_spans(bb.box_format, answer)]
        assert len(parsed) == len(s.boxes)
        grid = 1 / 100 + (1 / min(frame.size) if frame.size else 0)  # records carry 0-100 grid boxes
        for p, g in zip(parsed, s.boxes):
            assert np.allclose(p, g, atol=grid), (p, g)
        if e["box"] == "qwen2vl":
            assert "<|box_start|>(" in answer and not re.search(r"\[\d+, \d+, \d+, \d+\]", answer)
        else:
            assert re.search(r"\[\d+, \d+, \d+, \d+\]", answer) and "<|box_start|>" not in answer
    # every label token lies inside the answer span: nothing of the prompt or the images
    assert not set(batch["labels"][batch["labels"] != IGNORE].tolist()) & set(bb.image_token_ids)


def test_qwen25_absolute_boxes_are_on_the_grid_the_processor_produces(make_backbone, dm):
    bb = make_backbone("qwen25_vl")
    samples = localize_samples(dm)
    batch = SFTCollator(bb)(samples)
    patch = bb.processor.image_processor.patch_size
    for s, (_t, gh, gw) in zip(samples, batch["image_grid_thw"].tolist()):
        assert (gw * patch, gh * patch) == answer_frame(bb, s).size


def test_generated_qwen2vl_box_tokens_survive_decoding(make_backbone):
    """Qwen's <|box_start|>/<|box_end|> are special tokens: decoding keeps them (and only them)."""
    from unveil.models.generation import decode

    bb = make_backbone("qwen2_vl")
    tok = bb.tokenizer
    text = "nodule <|box_start|>(120,340),(560,780)<|box_end|>"
    ids = tok(text + "<|im_end|><|endoftext|><|endoftext|>", add_special_tokens=False)["input_ids"]
    assert decode(tok, torch.tensor([ids])) == [text]
    assert bb.box_format.parse(decode(tok, [ids])[0]) == [(0.12, 0.34, 0.56, 0.78)]
    tiny = make_backbone("llava15")  # no box tokens: plain skip_special_tokens decoding
    ids = tiny.tokenizer("a [1, 2, 3, 4]</s><pad>", add_special_tokens=False)["input_ids"]
    assert decode(tiny.tokenizer, [ids]) == tiny.tokenizer.batch_decode([ids], skip_special_tokens=True)


@pytest.mark.parametrize("arch", ARCHS)
def test_evaluation_reads_boxes_in_the_models_format(make_backbone, dm, monkeypatch, arch):
    """A model answering exactly the reference, in its own box format, scores IoU ~ 1."""
    import unveil.eval.evaluate as ev

    bb = make_backbone(arch)
    samples = [s for s in localize_samples(dm) if s.boxes]
    monkeypatch.setattr(
        ev,
        "generate",
        lambda b, batch, **kw: {"texts": [backbone_messages(b, s)[-1]["content"] for s in batch["samples"]]},
    )
    metrics = ev.evaluate(bb, samples, progress=False)
    assert metrics["test/iou"] > 0.85 and metrics["test/presence_acc"] == 1.0, metrics


@pytest.mark.parametrize("arch", ARCHS)
def test_two_image_sample_through_the_sft_collator(make_backbone, dm, arch):
    bb = make_backbone(arch)
    one = localize_samples(dm, 1)[0]
    two = two_image_sample(dm)
    batch = SFTCollator(bb)([two, one])
    e = EXPECT[arch]
    ids = batch["input_ids"]
    image_id = bb.tokenizer.convert_tokens_to_ids(e["image_token"])
    n_two, n_one = (ids[0] == image_id).sum().item(), (ids[1] == image_id).sum().item()
    assert n_two == 2 * n_one > 0  # same-size images: twice the image tokens
    answer = backbone_messages(bb, two)[-1]["content"]
    assert label_text(bb, batch, 0) == e["lead"] + answer + e["tail"]
    assert label_text(bb, batch, 1) == e["lead"] + backbone_messages(bb, one)[-1]["content"] + e["tail"]
    if arch.startswith("qwen"):
        assert batch["image_grid_thw"].shape[0] == 3
    elif arch == "llava15":
        assert batch["pixel_values"].shape[0] == 3
    else:  # Idefics3 / SmolVLM: per-sample stacks of tiles + global views, padded and masked
        assert batch["pixel_values"].shape[:2] == batch["pixel_attention_mask"].shape[:2]
        assert batch["pixel_values"].shape[1] == 2 * 5  # 2 images x (2x2 tiles + global)
        assert (ids[0] == bb.tokenizer.convert_tokens_to_ids("<row_2_col_2>")).sum().item() == 2
    from unveil.models.inputs import model_inputs

    bb.model.train()
    out = bb.model(**model_inputs(batch), labels=batch["labels"])
    assert torch.isfinite(out.loss)
    out.loss.backward()
    vision = [
        p for n, p in bb.model.named_parameters() if any(k in n for k in ("vision_tower", "visual", "vision_model"))
    ]
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vision)  # the images reach the loss
    bb.model.zero_grad(set_to_none=True)


# --- LoRA and freezing on each architecture -----------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_lora_targets_the_language_model_of_each_architecture(make_backbone, arch):
    bb = make_backbone(arch, "peft=lora", "model.freeze.vision=true")
    names = [n for n, _ in bb.model.named_modules() if n.endswith("lora_A")]
    assert len(names) == 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    assert all(("language_model" in n or "text_model" in n) for n in names)
    trainable = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


REAL = {
    "llava15": "llava15",
    "llava_med": "llava15",
    "mantis": "llava15",
    "qwen2_vl": "qwen2_vl",
    "qwen25_vl": "qwen25_vl",
    "idefics3": "idefics3",
    "smolvlm": "smolvlm",
}


@pytest.mark.parametrize("name", list(REAL))
def test_real_checkpoint_configs_fit_their_architecture(make_backbone, name):
    """conf/model/<name>.yaml (a hub checkpoint, not loaded here) against the tiny model of its
    architecture: box format, chat template, and LoRA targets that hit its language model only."""
    from unveil.models.chat_templates import CHAT_TEMPLATES, resolve_chat_template

    c = compose([f"model={name}", "peft=lora"])
    arch = REAL[name]
    assert (
        c.model._target_ == "unveil.models.factory.hf"
        and "/" in c.model.name_or_path
        and not c.model.trust_remote_code
    )
    assert c.model.box_format == EXPECT[arch]["box"] and c.model.structured_chat
    if c.model.chat_template:
        assert resolve_chat_template(c.model.chat_template) == CHAT_TEMPLATES[name]
    if arch == "qwen25_vl":
        side = math.isqrt(c.model.processor_kwargs.min_pixels)
        assert c.model.processor_kwargs.max_pixels == side * side and side % 28 == 0
    # LLaVA's image_aspect_ratio pad for the llava family, the processor's own handling otherwise
    assert (c.model.image_aspect or "native") == ("pad" if arch == "llava15" else "native")
    regex = c.model.peft_target_modules or c.peft.target_modules
    linear = [n for n, m in make_backbone(arch).base_model.named_modules() if isinstance(m, torch.nn.Linear)]
    hit = [n for n in linear if re.fullmatch(regex, n)]
    assert len(hit) == 2 * 7 and all(("language_model" in n or "text_model" in n) for n in hit)


def test_freezing_qwen_vision_keeps_its_merger_trainable(make_backbone):
    bb = make_backbone("qwen2_vl", "model.freeze.vision=true")
    grads = {n: p.requires_grad for n, p in bb.model.named_parameters() if ".visual." in n}
    assert any(v for n, v in grads.items() if ".merger." in n)
    assert not any(v for n, v in grads.items() if ".merger." not in n)


# --- steps through train() ----------------------------------------------------------------------
def run_overrides(tmp_path: Path, steps: int = 2) -> list[str]:
    return [
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={steps}",
        "+trainer.enable_progress_bar=false",
        "logger=none",
        "~callbacks",
        "+trainer.enable_checkpointing=false",
        "data.batch_size=4",
        "data.eval_batch_size=4",
        "data.max_samples.val=4",
        f"paths.output_dir={tmp_path / 'run'}",
    ]


@pytest.mark.parametrize("arch", ARCHS)
def test_sft_step_through_train(arch, tmp_path):
    from unveil.train import train

    cfg = compose([f"model=tiny_{arch}", "data.max_samples.test=4", "eval.max_new_tokens=6", *run_overrides(tmp_path)])
    metrics = train(cfg)
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert metrics["train/answer_tokens"] > 0
    run = tmp_path / "run"
    assert (run / "backbone" / "config.json").exists()
    assert "unveil_backbone.txt" in os.listdir(run / "backbone")
    preds = [json.loads(l) for l in (run / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 4 and all(isinstance(p["prediction"], str) for p in preds)


@pytest.mark.parametrize("arch", ARCHS)
def test_rollout_tokens_rescore_as_greedy_with_left_padded_prompts(make_backbone, dm, arch):
    """Greedy rollouts of a left-padded batch, rescored in one forward over prompt + completion
    (as the RL stages do): every generated token has the top log-prob among the tokens generation
    may emit, and the stage's completion_logprobs agree. Positions, M-RoPE and images line up."""
    from unveil.data.collate import PromptCollator
    from unveil.models.policy import position_ids_from_mask
    from unveil.stages.rollout import sample_rollouts

    bb = make_backbone(arch)
    batch = PromptCollator(bb)(localize_samples(dm))
    assert (batch["attention_mask"][:, 0] == 0).any()  # mixed lengths: left padding
    ro = sample_rollouts(bb, batch, num_generations=1, max_new_tokens=5, do_sample=False)
    ids, mask, inputs = ro.completion_ids, ro.completion_mask, dict(ro.inputs)
    inputs["input_ids"] = torch.cat([inputs["input_ids"], ids], 1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], mask.to(inputs["attention_mask"].dtype)], 1)
    if "mm_token_type_ids" in inputs:  # Qwen2-VL: the completion is text (0)
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids)], 1)
    if "image_grid_thw" not in inputs:  # M-RoPE models build their own positions
        inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
    T = ids.shape[1]
    with torch.no_grad():
        logp = bb.model(**inputs).logits[:, -(T + 1) : -1].float().log_softmax(-1)
        stage_logps = ro.logprobs(bb.model).logps
    chosen = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    logp[..., bb.image_token_ids] = -math.inf  # generation suppresses them
    gap = (logp.max(-1).values - chosen)[mask.bool()]
    assert gap.numel() > 0 and gap.max() < 1e-3, gap
    torch.testing.assert_close(stage_logps, chosen * mask, atol=1e-4, rtol=1e-4)


def dpo_overrides(data: Path) -> list[str]:
    """DPO on the preference records under ``data`` (MAU JSONL), without evaluation."""
    return [
        "stage=dpo",
        "data=mau_jsonl",
        f"data.root={data}",
        "data.synthetic=null",
        "data.num_workers=0",
        "eval.enabled=false",
    ]


def write_preference_set(src: Path, dst: Path, n: int = 8) -> None:
    """MAU JSONL preference records from the synthetic set: text pairs (another record's answer)
    and visual pairs (the same answer on a noised copy of the image), alternating."""
    rng = np.random.default_rng(0)
    (dst / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        recs = [json.loads(l) for l in (src / f"{split}.jsonl").read_text().splitlines() if l.strip()][:n]
        for i, r in enumerate(recs):
            for rel in r["images"]:
                (dst / rel).write_bytes((src / rel).read_bytes())
            if i % 2:
                r["rejected"] = {
                    "answer": next(o["answer"] for o in recs[i + 1 :] + recs if o["answer"] != r["answer"]),
                    "images": None,
                }
            else:
                noised = []
                for rel in r["images"]:
                    im = np.asarray(Image.open(src / rel).convert("RGB"), dtype=np.float32)
                    im = 0.3 * im + 0.7 * rng.uniform(0, 255, im.shape)
                    noised.append(rel.replace(".png", f"-noised{i}.png"))
                    Image.fromarray(im.astype(np.uint8)).save(dst / noised[-1])
                r["rejected"] = {"answer": r["answer"], "images": noised}
        (dst / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


@pytest.mark.parametrize("arch", ARCHS)
def test_dpo_step_through_train(arch, dm, tmp_path):
    from unveil.train import train

    data = tmp_path / "pref"
    write_preference_set(Path(dm.root), data)
    cfg = compose([f"model=tiny_{arch}", *dpo_overrides(data), "stage.optim.warmup_ratio=0", *run_overrides(tmp_path)])
    metrics = train(cfg)
    for k in ("train/loss", "val/loss", "val/rewards/margins"):
        assert math.isfinite(metrics[k]), (k, metrics)
    # one optimiser step from the reference: the policy moved, so margins are no longer all exactly 0
    assert metrics["val/rewards/margins"] != 0.0
    assert (tmp_path / "run" / "backbone" / "config.json").exists()


@pytest.mark.parametrize("arch", ARCHS)
def test_grpo_step_through_train(arch, tmp_path):
    from unveil.train import train

    cfg = compose(
        [
            f"model=tiny_{arch}",
            "stage=grpo",
            "reward=umed",
            "eval.enabled=false",
            "data.train_tasks=[localize,vqa_closed]",
            "stage.num_generations=2",
            "stage.max_new_tokens=8",
            "stage.log_completions_every=1",
            *run_overrides(tmp_path, steps=1),
            "data.batch_size=2",
            "data.max_samples.val=2",
        ]
    )
    metrics = train(cfg)
    for k in ("train/loss", "train/kl", "train/reward", "train/rewards/localization/mean", "val/reward"):
        assert k in metrics and math.isfinite(metrics[k]), (k, metrics)
    if arch == "llava15":  # UMed-LVLM's attention mass on the box's image patches
        assert metrics["train/rewards/vision_relevance/applicable_frac"] > 0
    rows = [json.loads(l) for l in (tmp_path / "run" / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and all(isinstance(r["completion"], str) for r in rows)
    assert (tmp_path / "run" / "backbone" / "config.json").exists()
