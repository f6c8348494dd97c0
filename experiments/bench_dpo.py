"""Benchmark: one DPO training step of stage=dpo vs TRL's DPOTrainer.

Same tiny LLaVA (the default ``model=tiny_llava`` on the debug-size synthetic set), the same
B text preference pairs (chosen = the real answer, rejected = another sample's answer), fp32 on
CPU, sigmoid loss, beta 0.1, AdamW, gradient clipping 1.0, dropout off, the reference a frozen
copy of the policy in both. Each framework runs its own training loop over a data set of exactly
those B pairs, one batch per step; a callback times each step from "batch fetched" to "optimizer
stepped" (Lightning ``on_train_batch_start/end``, transformers ``on_step_begin/end``), so
collation is left out of both. After warm-up steps, the median step time of each is printed, and
on the last line ``ratio=<ours/TRL>`` (< 1: ours is faster).

    python experiments/bench_dpo.py [--pairs 8] [--warmup 3] [--steps 15] [--threads 1]
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


def build(pairs: int):
    from hydra import compose, initialize_config_dir

    import unveil.utils.resolvers  # noqa: F401
    from unveil.data.schema import Rejected, Sample
    from unveil.models.factory import build_backbone
    from unveil.utils.resolvers import project_root

    with initialize_config_dir(config_dir=f"{project_root()}/conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["debug=fast", "stage=dpo"])
    dm = load_records(cfg.data)
    bb = build_backbone(cfg.model, corpus=dm.corpus(), cache_dir=cfg.paths.cache_dir)
    train = dm.data["train"]
    samples = []
    for i, s in enumerate(train[:pairs]):
        other = next(t.target for t in train[i + 1 :] + train if t.target != s.target)
        samples.append(
            Sample(
                id=s.id,
                images=s.images,
                messages=s.messages,
                rejected=Rejected(messages=s.prompt_messages + [{"role": "assistant", "content": other}]),
            )
        )
    return bb, samples


def time_ours(bb, samples, warmup: int, steps: int, lr: float) -> list[tuple[float, float]]:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from unveil.stages.dpo import DPOModule

    bb = copy.copy(bb)
    bb.model = copy.deepcopy(bb.model)
    module = DPOModule(bb, optim={"lr": lr, "weight_decay": 0.0, "scheduler": "constant"})
    times: list[tuple[float, float]] = []  # (wall, cpu) seconds per step

    class Timer(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t = (time.perf_counter(), time.process_time())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

    loader = DataLoader(samples, batch_size=len(samples), shuffle=False, collate_fn=module.collator)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=warmup + steps,
        max_epochs=-1,
        gradient_clip_val=1.0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Timer()],
        default_root_dir=tempfile.mkdtemp(),
    )
    trainer.fit(module, train_dataloaders=loader)
    return times[warmup:]


def time_trl(bb, samples, warmup: int, steps: int, lr: float) -> list[tuple[float, float]]:
    from datasets import Dataset
    from PIL import Image
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    rows = []
    for s in samples:
        prompt = bb.render(s.prompt_messages, add_generation_prompt=True)
        rows.append(
            {
                "images": [Image.open(p).convert("RGB") for p in s.images],
                "prompt": prompt,
                "chosen": bb.render(s.messages)[len(prompt) :],
                "rejected": bb.render(s.rejected.messages)[len(prompt) :],
            }
        )
    times: list[tuple[float, float]] = []  # (wall, cpu) seconds per step

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            times.append((time.perf_counter() - self.t[0], time.process_time() - self.t[1]))

    args = DPOConfig(
        output_dir=tempfile.mkdtemp(),
        per_device_train_batch_size=len(samples),
        max_steps=warmup + steps,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        max_length=None,
        beta=0.1,
        loss_type=["sigmoid"],
        dataloader_num_workers=0,
    )
    model = copy.deepcopy(bb.model)
    trainer = DPOTrainer(
        model=model,
        ref_model=copy.deepcopy(bb.model).eval(),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=bb.processor,
        callbacks=[Timer()],
    )
    trainer.train()
    return times[warmup:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (same for both)")
    ap.add_argument("--lr", type=float, default=1e-4)
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    bb, samples = build(a.pairs)
    ours = time_ours(bb, samples, a.warmup, a.steps, a.lr)
    trl = time_trl(bb, samples, a.warmup, a.steps, a.lr)
    print(
        f"pairs/step={a.pairs} rows/step={2 * a.pairs} fp32 cpu threads={a.threads} "
        f"steps={len(ours)}/{len(trl)} (after {a.warmup} warm-up)"
    )
    medians = {}
    for name, t in (("ours (stage=dpo, Lightning)", ours), ("TRL DPOTrainer", trl)):
        wall, cpu = [w for w, _ in t], [c for _, c in t]
        medians[name] = statistics.median(wall)
        print(
            f"{name:28s} median {1000 * medians[name]:7.1f} ms/step wall "
            f"[min {1000 * min(wall):.1f}, max {1000 * max(wall):.1f}]"
            f"  median {1000 * statistics.median(cpu):7.1f} ms/step cpu"
        )
    m_ours, m_trl = medians.values()
    print(f"ratio={m_ours / m_trl:.3f}")


if __name__ == "__main__":
    main()
