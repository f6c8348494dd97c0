"""stage=dpo: the preference collator, the loss against TRL's DPOTrainer, weights, the reference
model, and a few DPO steps through ``unveil.train.train``."""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import unveil.utils.resolvers  # noqa: F401
from unveil.data.collate import IGNORE
from unveil.data.records import load_records
from unveil.data.schema import Rejected, Sample
from unveil.models.inputs import model_inputs
from unveil.models.policy import answer_logprobs
from unveil.stages.dpo import DPOModule, normalize_weights, preference_loss, weight_moments


def answer_token_logps(model, batch):
    return answer_logprobs(model, model_inputs(batch), batch["labels"])


CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=["debug=fast", "stage=dpo", *overrides])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The debug-size synthetic data and a factory for the tiny LLaVA (with or without LoRA),
    with data and tokenizer caches in a temporary directory."""

    from unveil.models.factory import build_backbone

    tmp = tmp_path_factory.mktemp("dpo")
    paths = [f"paths.data_dir={tmp / 'data'}", f"paths.cache_dir={tmp / 'cache'}"]
    cfg = compose(paths)
    dm = load_records(cfg.data)

    def backbone(peft: str = "none"):
        c = compose([*paths, f"peft={peft}"])
        return build_backbone(c.model, peft=c.peft, corpus=dm.corpus(), cache_dir=c.paths.cache_dir)

    backbone.paths = paths
    return dm, backbone


def text_pairs(samples: list[Sample], n: int, weights=None) -> list[Sample]:
    """Chosen = the real answer, rejected = another sample's (different) answer."""
    out = []
    for i, s in enumerate(samples[:n]):
        other = next(t.target for t in samples[i + 1 :] + samples if t.target != s.target)
        rejected = Rejected(messages=s.prompt_messages + [{"role": "assistant", "content": other}])
        out.append(
            Sample(
                id=s.id,
                images=s.images,
                messages=s.messages,
                rejected=rejected,
                weight=1.0 if weights is None else weights[i],
            )
        )
    return out


def perturb(model: torch.nn.Module, scale: float = 0.02, seed: int = 0, only: str = "") -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if only in name:
                p.add_(scale * torch.randn(p.shape, generator=g))


# --- (a) parity with TRL ----------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_loss_matches_trl_dpo_trainer(tiny, tmp_path, loss_type):
    """Same tiny LLaVA, same pairs: our loss and rewards equal TRL's DPOTrainer.compute_loss."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    dm, make = tiny
    bb = make()
    pairs = text_pairs(dm.data["train"], 4)
    module = DPOModule(bb, loss_type=loss_type)  # reference = frozen copy of the starting policy
    reference = copy.deepcopy(module.reference.copy)
    perturb(module.model)  # policy != reference, or every loss is trivially log 2
    batch = module.collator(pairs)
    ours = module.compute_loss(batch)

    # TRL on the same text: prompt rendered with the generation prompt, completions = the rest
    rows = []
    for s in pairs:
        prompt = bb.render(s.prompt_messages, add_generation_prompt=True)
        chosen, rejected = bb.render(s.messages), bb.render(s.rejected.messages)
        assert chosen.startswith(prompt) and rejected.startswith(prompt)
        rows.append(
            {
                "images": [Image.open(p).convert("RGB") for p in s.images],
                "prompt": prompt,
                "chosen": chosen[len(prompt) :],
                "rejected": rejected[len(prompt) :],
            }
        )
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        max_length=None,
        beta=0.1,
        loss_type=[loss_type],
    )
    policy = copy.deepcopy(module.model)
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=bb.processor,
    )
    trl_batch = trainer.data_collator([dict(r) for r in rows])
    # the same tokens, and the same answer tokens scored
    torch.testing.assert_close(
        batch["input_ids"] * batch["attention_mask"], trl_batch["input_ids"] * trl_batch["attention_mask"]
    )
    assert torch.equal(batch["labels"] != IGNORE, trl_batch["completion_mask"].bool())
    torch.testing.assert_close(batch["pixel_values"], trl_batch["pixel_values"])

    trl_loss = trainer.compute_loss(policy, trl_batch)
    assert abs(ours["loss"].item() - trl_loss.item()) < 1e-5, (ours["loss"].item(), trl_loss.item())
    m = trainer._metrics["train"]
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ):
        assert abs(ours[key].mean().item() - m[key][-1]) < 1e-4 * max(1.0, abs(m[key][-1])), key
    assert ours["rewards/margins"].abs().max() > 1e-3  # a real, non-trivial comparison


# --- (b) weights --------------------------------------------------------------------------------
def test_weighted_loss_is_weight_times_per_pair_loss(tiny):
    dm, make = tiny
    raw = [0.0, 0.5, 1.0, 0.25]
    module = DPOModule(make())
    perturb(module.model)
    batch = module.collator(text_pairs(dm.data["train"], 4, weights=raw))
    assert batch["weights"].tolist() == raw

    plain = module.compute_loss(batch)
    assert plain["weights"].tolist() == [1.0] * 4  # weight_norm=none ignores the weights
    assert plain["loss"].item() == pytest.approx(plain["per_pair_loss"].mean().item(), abs=1e-6)

    module.weight_norm = "raw"
    weighted = module.compute_loss(batch)
    torch.testing.assert_close(weighted["per_pair_loss"], plain["per_pair_loss"])
    expected = (torch.tensor(raw) * plain["per_pair_loss"]).mean()
    assert weighted["loss"].item() == pytest.approx(expected.item(), abs=1e-6)

    module.weight_norm = "mmedpo"
    module.fit_weight_stats(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    paper = module.compute_loss(batch)
    w = normalize_weights(torch.tensor(raw), "mmedpo", (0.5, math.sqrt(0.125)))
    assert paper["loss"].item() == pytest.approx((w * plain["per_pair_loss"]).mean().item(), abs=1e-6)
    assert paper["weights"].tolist() == pytest.approx(
        [0.75, 1.0, 1.25, 1 - math.sqrt(0.1) * 0.25 / math.sqrt(0.125)]
    )  # 0 and 1 clipped

    # the SFT anchor adds sft_weight x the token-mean NLL of the chosen answers
    module.weight_norm, module.sft_weight = "none", 0.5
    anchored = module.compute_loss(batch)
    logps, mask = answer_token_logps(module.model, batch)
    nll = -logps.chunk(2)[0].sum() / mask.chunk(2)[0].sum()
    assert anchored["sft_loss"].item() == pytest.approx(nll.item(), abs=1e-5)
    assert anchored["loss"].item() == pytest.approx(plain["loss"].item() + 0.5 * nll.item(), abs=1e-5)
    module.sft_weight = 0.0

    # the gradient of a zero-weight pair vanishes: only pair 0 (weight 0) in the batch -> no gradient
    module.weight_norm = "raw"
    module.model.zero_grad()
    module.compute_loss(module.collator(text_pairs(dm.data["train"], 1, weights=[0.0])))["loss"].backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in module.model.parameters())


# --- (c) hinge / IPO / smoothing against hand-computed values ----------------------------------
def test_loss_types_against_hand_computed_values():
    c, r = torch.tensor([2.0, -1.0, 0.0]), torch.tensor([0.5, 1.0, 0.0])  # delta = 1.5, -2.0, 0
    assert preference_loss(c, r, "hinge", beta=0.1).tolist() == pytest.approx([0.85, 1.2, 1.0])
    assert preference_loss(c, r, "ipo", beta=0.1).tolist() == pytest.approx([(1.5 - 5) ** 2, (-2 - 5) ** 2, 25.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert preference_loss(c, r, "sigmoid", beta=0.1).tolist() == pytest.approx(
        [-math.log(sig(0.15)), -math.log(sig(-0.2)), math.log(2)]
    )
    assert preference_loss(c, r, "sigmoid", beta=0.5, label_smoothing=0.1).tolist() == pytest.approx(
        [
            -0.9 * math.log(sig(0.75)) - 0.1 * math.log(sig(-0.75)),
            -0.9 * math.log(sig(-1.0)) - 0.1 * math.log(sig(1.0)),
            math.log(2),
        ]
    )
    with pytest.raises(ValueError):
        preference_loss(c, r, "kto")


def test_ipo_uses_per_token_log_ratios_and_mean_aggregation(tiny):
    """IPO divides each side's summed log-ratio by its own answer length; logp_agg=mean averages."""
    dm, make = tiny
    module = DPOModule(make(), loss_type="ipo", beta=0.5)
    perturb(module.model)
    batch = module.collator(text_pairs(dm.data["train"], 3))
    logps, mask = answer_token_logps(module.model, batch)
    with module.reference.model() as ref:
        ref_logps, _ = answer_token_logps(ref, batch)
    n = mask.sum(1)
    ratio = (logps.sum(1) - ref_logps.sum(1)) / n
    (cr, rr), (nc, nr) = ratio.chunk(2), n.chunk(2)
    assert not torch.equal(nc, nr)  # answers of different lengths, so the division matters
    out = module.compute_loss(batch)
    torch.testing.assert_close(out["per_pair_loss"], ((cr - rr) - 1 / (2 * 0.5)) ** 2)
    module.logp_agg = "mean"  # already per-token: same IPO loss, per-token rewards
    out_mean = module.compute_loss(batch)
    torch.testing.assert_close(out_mean["per_pair_loss"], out["per_pair_loss"])
    torch.testing.assert_close(out_mean["rewards/chosen"], 0.5 * cr)
    torch.testing.assert_close(out_mean["logps/chosen"], (logps.sum(1) / n).chunk(2)[0].detach())


# --- (d) the MMedPO normaliser -----------------------------------------------------------------
def test_mmedpo_normaliser_mean_one_variance_and_clip():
    raw = torch.tensor([0.0, 0.2, 0.4, 0.5, 0.5, 0.6, 0.8, 1.0])  # symmetric about 0.5
    mu, sigma = weight_moments(raw)
    unclipped = 1 + math.sqrt(0.1) * (raw - mu) / sigma
    assert unclipped.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert unclipped.var(unbiased=False).item() == pytest.approx(0.1, abs=1e-6)
    w = normalize_weights(raw, "mmedpo")
    assert w.mean().item() == pytest.approx(1.0, abs=1e-6)
    assert w.min().item() == pytest.approx(0.75) and w.max().item() == pytest.approx(1.25)  # clipped
    assert (w[(unclipped > 0.75) & (unclipped < 1.25)] == unclipped[(unclipped > 0.75) & (unclipped < 1.25)]).all()
    assert torch.all(w[1:] >= w[:-1])  # order kept
    # dataset statistics: a batch is rescaled with the split's mean/std, not its own
    assert normalize_weights(torch.tensor([0.5]), "mmedpo", (mu, sigma)).item() == pytest.approx(1.0)
    assert normalize_weights(torch.tensor([0.6]), "mmedpo", (mu, sigma)).item() == pytest.approx(
        1 + math.sqrt(0.1) * 0.1 / sigma
    )
    assert normalize_weights(torch.full((3,), 0.7), "mmedpo").tolist() == [1.0, 1.0, 1.0]  # no spread -> 1
    assert normalize_weights(raw, "raw") is raw and normalize_weights(raw, "none").tolist() == [1.0] * 8


# --- (e) the reference model -------------------------------------------------------------------
def test_reference_with_adapter_off_is_the_base_model(tiny):
    dm, make = tiny
    base = make("none").model  # same init seed: the weights under the adapter
    bb = make("lora")
    module = DPOModule(bb)
    assert module.reference.adapter_off and module.reference.copy is None  # no second copy under LoRA
    perturb(module.model, scale=0.5, only="lora_B")  # a trained adapter
    batch = module.collator(text_pairs(dm.data["train"], 3))
    base.eval(), module.model.eval()
    with torch.no_grad():
        want, mask = answer_token_logps(base, batch)
        policy, _ = answer_token_logps(module.model, batch)
        with module.reference.model() as ref:
            got, _ = answer_token_logps(ref, batch)
        again, _ = answer_token_logps(module.model, batch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (policy - want).abs().max() > 1e-2  # the adapter matters ...
    torch.testing.assert_close(again, policy)  # ... and is back on after the reference pass
    assert mask.any(1).all()


def test_frozen_copy_reference_without_peft(tiny):
    dm, make = tiny
    module = DPOModule(make())
    batch = module.collator(text_pairs(dm.data["train"], 2))
    with module.reference.model() as ref:
        before, _ = answer_token_logps(ref, batch)
    perturb(module.model, scale=0.05)
    with module.reference.model() as ref:
        assert ref is module.reference.copy and not any(p.requires_grad for p in ref.parameters())
        after, _ = answer_token_logps(ref, batch)
    torch.testing.assert_close(after, before)  # training the policy leaves the reference alone
    assert not any(k.startswith("reference") for k in module.state_dict())  # not in checkpoints
    out = module.compute_loss(batch)
    out["loss"].backward()
    assert all(p.grad is None for p in module.reference.copy.parameters())


# --- the collator -----------------------------------------------------------------------------
def test_collator_rows_images_and_labels(tiny, tmp_path):
    dm, make = tiny
    bb = make()
    module = DPOModule(bb)
    s = dm.data["train"][0]
    noised = tmp_path / "noised.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(noised)
    visual = Sample(id="v", images=s.images, messages=s.messages, rejected=Rejected(images=[str(noised)]), weight=0.3)
    text = text_pairs(dm.data["train"], 1)[0]
    batch = module.collator([visual, text])
    assert batch["input_ids"].shape[0] == 4 and batch["weights"].tolist() == pytest.approx([0.3, 1.0])
    tok = bb.tokenizer
    answers = [tok.decode(batch["input_ids"][i][batch["labels"][i] != IGNORE]) for i in range(4)]
    assert answers[0].strip().startswith(s.target) and answers[2] == answers[0]  # visual pair: same answer
    assert answers[1].strip().startswith(text.target) and answers[3].strip().startswith(
        text.rejected.messages[-1]["content"]
    )
    pv = batch["pixel_values"]
    assert not torch.allclose(pv[0], pv[2])  # ... on its own (noised) image
    torch.testing.assert_close(pv[1], pv[3])  # text pair: same image
    with pytest.raises(ValueError, match="rejected"):
        module.collator([s])


# --- (f) a few DPO steps through train() ------------------------------------------------------
def _write_preference_set(src: Path, dst: Path) -> None:
    """MAU JSONL preference records from the synthetic set: odd records are text pairs (a wrong
    answer), even ones visual pairs (the same answer on a heavily noised copy of the image)."""
    rng = np.random.default_rng(0)
    (dst / "images").mkdir(parents=True)
    for split in ("train", "val", "test"):
        recs = [json.loads(line) for line in (src / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        out = []
        for i, r in enumerate(recs):
            for rel in r["images"]:
                if not (dst / rel).exists():
                    shutil.copy(src / rel, dst / rel)
            if i % 2:
                wrong = next(o["answer"] for o in recs[i + 1 :] + recs if o["answer"] != r["answer"])
                r["rejected"] = {"answer": wrong, "images": None}
            else:
                noised = []
                for rel in r["images"]:
                    im = np.asarray(Image.open(src / rel).convert("RGB"), dtype=np.float32)
                    im = 0.2 * im + 0.8 * rng.uniform(0, 255, im.shape)
                    name = rel.replace(".png", f"-noised{i}.png")
                    Image.fromarray(im.astype(np.uint8)).save(dst / name)
                    noised.append(name)
                r["rejected"] = {"answer": r["answer"], "images": noised}
            r["weight"] = float(rng.choice([0.2, 0.5, 0.8, 1.0]))
            out.append(json.dumps(r))
        (dst / f"{split}.jsonl").write_text("\n".join(out) + "\n")


def test_dpo_steps_through_train_raise_preference_margin(tiny, tmp_path):
    from unveil.train import train

    dm, make = tiny
    data = tmp_path / "pref"
    _write_preference_set(Path(dm.root), data)
    steps = 12
    cfg = compose(
        [
            *make.paths,
            "data=mau_jsonl",
            f"data.root={data}",
            "data.synthetic=null",
            "data.num_workers=0",
            "data.batch_size=8",
            "data.eval_batch_size=8",
            "stage.weight_norm=mmedpo",
            "stage.optim.lr=1e-3",
            "stage.optim.warmup_ratio=0",
            f"trainer.max_steps={steps}",
            f"trainer.val_check_interval={steps}",
            "+trainer.enable_progress_bar=false",
            "eval.enabled=false",
            "logger=none",
            "~callbacks",
            "+trainer.enable_checkpointing=false",
            f"paths.output_dir={tmp_path / 'run'}",
        ]
    )
    metrics = train(cfg)
    # at step 0 the policy is the reference: every margin is exactly 0 and no pair is "won"
    assert metrics["val/rewards/margins"] > 0.1, metrics
    assert metrics["val/rewards/accuracies"] > 0.5, metrics
    assert metrics["train/rewards/margins"] > 0, metrics
    assert metrics["val/loss"] < math.log(2) - 0.01, metrics
    assert (tmp_path / "run" / "backbone" / "config.json").exists()


def test_training_on_records_without_pairs_fails_fast(tiny, tmp_path):
    from unveil.train import train

    _, make = tiny
    cfg = compose(
        [
            *make.paths,
            "eval.enabled=false",
            "logger=none",
            "~callbacks",
            "+trainer.enable_checkpointing=false",
            f"paths.output_dir={tmp_path / 'run'}",
        ]
    )  # the synthetic set: no `rejected` fields
    with pytest.raises(ValueError, match="no 'rejected' side"):
        train(cfg)
