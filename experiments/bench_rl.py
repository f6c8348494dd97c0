"""Benchmark: one GRPO training step of stage=grpo vs TRL's GRPOTrainer.

Same tiny LLaVA (the default ``model=tiny_llava`` on the debug-size synthetic set, saved once and
loaded by both, since TRL builds its reference model from the policy's path), the same P prompts
(image + question) per step, G completions per prompt, at most T new tokens, temperature 1, fp32 on
CPU, loss ``grpo`` with group std scaling, clip eps 0.2, beta 0.04 (so both run a reference
forward; a frozen copy in both), one pass per rollout (``num_iterations=1``), AdamW, gradient
clipping 1.0, the same cheap reward (fraction of completion tokens in a fixed set of ids).

TRL drives the LLaVA through its conversational multimodal path; the tiny model's chat template
takes plain strings, so TRL's processor gets a copy of it that renders content lists to the very
same text (checked below: identical prompt text and ids).

Each framework runs its own loop over a data set of exactly those P prompts; a callback times each
step from "batch fetched" to "optimizer stepped" (Lightning ``on_train_batch_start/end``;
transformers ``on_step_begin/end``). A step includes prompt processing in both: TRL tokenises and
processes images inside its step, so here our collator runs inside the timed step too. After
warm-up steps the median step time of each is printed, and on the last line ``ratio=<ours/TRL>``
(< 1: ours is faster).

    python experiments/bench_rl.py [--prompts 4] [--generations 4] [--tokens 24] \
        [--warmup 2] [--steps 10] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings

import torch

from unveil.data.records import load_records

# renders HF content lists ({"type": "image"} / {"type": "text"}) exactly as the tiny template renders
# the string "<image>\n<question>"
STRUCTURED_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{{ '\\n' }}"
    "{% elif m['role'] == 'user' %}USER: {% for p in m['content'] %}"
    "{% if p['type'] == 'image' %}{{ '<image>\\n' }}{% else %}{{ p['text'] }}{% endif %}{% endfor %}{{ '\\n' }}"
    "{% elif m['role'] == 'assistant' %}ASSISTANT: "
    "{% for p in m['content'] %}{{ p['text'] }}{% endfor %}{{ '</s>\\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build(prompts: int):
    """The tiny LLaVA saved to a temp dir, reloaded (as both frameworks see it), and P localisation prompts."""
    from hydra import compose, initialize_config_dir

    import unveil.utils.resolvers  # noqa: F401
    from unveil.models.factory import build_backbone
    from unveil.utils.resolvers import project_root

    with initialize_config_dir(config_dir=f"{project_root()}/conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=fast", "stage=grpo"])
    dm = load_records(cfg.data)
    bb = build_backbone(cfg.model, corpus=dm.corpus(), cache_dir=cfg.paths.cache_dir)
    path = tempfile.mkdtemp(prefix="bench_rl_model_")
    bb.save(path)
    cfg.model.init_from = path
    bb = build_backbone(cfg.model, corpus=dm.corpus(), cache_dir=cfg.paths.cache_dir)
    samples = [s for s in dm.data["train"] if s.task == "localize"][:prompts]
    return bb, samples


class TokenReward:
    """Cheap reward shared by both: the fraction of completion tokens that fall in a fixed id set."""

    def __init__(self, vocab_size: int, n: int = 40):
        self.ids = torch.arange(vocab_size - n, vocab_size)

    def score(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hit = torch.isin(ids, self.ids).float() * mask
        return hit.sum(1) / mask.sum(1).clamp(min=1)

    def __call__(self, batch):  # unveil: Rollout -> RewardOutput
        from unveil.rewards.base import RewardOutput

        r = self.score(batch.completion_ids, batch.completion_mask.float()).cpu()
        return RewardOutput(
            total=r,
            per_head={"token": r},
            stats={"rewards/token/mean": float(r.mean()), "reward": float(r.mean())},
        )

    def trl(self, completion_ids, **kw) -> list[float]:  # TRL: reward function over token id lists
        return [float(torch.isin(torch.tensor(c), self.ids).float().mean()) if c else 0.0 for c in completion_ids]


def long_prompts(bb, samples, tokens: int) -> tuple[list, int]:
    """The samples with a clinical-history preamble in the question, so that each prompt (image
    tokens included) is at least ``tokens`` long; and the shortest prompt's length."""
    import dataclasses

    from unveil.data.collate import PromptCollator

    history = "Clinical history: follow-up study, prior findings stable, no new symptoms reported. "
    collate = PromptCollator(bb)
    out, reps = list(samples), 0
    while min(int(m.sum()) for m in collate(out)["attention_mask"]) < tokens:
        reps += 1
        out = []
        for s in samples:
            msgs = [dict(m) for m in s.messages]
            user = next(m for m in msgs if m["role"] == "user")
            user["content"] = user["content"].replace("<image>\n", "<image>\n" + history * reps, 1)
            out.append(dataclasses.replace(s, messages=msgs))
    return out, min(int(m.sum()) for m in collate(out)["attention_mask"])


def time_ours(
    bb, samples, a, reward, share_prompt: bool = True, generations: int | None = None
) -> tuple[list[tuple[float, float]], float]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from unveil.stages.grpo import GRPOModule

    bb = copy.copy(bb)
    bb.model = copy.deepcopy(bb.model)
    lengths: list[float] = []

    class Bench(GRPOModule):  # collation inside the timed step, as TRL processes prompts inside its step
        def training_step(self, samples, batch_idx):
            return super().training_step(self.collator(samples), batch_idx)

        def log_step(self, ro, reward, metrics, prefix="train"):
            lengths.append(float(ro.lengths.float().mean()))

    module = Bench(
        bb,
        reward,
        optim={"lr": a.lr, "weight_decay": 0.0, "scheduler": "constant"},
        num_generations=generations or a.generations,
        max_new_tokens=a.tokens,
        share_prompt=share_prompt,
        temperature=1.0,
        beta=0.04,
        epsilon=0.2,
        loss_type="grpo",
        num_iterations=1,
        max_grad_norm=1.0,
        log_completions_every=0,
    )
    times: list[tuple[float, float]] = []

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

    loader = DataLoader(samples, batch_size=len(samples), shuffle=False, collate_fn=list)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=a.warmup + a.steps,
        max_epochs=-1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Timer()],
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(module, train_dataloaders=loader)
    return times[a.warmup :], statistics.mean(lengths)


def time_trl(bb, samples, a, reward) -> tuple[list[tuple[float, float]], float]:
    from datasets import Dataset
    from PIL import Image
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
    from trl.data_utils import prepare_multimodal_messages

    processor = copy.deepcopy(bb.processor)
    processor.chat_template = STRUCTURED_TEMPLATE
    rows = []
    for s in samples:
        msgs = [
            {**m, "content": m["content"].replace("<image>\n", "").replace("<image>", "")} for m in s.prompt_messages
        ]
        rows.append({"prompt": msgs, "image": Image.open(s.images[0]).convert("RGB")})
        # TRL's rendering of the prompt = ours, token for token
        theirs = processor.apply_chat_template(
            prepare_multimodal_messages(msgs, images=[rows[-1]["image"]]), add_generation_prompt=True, tokenize=False
        )
        ours = bb.render(s.prompt_messages, add_generation_prompt=True)
        assert theirs == ours, (theirs, ours)

    times: list[tuple[float, float]] = []
    lengths: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    n = len(samples) * a.generations
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=n,
        num_generations=a.generations,
        max_completion_length=a.tokens,
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        beta=0.04,
        epsilon=0.2,
        loss_type="grpo",
        scale_rewards="group",
        num_iterations=1,
        max_steps=a.warmup + a.steps,
        learning_rate=a.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        disable_dropout=True,
        log_completions=False,
        seed=0,
    )
    model = copy.deepcopy(bb.model)  # loaded from `path`: TRL builds its reference model from there
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward.trl,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=processor,
        callbacks=[Timer()],
    )
    trainer.remove_callback(PrinterCallback)  # logging_steps=1 feeds the length metric; do not print every log
    trainer.train()
    return times[a.warmup :], statistics.mean(lengths) if lengths else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=24, help="max new tokens per completion")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for both)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--long-generations", type=int, default=8, help="G of the long-prompt comparison")
    ap.add_argument("--skip-long", action="store_true", help="skip the long-prompt comparison")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bb, samples = build(a.prompts)
    reward = TokenReward(len(bb.tokenizer))
    if not a.skip_long:  # the prompt once per group vs every completion running its prompt, ours both
        long, plen = long_prompts(bb, samples, 10 * a.tokens)
        med = {}
        for share in (True, False):
            torch.manual_seed(0)
            t, _ = time_ours(bb, long, a, reward, share_prompt=share, generations=a.long_generations)
            med[share] = statistics.median(w for w, _ in t)
        print(
            f"long prompt: >= {plen} tokens ({plen / a.tokens:.1f}x max_new_tokens={a.tokens}), "
            f"G={a.long_generations}: ours {1000 * med[True]:.1f} ms/step, ours unshared (stage.share_prompt=false) "
            f"{1000 * med[False]:.1f} ms/step, shared/unshared={med[True] / med[False]:.3f}"
        )
    torch.manual_seed(0)
    ours, len_ours = time_ours(bb, samples, a, reward)
    torch.manual_seed(0)
    trl, len_trl = time_trl(bb, samples, a, reward)
    print(
        f"prompts/step={a.prompts} G={a.generations} completions/step={a.prompts * a.generations} "
        f"max_new_tokens={a.tokens} "
        f"fp32 cpu threads={a.threads} steps={len(ours)}/{len(trl)} (after {a.warmup} warm-up)"
    )
    medians = {}
    for name, t, length in (("ours (stage=grpo, Lightning)", ours, len_ours), ("TRL GRPOTrainer", trl, len_trl)):
        wall, cpu = [w for w, _ in t], [c for _, c in t]
        medians[name] = statistics.median(wall)
        print(
            f"{name:30s} median {1000 * medians[name]:7.1f} ms/step wall "
            f"[min {1000 * min(wall):.1f}, max {1000 * max(wall):.1f}]"
            f"  median {1000 * statistics.median(cpu):7.1f} ms/step cpu  mean completion length {length:.1f}"
        )
    m_ours, m_trl = medians.values()
    print(f"ratio={m_ours / m_trl:.3f}")


if __name__ == "__main__":
    main()
