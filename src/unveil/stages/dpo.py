"""Stage: direct preference optimisation (DPO), with MMedPO's clinical-relevance weights.

One training step, top to bottom (``compute_loss``):

1. The batch holds B preference pairs as 2B rows, chosen then rejected, each row with its own
   images (:class:`~unveil.data.collate_pref.PreferenceCollator`).
2. Policy log-probs of the answer tokens of every row (one forward pass), aggregated per row
   by ``logp_agg``: ``sum`` (DPO, MMedPO, TRL) or ``mean`` (per-token average).
3. Reference log-probs of the same rows under ``no_grad``. The reference is the same model
   with its LoRA adapter switched off (``model.disable_adapter()``) when peft is on, so it
   costs no second copy; otherwise a frozen deep copy of the policy taken once, when the
   stage is built (so it is the SFT model a run starts from, also after a resume).
4. Per-pair loss on the log-ratio difference
   ``delta = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))``, as TRL defines it:

   - ``sigmoid``: ``-log sigmoid(beta * delta)``; with ``label_smoothing`` eps the
     conservative form ``-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)``;
   - ``hinge``: ``relu(1 - beta * delta)``;
   - ``ipo``: ``(delta / n_tokens - 1 / (2 beta))^2`` where each log-ratio is divided by its
     own answer length (TRL's length-normalised IPO; with ``logp_agg=mean`` it already is).

5. Per-pair weights (``weight_norm``), then ``loss = mean(w * per_pair_loss)``:

   - ``none``: every weight is 1 (plain DPO; STLLaVA-Med);
   - ``raw``: the record's weight as is, e.g. a [0, 1] clinical-relevance score, as
     MMedPO's released code does (a weight of 0 removes the pair);
   - ``mmedpo``: as the MMedPO paper: an affine rescaling of the weights to mean 1 and
     variance ``weight_var`` (0.1), ``w' = 1 + sqrt(var) * (w - mu) / sigma`` (population
     sigma), then clipped to ``weight_clip`` ([0.75, 1.25]). ``mu`` and ``sigma`` come from
     the whole training split, computed once at ``setup`` (``weight_stats=dataset``,
     default), so a pair's weight does not depend on which pairs share its batch and batch
     size 1 works; ``weight_stats=batch`` standardises within each batch instead. Weights
     that are all equal map to 1. Clipping happens after the rescaling, so the mean is 1
     before the clip and only approximately after it (exactly 1 for a distribution
     symmetric about its mean).

6. Optional ``sft_weight`` x token-mean NLL of the chosen answers (RPO-style anchor; not
   weighted).

Logged under ``train/`` and ``val/`` (TRL's names): ``loss``, ``rewards/chosen``,
``rewards/rejected`` (``beta`` x log-ratio), ``rewards/margins``, ``rewards/accuracies``
(fraction of pairs with chosen reward > rejected), ``logps/chosen``, ``logps/rejected``,
``weights/mean``, and ``sft_loss`` when the SFT term is on.

Dropout is switched off in the policy (``disable_dropout``, TRL's default): the implicit
reward compares two forward passes and dropout would make it noisy.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from unveil.data.collate_pref import PreferenceCollator
from unveil.models.inputs import model_inputs, select_inputs
from unveil.models.policy import ReferencePolicy, answer_logprobs, disable_dropout
from unveil.stages.base import StageModule

log = logging.getLogger(__name__)

LOSS_TYPES = ("sigmoid", "hinge", "ipo")
WEIGHT_NORMS = ("none", "raw", "mmedpo")


# --- the pieces, as plain functions (tested one by one) --------------------------------------
def preference_loss(
    chosen_logratios: torch.Tensor,
    rejected_logratios: torch.Tensor,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair loss from policy/reference log-ratios (for ``ipo``, pass token-averaged ratios)."""
    delta = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown loss_type {loss_type!r} ({' | '.join(LOSS_TYPES)})")


def weight_moments(raw: torch.Tensor) -> tuple[float, float]:
    """Mean and population standard deviation of raw pair weights."""
    raw = raw.double()
    sigma = float(raw.std(unbiased=False)) if raw.numel() > 1 else 0.0
    return float(raw.mean()), sigma


def normalize_weights(
    raw: torch.Tensor,
    kind: str = "none",
    stats: tuple[float, float] | None = None,
    var: float = 0.1,
    clip: tuple[float, float] = (0.75, 1.25),
) -> torch.Tensor:
    """Effective per-pair weights (see the module docstring for ``none`` / ``raw`` / ``mmedpo``)."""
    if kind == "none":
        return torch.ones_like(raw)
    if kind == "raw":
        return raw
    if kind == "mmedpo":
        mu, sigma = stats if stats is not None else weight_moments(raw)
        if sigma < 1e-8:
            return torch.ones_like(raw)
        return (1 + math.sqrt(var) * (raw - mu) / sigma).clamp(float(clip[0]), float(clip[1]))
    raise ValueError(f"unknown weight_norm {kind!r} ({' | '.join(WEIGHT_NORMS)})")


# --- the stage --------------------------------------------------------------------------------
class DPOModule(StageModule):
    def __init__(
        self,
        backbone,
        optim: dict | None = None,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        logp_agg: str = "sum",
        weight_norm: str = "none",
        weight_stats: str = "dataset",
        weight_var: float = 0.1,
        weight_clip: tuple[float, float] = (0.75, 1.25),
        sft_weight: float = 0.0,
        dropout: bool = False,
        max_length: int | None = None,
        micro_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
    ):
        super().__init__(backbone, optim)
        # Manual optimisation: one optimiser step per batch of pairs, accumulated over micro-batches
        # of at most micro_batch_size pairs (accumulate_step), clipped at max_grad_norm.
        self.automatic_optimization = False
        self.micro_batch_size = int(micro_batch_size) if micro_batch_size else None
        self.max_grad_norm = float(max_grad_norm) if max_grad_norm else None
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"stage.loss_type={loss_type!r}: expected one of {LOSS_TYPES}")
        if weight_norm not in WEIGHT_NORMS:
            raise ValueError(f"stage.weight_norm={weight_norm!r}: expected one of {WEIGHT_NORMS}")
        if logp_agg not in ("sum", "mean"):
            raise ValueError(f"stage.logp_agg={logp_agg!r}: expected 'sum' or 'mean'")
        if weight_stats not in ("dataset", "batch"):
            raise ValueError(f"stage.weight_stats={weight_stats!r}: expected 'dataset' or 'batch'")
        if label_smoothing and loss_type != "sigmoid":
            raise ValueError("stage.label_smoothing applies to loss_type=sigmoid only")
        self.beta, self.loss_type, self.label_smoothing, self.logp_agg = (
            float(beta),
            loss_type,
            float(label_smoothing),
            logp_agg,
        )
        self.weight_norm, self.weight_scope = weight_norm, weight_stats
        self.weight_var, self.weight_clip = float(weight_var), tuple(float(c) for c in weight_clip)
        self.sft_weight = float(sft_weight)
        self._weight_stats: tuple[float, float] | None = None

        self.collator = PreferenceCollator(backbone, max_length=max_length)
        if not dropout:
            disable_dropout(self.model)
        # Reference: the adapter switched off under peft; else a frozen copy of the starting policy,
        # kept out of the module tree (not in checkpoints, the optimiser or DDP).
        self.reference = ReferencePolicy(self.model)

    # --- setup ----------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        data = getattr(getattr(self._trainer, "datamodule", None), "data", None) or {}
        for split in ("train", "val"):  # fail now rather than at the first batch without a pair
            unpaired = [s.id for s in data.get(split, []) if s.rejected is None]
            if unpaired:
                raise ValueError(
                    f"stage=dpo: {len(unpaired)} {split} record(s) have no 'rejected' side "
                    f"(e.g. {unpaired[:3]}): train on preference records (unveil.curate writes them)"
                )
        weights = [float(s.weight) for s in data.get("train", [])]
        if self.weight_norm == "none" and any(w != 1.0 for w in weights):
            log.warning(
                "the training pairs carry weights (e.g. MMedPO's clinical-relevance score; %d of %d are not 1) "
                "but stage.weight_norm=none ignores them: stage.weight_norm=raw uses them as MMedPO's code "
                "does, mmedpo as its paper does",
                sum(w != 1.0 for w in weights),
                len(weights),
            )
        if self.weight_norm == "mmedpo" and self.weight_scope == "dataset" and self._weight_stats is None:
            if "train" not in data:
                raise RuntimeError(
                    "weight_norm=mmedpo with weight_stats=dataset needs the training split: use a "
                    "datamodule with .data['train'], call fit_weight_stats(weights), or weight_stats=batch"
                )
            self.fit_weight_stats(torch.tensor([float(s.weight) for s in data["train"]]))

    def fit_weight_stats(self, raw_weights: torch.Tensor) -> tuple[float, float]:
        """Fix the mean/std that ``weight_norm=mmedpo`` standardises with (the training split's)."""
        self._weight_stats = weight_moments(raw_weights)
        return self._weight_stats

    # --- the loss -------------------------------------------------------------------------------
    def pair_weights(self, raw: torch.Tensor) -> torch.Tensor:
        stats = self._weight_stats if self.weight_scope == "dataset" else None
        if self.weight_norm == "mmedpo" and self.weight_scope == "dataset" and stats is None:
            raise RuntimeError("weight_norm=mmedpo: weight statistics not fitted (setup() or fit_weight_stats())")
        return normalize_weights(raw, self.weight_norm, stats, self.weight_var, self.weight_clip)

    def compute_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        inputs = model_inputs(batch)
        token_logps, mask = answer_logprobs(self.model, inputs, batch["labels"])
        with self.reference.model() as ref:
            ref_token_logps, _ = answer_logprobs(ref, inputs, batch["labels"])
        n_tokens = mask.sum(1).clamp(min=1)
        logps, ref_logps = token_logps.sum(1), ref_token_logps.sum(1)  # summed over the answer
        if self.logp_agg == "mean":
            logps, ref_logps = logps / n_tokens, ref_logps / n_tokens

        chosen_logps, rejected_logps = logps.chunk(2)  # rows: chosen first, then rejected
        chosen_logratios, rejected_logratios = (logps - ref_logps).chunk(2)
        if self.loss_type == "ipo" and self.logp_agg == "sum":  # IPO compares per-token log-ratios
            chosen_n, rejected_n = n_tokens.chunk(2)
            per_pair = preference_loss(chosen_logratios / chosen_n, rejected_logratios / rejected_n, "ipo", self.beta)
        else:
            per_pair = preference_loss(
                chosen_logratios, rejected_logratios, self.loss_type, self.beta, self.label_smoothing
            )

        weights = self.pair_weights(batch["weights"].to(per_pair))
        loss = (weights * per_pair).mean()
        out = {}
        if self.sft_weight:
            chosen_mask = mask.chunk(2)[0]
            out["sft_loss"] = -token_logps.chunk(2)[0].sum() / chosen_mask.sum().clamp(min=1)
            loss = loss + self.sft_weight * out["sft_loss"]

        chosen_rewards, rejected_rewards = (
            self.beta * chosen_logratios.detach(),
            self.beta * rejected_logratios.detach(),
        )
        out.update(
            {
                "loss": loss,
                "per_pair_loss": per_pair.detach(),
                "rewards/chosen": chosen_rewards,
                "rewards/rejected": rejected_rewards,
                "rewards/margins": chosen_rewards - rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "logps/chosen": chosen_logps.detach(),
                "logps/rejected": rejected_logps.detach(),
                "weights": weights.detach(),
            }
        )
        return out

    # --- Lightning hooks ------------------------------------------------------------------------
    def _log_metrics(self, split: str, out: dict) -> None:
        n = out["per_pair_loss"].numel()
        logged = {
            k: out[k].mean()
            for k in (
                "loss",
                "rewards/chosen",
                "rewards/rejected",
                "rewards/margins",
                "rewards/accuracies",
                "logps/chosen",
                "logps/rejected",
            )
        }
        logged["weights/mean"] = out["weights"].mean()
        if "sft_loss" in out:
            logged["sft_loss"] = out["sft_loss"]
        for k, v in logged.items():
            self.log(
                f"{split}/{k}",
                v.detach(),
                batch_size=n,
                prog_bar=k in ("loss", "rewards/accuracies"),
                sync_dist=split == "val",
            )

    def training_step(self, batch, batch_idx):
        b = len(batch["weights"])
        size = self.micro_batch_size
        chunks = [torch.arange(b)] if not size or size >= b else list(torch.arange(b).split(size))
        # the loss is a mean over pairs: a micro-batch weighs its share of the pairs (the optional SFT
        # term, a token mean over chosen answers, is weighted the same way)
        parts = [(pair_rows(batch, c), len(c) / b, len(c) / b) for c in chunks]

        def loss_fn(part):
            out = self.compute_loss(part)
            return out["loss"], {}, out

        res = self.accumulate_step(parts, loss_fn)
        outs = [o[2] for o in res["outputs"]]
        merged = {k: torch.cat([o[k] for o in outs]) for k in outs[0] if k not in ("loss", "sft_loss")}
        merged["loss"] = torch.tensor(res["loss"])
        if "sft_loss" in outs[0]:
            merged["sft_loss"] = sum(o["sft_loss"].detach() * w for o, (_, w, _) in zip(outs, parts))
        self._log_metrics("train", merged)

    def validation_step(self, batch, batch_idx):
        out = self.compute_loss(batch)
        self._log_metrics("val", out)
        return out["loss"]


def pair_rows(batch: dict, pairs: torch.Tensor) -> dict:
    """The rows of ``pairs`` (chosen rows ``i``, rejected rows ``B + i``) of a preference batch."""
    b = len(batch["weights"])
    if len(pairs) == b:
        return batch
    rows = torch.cat([pairs, pairs + b])
    out = select_inputs(model_inputs(batch), rows, [int(n) for n in batch["n_images"]])
    out["labels"] = batch["labels"][rows]
    out["weights"] = batch["weights"][pairs]
    out["n_images"] = [batch["n_images"][i] for i in rows.tolist()]
    return out
