"""stage=grpo / stage=ppo: configs compose, rollouts and log-probs are right, the reference policy,
a few steps through ``unveil.train.train``, and a toy task on which RL raises the reward."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf.errors import InterpolationResolutionError

import unveil.utils.resolvers  # noqa: F401
from unveil.data.datamodule import UnveilDataModule
from unveil.data.records import load_records
from unveil.models.policy import ReferencePolicy, position_ids_from_mask
from unveil.rewards.base import RewardOutput
from unveil.stages.rollout import sample_rollouts

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


@pytest.fixture(scope="module")
def tiny():
    """The debug-size synthetic data and a factory for the tiny LLaVA (random init, or LoRA)."""

    from unveil.models.factory import build_backbone

    cfg = compose(["debug=fast"])
    dm = load_records(cfg.data)

    def backbone(peft: str = "none"):
        c = compose(["debug=fast", f"peft={peft}"])
        return build_backbone(c.model, peft=c.peft, corpus=dm.corpus(), cache_dir=c.paths.cache_dir)

    return dm, backbone


class TokenReward:
    """Toy reward: the fraction of a completion's tokens that fall in ``target`` (a set of ids)."""

    vocab: list[str] = []

    def __init__(self, target: set[int]):
        self.target = torch.tensor(sorted(target))

    def __call__(self, batch) -> RewardOutput:
        ids, m = batch.completion_ids, batch.completion_mask
        hit = torch.isin(ids, self.target.to(ids.device)).float()
        r = ((hit * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu()
        stats = {"rewards/toy/mean": float(r.mean()), "reward": float(r.mean())}
        return RewardOutput(total=r, per_head={"toy": r}, stats=stats)


def mixed_batch(module, dm, n=4):
    """Localisation and closed prompts have different lengths: the batch is left-padded."""
    train = dm.data["train"]
    loc = [s for s in train if s.task == "localize"][: n // 2]
    closed = [s for s in train if s.task == "vqa_closed"][: n - len(loc)]
    batch = module.collator(loc + closed)
    assert (batch["attention_mask"] == 0).any(), "expected left padding"
    return batch


# --- configs ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "stage,target", [("grpo", "unveil.stages.grpo.GRPOModule"), ("ppo", "unveil.stages.ppo.PPOModule")]
)
def test_stage_configs_compose(stage, target):
    cfg = compose(["debug=fast", f"stage={stage}", "reward=umed", "trainer.gradient_clip_val=0.7"])
    assert cfg.stage._target_ == target
    from unveil.utils.plug import locate

    assert locate(cfg.stage._target_, "stage").needs_rewards is True
    assert cfg.stage.max_grad_norm == 0.7  # follows trainer.gradient_clip_val
    assert cfg.stage.val_num_generations == cfg.stage.num_generations
    assert set(cfg.reward) == {"relevance", "localization", "vision_relevance"}


@pytest.mark.parametrize("exp,target", [("umed_ppo", "PPOModule"), ("umed_grpo", "GRPOModule")])
def test_experiment_configs(exp, target):
    cfg = compose([f"experiment={exp}", "model.init_from=/some/sft/run"])
    assert cfg.stage._target_.endswith(target)
    assert cfg.model.init_from == "/some/sft/run"
    assert list(cfg.data.train_tasks) == ["localize"]
    assert cfg.model.freeze.vision is True
    assert cfg.reward.localization.norm == "max" and cfg.reward.vision_relevance.norm == "max"
    assert cfg.task_name == exp
    ablated = compose([f"experiment={exp}", "model.init_from=/x", "reward=relevance_only"])
    assert set(ablated.reward) == {"relevance"}
    with pytest.raises(InterpolationResolutionError, match="model.init_from must be set"):
        _ = compose([f"experiment={exp}"]).model.init_from  # RL starts from an SFT run: it must be named


def test_unknown_loss_type_is_refused(tiny):
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    with pytest.raises(ValueError, match="loss_type"):
        GRPOModule(make(), TokenReward({1}), loss_type="gspo_typo")


def test_ppo_score_baseline_default_and_refused_typo(tiny):
    from unveil.stages.ppo import PPOModule

    assert compose(["stage=ppo"]).stage.score_baseline == "group"  # per-prompt offsets never become advantages
    dm, make = tiny
    with pytest.raises(ValueError, match="score_baseline"):
        PPOModule(make(), TokenReward({1}), score_baseline="groupmean")


# --- rollouts and log-probs ----------------------------------------------------------------------
def test_rollout_shapes_and_logprobs_match_unpadded_and_generate(tiny):
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    bb = make()
    module = GRPOModule(bb, TokenReward({5}), beta=0.0)
    batch = mixed_batch(module, dm, 4)
    torch.manual_seed(0)
    G = 3
    ro = sample_rollouts(bb, batch, G, max_new_tokens=10)
    assert len(ro) == 4 * G and ro.group.tolist() == [i for i in range(4) for _ in range(G)]
    assert [s.id for s in ro.samples] == [s.id for s in batch["samples"] for _ in range(G)]
    assert ro.inputs["pixel_values"].shape[0] == 4 * G
    assert torch.equal(ro.inputs["input_ids"][G], batch["input_ids"][1])  # prompt 1, first completion
    assert set(image_id for image_id in bb.image_token_ids).isdisjoint(
        ro.completion_ids[ro.completion_mask.bool()].tolist()
    )

    lp = ro.logprobs(bb.model, with_entropy=True)
    assert lp.logps.shape == ro.completion_ids.shape
    assert (lp.logps[ro.completion_mask == 0] == 0).all() and (lp.logps[ro.completion_mask == 1] < 0).all()
    assert (lp.entropy[ro.completion_mask == 1] > 0).all()
    # chunked forward passes give the same numbers
    assert torch.allclose(ro.logprobs(bb.model, chunk_size=5).logps, lp.logps, atol=1e-5)

    # each row alone, without any padding, gives the same log-probs
    with torch.no_grad():
        for i in (0, G + 1, 3 * G + 2):
            keep = ro.inputs["attention_mask"][i].bool()
            n = int(ro.completion_mask[i].sum())
            ids = torch.cat([ro.inputs["input_ids"][i][keep], ro.completion_ids[i, :n]]).unsqueeze(0)
            logits = bb.model(input_ids=ids, pixel_values=ro.inputs["pixel_values"][i : i + 1]).logits[0]
            ref = torch.log_softmax(logits[-n - 1 : -1].float(), -1).gather(-1, ids[0, -n:, None]).squeeze(-1)
            assert torch.allclose(lp.logps[i, :n], ref, atol=1e-4), i

    # and they are the log-probs of the distribution generate() sampled from
    model = bb.model
    with torch.no_grad():
        out = model.generate(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
            do_sample=True,
            max_new_tokens=6,
            min_new_tokens=6,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=bb.tokenizer.pad_token_id,
        )
    gen_lp = torch.stack([torch.log_softmax(l.float(), -1) for l in out.logits], 1)
    comp = out.sequences[:, batch["input_ids"].shape[1] :]
    gen_lp = gen_lp.gather(-1, comp[..., None]).squeeze(-1)
    from unveil.stages.rollout import Rollout

    ro2 = Rollout(
        inputs={k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")},
        completion_ids=comp,
        completion_mask=torch.ones_like(comp),
        texts=[""] * 4,
        samples=batch["samples"],
        group=torch.arange(4),
    )
    assert torch.allclose(ro2.logprobs(model).logps, gen_lp, atol=1e-4)


def test_concat_rollouts_repads_and_keeps_logprobs(tiny):
    """Two rollouts with different prompt and completion lengths, joined: same log-probs per
    completion, distinct groups, extras carried."""
    from unveil.stages.grpo import GRPOModule
    from unveil.stages.rollout import concat_rollouts

    dm, make = tiny
    bb = make()
    module = GRPOModule(bb, TokenReward({5}), beta=0.0)
    train = dm.data["train"]
    loc = [s for s in train if s.task == "localize"][:2]
    closed = [s for s in train if s.task == "vqa_closed"][:1]
    torch.manual_seed(0)
    a = sample_rollouts(bb, module.collator(loc), 2, max_new_tokens=10)
    b = sample_rollouts(bb, module.collator(closed), 3, max_new_tokens=4)
    assert a.inputs["input_ids"].shape[1] != b.inputs["input_ids"].shape[1]
    for r in (a, b):
        r.extra["reward"] = torch.rand(len(r))
    both = concat_rollouts([a, b], bb.tokenizer.pad_token_id)
    assert len(both) == 7 and both.group.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert torch.equal(both.extra["reward"], torch.cat([a.extra["reward"], b.extra["reward"]]))
    assert [s.id for s in both.samples] == [s.id for s in a.samples + b.samples]
    joined = both.logprobs(bb.model).logps
    for part, rows in ((a, slice(0, 4)), (b, slice(4, 7))):
        own = part.logprobs(bb.model).logps
        assert torch.allclose(joined[rows, : own.shape[1]], own, atol=1e-4)
        assert (joined[rows, own.shape[1] :] == 0).all()  # right padding of the shorter completions


def test_position_ids_follow_left_padding():
    am = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 0]])
    assert position_ids_from_mask(am).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 0]]


def ref_logprobs(ref, ro):
    with ref.model() as m:
        return ro.logprobs(m).logps


# --- the reference policy --------------------------------------------------------------------------
def test_reference_is_adapter_off_under_lora(tiny):
    import copy

    dm, make = tiny
    from unveil.stages.grpo import GRPOModule

    plain = make()
    base = copy.deepcopy(plain.model)  # the same init (seeded), without LoRA
    bb = make("lora")
    module = GRPOModule(bb, TokenReward({5}), beta=0.1)
    module.setup("fit")
    ref = module.reference
    assert ref.adapter_off and ref.copy is None  # no second copy of the model
    torch.manual_seed(1)
    ro = sample_rollouts(bb, mixed_batch(module, dm, 2), 2, max_new_tokens=8)
    with torch.no_grad():
        base_lp = ro.logprobs(base).logps
        # before any update LoRA is a no-op (B = 0): policy = reference = base model
        assert torch.allclose(ro.logprobs(bb.model).logps, base_lp, atol=1e-5)
        assert torch.allclose(ref_logprobs(ref, ro), base_lp, atol=1e-5)
        for name, p in bb.model.named_parameters():  # an "update" of the adapter
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
        policy_lp = ro.logprobs(bb.model).logps
        assert not torch.allclose(policy_lp, base_lp, atol=1e-3)
        assert torch.allclose(ref_logprobs(ref, ro), base_lp, atol=1e-5)  # adapter off = the base model
        assert torch.allclose(ro.logprobs(bb.model).logps, policy_lp)  # adapter back on afterwards


def test_reference_is_frozen_copy_without_lora(tiny):
    dm, make = tiny
    from unveil.stages.ppo import PPOModule

    bb = make()
    module = PPOModule(bb, TokenReward({5}), kl_coef=0.1)
    module.setup("fit")
    ref = module.reference
    assert isinstance(ref, ReferencePolicy) and not ref.adapter_off
    assert not any(p.requires_grad for p in ref.copy.parameters())
    assert not any(k.startswith("reference") for k in module.state_dict())  # neither saved nor optimised
    assert {id(p) for p in module.trainable_parameters()}.isdisjoint(id(p) for p in ref.copy.parameters())
    assert any(p is module.value_head.linear.weight for p in module.trainable_parameters())
    torch.manual_seed(2)
    ro = sample_rollouts(bb, mixed_batch(module, dm, 2), 2, max_new_tokens=8)
    before = ref_logprobs(ref, ro)
    with torch.no_grad():
        for p in bb.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    assert torch.equal(ref_logprobs(ref, ro), before)
    assert not torch.allclose(ro.logprobs(bb.model).logps, before, atol=1e-4)


# --- a few steps through unveil.train.train ----------------------------------------------------------
def run_train(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    from unveil.train import train

    out = tmp_path / "run"
    cfg = compose(
        [
            "debug=fast",
            "reward=umed",
            f"paths.output_dir={out}",
            "data.batch_size=2",
            "data.train_tasks=[localize,vqa_closed]",
            "data.max_samples.val=2",
            "data.max_samples.test=4",
            "stage.num_generations=3",
            "stage.max_new_tokens=12",
            "stage.log_completions_every=1",
            "trainer.val_check_interval=2",
            "eval.max_new_tokens=8",
            *overrides,
        ]
    )
    return train(cfg), out


def check_run(metrics: dict, out: Path, steps: int) -> list[dict]:
    for k in (
        "train/reward",
        "train/rewards/localization/mean",
        "train/rewards/relevance/mean",
        "train/kl",
        "train/clip_ratio/region_mean",
        "train/entropy",
        "train/completions/mean_length",
        "train/loss",
        "val/loss",
        "val/reward",
    ):
        assert k in metrics and metrics[k] == metrics[k], k
    assert 0 < metrics["train/completions/mean_length"] <= 12
    assert (
        0 < metrics["train/time/generate_s"] < metrics["train/time/step_s"]
    )  # the step's time, split by where it goes
    assert metrics["train/time/reward_s"] >= 0 and metrics["train/time/update_s"] > 0
    assert 0 <= metrics["train/frac_reward_zero_std"] <= 1
    rows = [json.loads(l) for l in (out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == steps * 2 * 3  # every rollout step: both prompts x 3 completions
    assert {
        "prompt",
        "completion",
        "reference",
        "reward",
        "advantage",
        "rewards/relevance",
        "rewards/localization",
    } <= set(rows[0])
    assert (out / "backbone" / "config.json").exists() and (out / "metrics.json").exists()
    return rows


def test_grpo_steps_lora_dapo_with_inner_iterations(tiny, tmp_path):
    # 2 rollout steps x (num_iterations 2) = 4 optimiser steps; LoRA: the reference is the adapter off
    metrics, out = run_train(
        tmp_path, "stage=grpo", "peft=lora", "stage.loss_type=dapo", "stage.num_iterations=2", "trainer.max_steps=4"
    )
    rows = check_run(metrics, out, steps=2)
    assert (
        "train/rewards/vision_relevance/mean" in metrics or "train/rewards/vision_relevance/applicable_frac" in metrics
    )
    assert metrics["train/kl"] >= 0 and metrics["train/approx_kl"] >= 0
    assert all(
        abs(sum(r["advantage"] for r in rows if r["rollout_step"] == s and r["group"] == g)) < 1e-3
        for s in (0, 1)
        for g in (0, 1)
    )  # group-relative: advantages sum to 0 per group


def test_ppo_steps_value_head_saved(tiny, tmp_path):
    metrics, out = run_train(
        tmp_path,
        "stage=ppo",
        "stage.ppo_epochs=1",
        "stage.num_minibatches=2",
        "trainer.max_steps=4",
        "stage.ent_coef=0.01",
    )
    check_run(metrics, out, steps=2)
    for k in ("train/value_loss", "train/policy_loss", "train/value_mean", "train/return_mean"):
        assert k in metrics
    head = torch.load(out / "value_head.pt", weights_only=True)
    assert head["linear.weight"].abs().sum() > 0  # zero-initialised, then trained
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(ckpt["state_dict"]["value_head.linear.weight"], head["linear.weight"])
    assert ckpt["global_step"] == 4  # optimiser steps: 2 rollout steps x 2 minibatches


def fit_batches(module, dm, n_batches: int, tmp_path):
    """One epoch of ``n_batches`` rollout batches of 4 prompts; returns the Trainer."""
    import pytorch_lightning as pl

    batch_size, dm.batch_size = dm.batch_size, 4
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=n_batches,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=UnveilDataModule(dm, module.collator).train_dataloader())
    dm.batch_size = batch_size
    return trainer


class OddGroupReward(TokenReward):
    """Rewards 0, 1, 2, ... on the completions of the odd-numbered prompts of a batch (spread
    always); 0 for every completion of the even ones, or of all prompts when ``constant``."""

    def __init__(self, target: set[int], constant: bool = False):
        super().__init__(target)
        self.constant = constant

    def __call__(self, batch) -> RewardOutput:
        g = batch.group.cpu()
        r = torch.zeros(len(g)) if self.constant else torch.where(g % 2 == 1, torch.arange(len(g)).float(), 0.0)
        return RewardOutput(total=r, per_head={"toy": r}, stats={"reward": float(r.mean())})


@pytest.mark.parametrize("constant", [False, True])
def test_grpo_filter_zero_spread(tiny, tmp_path, constant):
    """Groups whose completions all scored the same leave the update; a batch of only such groups
    makes no optimiser step at all."""
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    bb = make()
    vocab = len(bb.tokenizer)
    reward = OddGroupReward(set(range(vocab - 40, vocab)) - set(bb.image_token_ids), constant)
    module = GRPOModule(
        bb,
        reward,
        beta=0.0,
        optim={"lr": 1e-2, "scheduler": "constant"},
        num_generations=4,
        max_new_tokens=8,
        log_completions_every=0,
        filter_zero_spread=True,
    )
    before = [p.detach().clone() for p in bb.model.parameters()]
    trainer = fit_batches(module, dm, 2, tmp_path)
    changed = any(not torch.equal(a, b) for a, b in zip(before, bb.model.parameters()))
    if constant:
        assert trainer.global_step == 0 and not changed
        assert float(trainer.callback_metrics["train/kept_frac"]) == 0.0
    else:
        assert trainer.global_step == 2 and changed
        assert float(trainer.callback_metrics["train/kept_frac"]) == pytest.approx(0.5)  # the 2 odd prompts of 4


def test_grpo_resume_keeps_the_initial_reference(tiny, tmp_path):
    """Resuming from last.ckpt restores the policy and optimiser step, while the KL reference stays
    the policy the stage started from (it is taken before the restore and never saved)."""
    import copy

    import pytorch_lightning as pl

    from unveil.stages.grpo import GRPOModule

    dm, make = tiny

    def fit(max_steps: int, ckpt_path=None):
        torch.manual_seed(0)
        bb = make()  # the same initial weights every time, as model.init_from gives
        init = copy.deepcopy(bb.model.state_dict())
        reward = TokenReward(set(range(len(bb.tokenizer) - 40, len(bb.tokenizer))) - set(bb.image_token_ids))
        module = GRPOModule(
            bb,
            reward,
            beta=0.04,
            optim={"lr": 1e-2, "scheduler": "constant"},
            num_generations=4,
            max_new_tokens=8,
            log_completions_every=0,
        )
        saved_bs, dm.batch_size = dm.batch_size, 2
        trainer = pl.Trainer(
            max_steps=max_steps,
            logger=False,
            enable_progress_bar=False,
            accelerator="cpu",
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(
            module, train_dataloaders=UnveilDataModule(dm, module.collator).train_dataloader(), ckpt_path=ckpt_path
        )
        dm.batch_size = saved_bs
        return trainer, module, init

    trainer, module, _ = fit(2)
    ckpt = tmp_path / "step2.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert not any(k.startswith("reference") for k in state)  # no second model copy in the checkpoint
    trained = {k: v.clone() for k, v in module.model.state_dict().items()}

    trainer, module, init = fit(3, ckpt_path=str(ckpt))
    assert trainer.global_step == 3
    ref = module.reference.copy.state_dict()
    assert all(torch.equal(ref[k], init[k]) for k in init)  # the reference is the initial policy ...
    assert any(not torch.equal(trained[k], init[k]) for k in init)  # ... not the restored one it resumed from


@pytest.mark.parametrize("constant", [False, True])
def test_grpo_fill_batch_holds_groups_until_a_batch_is_full(tiny, tmp_path, constant):
    """Half of each batch's groups have spread: two rollout batches make one update of a full batch.
    With no spread at all, max_fill_batches batches pass and nothing is updated."""
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    bb = make()
    vocab = len(bb.tokenizer)
    reward = OddGroupReward(set(range(vocab - 40, vocab)) - set(bb.image_token_ids), constant)
    module = GRPOModule(
        bb,
        reward,
        beta=0.04,
        optim={"lr": 1e-2, "scheduler": "constant"},
        num_generations=4,
        max_new_tokens=8,
        log_completions_every=0,
        fill_batch=True,
        max_fill_batches=3,
    )
    sizes = []  # per rollout batch: completions updated on (None = no update)
    pick = module.groups_with_spread

    def recording(ro, n_prompts):
        out = pick(ro, n_prompts)
        sizes.append(None if out is None else len(out))
        return out

    module.groups_with_spread = recording
    trainer = fit_batches(module, dm, 4, tmp_path)
    if constant:
        assert trainer.global_step == 0 and sizes == [None] * 4
    else:
        assert trainer.global_step == 2
        assert sizes == [None, 16, None, 16]  # 2 + 2 groups of 4 completions, every second batch
        assert float(trainer.callback_metrics["train/fill_batches"]) == 2.0


def test_grpo_fill_batch_resumes_with_the_held_groups(tiny, tmp_path):
    """A checkpoint taken while groups are held for the refill stores them (loadable with
    weights_only=True); the resumed run updates on them together with the next batch's groups,
    as the uninterrupted run does (sizes [None, 16] in the test above)."""
    import pytorch_lightning as pl

    from unveil.stages.grpo import GRPOModule

    dm, make = tiny

    def fit(epochs: int, ckpt_path=None):  # one rollout batch per epoch
        bb = make()
        vocab = len(bb.tokenizer)
        reward = OddGroupReward(set(range(vocab - 40, vocab)) - set(bb.image_token_ids))
        module = GRPOModule(
            bb,
            reward,
            beta=0.04,
            optim={"lr": 1e-2, "scheduler": "constant"},
            num_generations=4,
            max_new_tokens=8,
            log_completions_every=0,
            fill_batch=True,
            max_fill_batches=3,
        )
        sizes, pick = [], module.groups_with_spread

        def recording(ro, n_prompts):
            out = pick(ro, n_prompts)
            sizes.append(None if out is None else len(out))
            return out

        module.groups_with_spread = recording
        saved, dm.batch_size = dm.batch_size, 4
        pl.seed_everything(0)
        trainer = pl.Trainer(
            max_epochs=epochs,
            limit_train_batches=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            accelerator="cpu",
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=str(tmp_path),
        )
        trainer.fit(
            module, train_dataloaders=UnveilDataModule(dm, module.collator).train_dataloader(), ckpt_path=ckpt_path
        )
        dm.batch_size = saved
        return trainer, module, sizes

    trainer, module, sizes = fit(1)
    assert sizes == [None] and trainer.global_step == 0  # 2 groups with spread held, no update yet
    held = module._pending[0]
    trainer.save_checkpoint(tmp_path / "mid_refill.ckpt")
    state = torch.load(tmp_path / "mid_refill.ckpt", map_location="cpu", weights_only=True)["grpo_fill_batch"]
    assert state["batches"] == 1 and len(state["held_by_rank"]) == 1  # one process: one rank's groups
    (mine,) = state["held_by_rank"]
    assert len(mine) == 1 and len(mine[0]["texts"]) == 8
    restored = type(held).from_state(mine[0])
    assert restored.texts == held.texts and restored.samples == held.samples
    assert torch.equal(restored.completion_ids, held.completion_ids) and torch.equal(restored.group, held.group)
    assert torch.equal(restored.extra["advantages"], held.extra["advantages"])

    trainer, module, sizes = fit(2, ckpt_path=str(tmp_path / "mid_refill.ckpt"))
    assert sizes == [16] and trainer.global_step == 1  # the 2 held groups + 2 new ones: a full batch of 4
    assert module._pending == [] and module._pending_batches == 0


def test_held_groups_go_back_to_their_rank_and_none_are_lost_on_fewer_ranks():
    from unveil.stages.grpo import held_for_rank

    saved = [["a0", "a1"], ["b0"], [], ["d0"]]  # four ranks' held groups, as a checkpoint stores them
    assert [held_for_rank(saved, r, 4) for r in range(4)] == saved
    assert [held_for_rank(saved, r, 2) for r in range(2)] == [["a0", "a1"], ["b0", "d0"]]
    assert held_for_rank(saved, 0, 1) == ["a0", "a1", "b0", "d0"]
    assert held_for_rank([["a0"]], 1, 2) == []  # a rank the old run did not have starts empty


def test_grpo_dynamic_sampling_waits_for_every_rank(tiny):
    """Under DDP all ranks must update at the same steps: a rank with nothing kept updates on its
    whole (zero-advantage) rollout, and a full rank waits for the others up to max_fill_batches."""
    from unveil.stages.grpo import GRPOModule

    dm, make = tiny
    bb = make()
    module = GRPOModule(bb, TokenReward({5}), beta=0.0)
    loc = [s for s in dm.data["train"] if s.task == "localize"][:4]
    torch.manual_seed(0)
    ro = sample_rollouts(bb, module.collator(loc), 2, max_new_tokens=4)

    def scored(values):
        ro.extra["reward"] = torch.tensor(values, dtype=torch.float)
        return ro

    flat, half = [0.0] * 8, [0, 1, 0, 0, 0, 1, 0, 0]  # half: groups 0 and 2 have spread
    module._all_ranks = lambda decision: decision  # one process
    assert module.groups_with_spread(scored(flat), 4) is None
    module._all_ranks = lambda decision: False  # another rank disagrees: it has spread / is not full yet
    assert len(module.groups_with_spread(scored(flat), 4)) == 8  # update on everything, with zero advantages
    module.fill_batch, module.max_fill_batches = True, 3
    assert module.groups_with_spread(scored(half), 2) is None  # full here (2 groups), but the others are not
    assert module.groups_with_spread(scored(half), 2) is None
    out = module.groups_with_spread(scored(half), 2)  # max_fill_batches reached: every rank updates
    assert out is not None and len(out) == 4 and module._fill_batches == 3  # 6 groups held, a batch of 2 kept


# --- a toy task: RL raises the reward -------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_raises_toy_reward(tiny, tmp_path, algo):
    """Reward = fraction of completion tokens in a fixed set of 40 ids (about 10% at random init)."""
    import pytorch_lightning as pl

    from unveil.stages.grpo import GRPOModule
    from unveil.stages.ppo import PPOModule

    dm, make = tiny
    bb = make()
    vocab = len(bb.tokenizer)
    reward = TokenReward(set(range(vocab - 40, vocab)) - set(bb.image_token_ids))
    lr = {"grpo": 2e-2, "ppo": 1e-2}[algo]
    kw = dict(optim={"lr": lr, "scheduler": "constant"}, num_generations=8, max_new_tokens=16, log_completions_every=0)
    module = (
        GRPOModule(bb, reward, beta=0.0, **kw)
        if algo == "grpo"
        else PPOModule(bb, reward, kl_coef=0.0, ppo_epochs=1, **kw)
    )
    prompts = module.collator([s for s in dm.data["train"] if s.task == "localize"][:8])

    def mean_reward() -> float:
        torch.manual_seed(123)
        return float(reward(sample_rollouts(bb, prompts, 8, 16)).total.mean())

    before = mean_reward()
    batch_size, dm.batch_size = dm.batch_size, 4
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_steps=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    trainer.fit(module, train_dataloaders=UnveilDataModule(dm, module.collator).train_dataloader())
    dm.batch_size = batch_size
    after = mean_reward()
    print(f"{algo}: mean toy reward {before:.3f} -> {after:.3f}")
    assert before < 0.2 and after > before + 0.2, (before, after)


@pytest.mark.parametrize("model", ["tiny_qwen2_vl", "tiny_idefics3"])
def test_rollout_logprobs_other_families(tiny, model):
    """Patch-row pixel values + image grids (Qwen2-VL, M-RoPE) and per-sample image stacks (Idefics3):
    rows repeated per completion and scored in a padded batch equal each prompt scored alone."""
    from unveil.data.collate import PromptCollator
    from unveil.models.factory import build_backbone
    from unveil.models.inputs import model_inputs

    dm, _ = tiny
    c = compose(["debug=fast", f"model={model}"])
    bb = build_backbone(c.model, peft=None, corpus=dm.corpus(), cache_dir=c.paths.cache_dir)
    collate = PromptCollator(bb)
    train = dm.data["train"]
    batch = collate([s for s in train if s.task == "localize"][:2] + [s for s in train if s.task == "vqa_closed"][:1])
    torch.manual_seed(0)
    ro = sample_rollouts(bb, batch, 2, max_new_tokens=6)
    lp = ro.logprobs(bb.model).logps
    assert torch.allclose(ro.logprobs(bb.model, chunk_size=4).logps, lp)
    with torch.no_grad():
        for i in (0, 3, 5):
            alone = model_inputs(collate([ro.samples[i]]))
            n = int(ro.completion_mask[i].sum())
            comp = ro.completion_ids[i : i + 1, :n]
            full = dict(
                alone,
                input_ids=torch.cat([alone["input_ids"], comp], 1),
                attention_mask=torch.cat([alone["attention_mask"], torch.ones_like(comp)], 1),
            )
            if "mm_token_type_ids" in alone:
                full["mm_token_type_ids"] = torch.cat([alone["mm_token_type_ids"], torch.zeros_like(comp)], 1)
            logits = bb.model(**full).logits[0, -n - 1 : -1].float()
            ref = torch.log_softmax(logits, -1).gather(-1, comp[0, :, None]).squeeze(-1)
            assert torch.allclose(lp[i, :n], ref, atol=1e-4), (model, i)
