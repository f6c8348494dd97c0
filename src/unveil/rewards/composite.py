"""The composite reward: per-head group normalisation, weights, sum, and the logged stats.

``build_composite(cfg, backbone, vocab)`` takes the ``reward`` config group, a dict
``name -> {_target_, weight, norm, missing, <head options>}`` (see ``conf/reward/``), and returns a
:class:`CompositeReward`, a callable ``Rollout -> RewardOutput``.

Per head, on the raw scores ``s`` of the completions of one group (one prompt):

- ``none``:   ``s``
- ``max``:    ``s / max_g |s|`` as in UMed-LVLM ("divided by their maximum over the answers sampled
              for the same query"). The maximum is taken of the absolute value so that heads which
              can go negative (GIoU, extra-box penalties) keep their sign; for non-negative scores it
              is the paper's rule. A group whose scores are all 0 stays 0.
- ``zscore``: ``(s - mean_g) / std_g`` with the population std (ddof 0); a group with zero spread
              (std < 1e-8) gives 0 for all its completions.

NaN (head does not apply) stays NaN through the normalisation, is left out of the group
statistics (max, mean, std), and counts as 0 in ``total = sum_h weight_h * norm_h(s_h)``.
Heads with weight 0 are not computed at all.

``missing`` (per head) says what a NaN row of a group that has finite scores counts as:
``zero`` (default, the rule above: right for a head whose NaN means "does not apply to this
completion") or ``group_mean`` (the mean of the group's finite normalised scores: right for a
NaN that means "could not be scored", e.g. a judge that timed out, so the row gets no advantage
from that head, up or down, and the group's other rows keep theirs). A group with no finite
score counts 0 either way.

Before computing any head, the composite calls ``head.submit(batch)`` on heads that have it, so
slow scorers (HTTP judges) work while the others run. A head's ``last_stats`` (a dict of floats
set by its call) is logged as ``rewards/<head>/<key>``, e.g. ``rewards/relevance/judge_failures``.

Stats (floats, named as TRL's ``GRPOTrainer`` logs them; the stages add ``train/`` or ``val/``;
NaN when no completion of the batch has a score for that head):
``rewards/<head>/mean``, ``rewards/<head>/std`` (std of the raw finite scores, Bessel-corrected
as TRL's ``nanstd``: NaN for fewer than two),
``rewards/<head>/frac_zero_std`` (fraction of groups, among those with at least one finite
score, whose finite scores are all equal: they give no learning signal to a group-relative
method), ``rewards/<head>/applicable_frac``, ``reward`` and ``reward_std`` (mean and std of
``total``). TRL's ``reward`` is the weighted sum of the raw scores; here it is ``total``, the
reward the advantages are computed from.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch

from unveil.rewards.base import RewardHead, RewardOutput, Rollout

log = logging.getLogger(__name__)

NORMS = ("none", "max", "zscore")
MISSING = ("zero", "group_mean")
_EPS = 1e-8


@dataclass
class HeadSpec:
    name: str
    head: RewardHead
    weight: float
    norm: str
    missing: str = "zero"


def group_normalise(scores: torch.Tensor, group: torch.Tensor, norm: str) -> torch.Tensor:
    """Normalise ``scores`` [N] within each group id of ``group`` [N]; NaN stays NaN."""
    if norm not in NORMS:
        raise ValueError(f"unknown reward norm {norm!r}; known: {NORMS}")
    s = scores.double()
    if norm == "none":
        return s.float()
    out = torch.full_like(s, float("nan"))
    for g in torch.unique(group):
        idx = (group == g).nonzero(as_tuple=True)[0]
        v = s[idx]
        ok = torch.isfinite(v)
        if not ok.any():
            continue
        fin = v[ok]
        if norm == "max":
            m = fin.abs().max()
            res = torch.where(m > _EPS, v / m.clamp_min(_EPS), torch.zeros_like(v))
        else:  # zscore
            mean = fin.mean()
            std = fin.std(unbiased=False) if fin.numel() > 1 else torch.zeros((), dtype=fin.dtype)
            res = torch.where(std > _EPS, (v - mean) / std.clamp_min(_EPS), torch.zeros_like(v))
        out[idx] = torch.where(ok, res, torch.full_like(v, float("nan")))
    return out.float()


def fill_missing(normed: torch.Tensor, group: torch.Tensor, missing: str) -> torch.Tensor:
    """NaN -> 0 (``zero``), or NaN -> its group's mean of finite values (``group_mean``; 0 where
    the group has none)."""
    if missing not in MISSING:
        raise ValueError(f"unknown reward missing rule {missing!r}; known: {MISSING}")
    if missing == "group_mean":
        _, inv = torch.unique(group, return_inverse=True)
        ok = torch.isfinite(normed)
        k = int(inv.max()) + 1 if inv.numel() else 0
        sums = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, torch.where(ok, normed, 0).double())
        counts = torch.zeros(k, dtype=torch.float64).index_add_(0, inv, ok.double())
        mean = (sums / counts.clamp_min(1)).float()[inv]
        normed = torch.where(ok, normed, mean)
    return torch.nan_to_num(normed, nan=0.0, posinf=0.0, neginf=0.0)


def group_spread(scores: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group (vectorised, run every step): max - min of its finite scores, whether it has any
    finite score, and each completion's group index. Group ids may be any integers."""
    _, inv = torch.unique(group, return_inverse=True)
    k = int(inv.max()) + 1 if inv.numel() else 0
    v = scores.float().to(inv.device)
    ok = torch.isfinite(v)
    hi = torch.full((k,), -float("inf"), device=v.device).scatter_reduce(
        0, inv, torch.where(ok, v, -float("inf")), "amax"
    )
    lo = torch.full((k,), float("inf"), device=v.device).scatter_reduce(
        0, inv, torch.where(ok, v, float("inf")), "amin"
    )
    finite = torch.zeros(k, dtype=torch.bool, device=v.device).scatter_reduce(0, inv, ok, "amax")
    return torch.where(finite, hi - lo, torch.zeros_like(hi)), finite, inv


def zero_spread_fraction(scores: torch.Tensor, group: torch.Tensor, tol: float = 1e-6) -> float:
    """Fraction of groups (with >= 1 finite score) whose finite scores are all equal."""
    spread, finite, _ = group_spread(scores, group)
    n = int(finite.sum())
    return float(((spread <= tol) & finite).sum()) / n if n else float("nan")


def _mean_std(v: torch.Tensor) -> tuple[float, float]:
    """Mean and std of the finite entries, as TRL's ``nanmean`` / ``nanstd`` (Bessel-corrected; NaN
    for fewer than two entries)."""
    v = v[torch.isfinite(v)].double()
    if v.numel() == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(unbiased=True)) if v.numel() > 1 else float("nan")


class CompositeReward:
    """Callable ``Rollout -> RewardOutput``; ``heads`` lists the computed heads in order."""

    def __init__(self, heads: list[HeadSpec], backbone: Any = None, vocab: list[str] | None = None):
        names = [h.name for h in heads]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate reward head names: {names}")
        self.heads = heads
        self.bind(backbone, vocab)

    def bind(self, backbone: Any = None, vocab: list[str] | None = None) -> CompositeReward:
        """Bind the policy's backbone and the finding vocabulary to every head (once, when built)."""
        self.backbone, self.vocab = backbone, list(vocab or [])
        for h in self.heads:
            if hasattr(h.head, "bind"):
                h.head.bind(backbone, self.vocab)
        return self

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.heads]

    @property
    def needs(self) -> frozenset[str]:
        out: set[str] = set()
        for h in self.heads:
            out |= set(getattr(h.head, "needs", ()))
        return frozenset(out)

    def __len__(self) -> int:
        return len(self.heads)

    def __repr__(self) -> str:
        inner = ", ".join(f"{h.name}(w={h.weight:g}, norm={h.norm})" for h in self.heads)
        return f"CompositeReward({inner})"

    def __call__(self, batch: Rollout) -> RewardOutput:
        n = len(batch)
        group = torch.as_tensor(batch.group).reshape(-1).long().cpu()
        if group.numel() != n:
            raise ValueError(f"batch.group has {group.numel()} entries for {n} completions")
        total = torch.zeros(n, dtype=torch.float32)
        per_head: dict[str, torch.Tensor] = {}
        stats: dict[str, float] = {}
        for spec in self.heads:  # slow scorers (HTTP judges) start now and work while the others run
            if hasattr(spec.head, "submit"):
                spec.head.submit(batch)
        for spec in self.heads:
            raw = spec.head(batch)
            raw = torch.as_tensor(raw, dtype=torch.float32).detach().reshape(-1).cpu()
            if raw.numel() != n:
                raise ValueError(f"reward head {spec.name!r} returned {raw.numel()} scores for {n} completions")
            bad = torch.isinf(raw)
            if bad.any():  # the contract is finite or NaN; never let an inf reach the optimiser
                log.warning("reward head %r returned %d infinite score(s); treated as NaN", spec.name, int(bad.sum()))
                raw = raw.masked_fill(bad, float("nan"))
            per_head[spec.name] = raw
            normed = group_normalise(raw, group, spec.norm)
            total += spec.weight * fill_missing(normed, group, spec.missing)
            for k, v in (getattr(spec.head, "last_stats", None) or {}).items():
                stats[f"rewards/{spec.name}/{k}"] = float(v)
            mean, std = _mean_std(raw)
            stats[f"rewards/{spec.name}/mean"] = mean
            stats[f"rewards/{spec.name}/std"] = std
            stats[f"rewards/{spec.name}/frac_zero_std"] = zero_spread_fraction(raw, group)
            stats[f"rewards/{spec.name}/applicable_frac"] = (
                float(torch.isfinite(raw).float().mean()) if n else float("nan")
            )
        mean, std = _mean_std(total)
        stats["reward"] = mean
        stats["reward_std"] = std
        device = batch.group.device if torch.is_tensor(batch.group) else torch.device("cpu")
        return RewardOutput(total=total.to(device), per_head=per_head, stats=stats)


def _plain(cfg) -> dict:
    if cfg is None:
        return {}
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True) or {}
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


def build_head(cfg: dict, name: str = "head") -> RewardHead:
    """Instantiate one head from its config (``_target_`` + options; weight/norm already removed);
    a typo in a key fails, listing the keys the head takes."""
    from unveil.utils.plug import instantiate

    return instantiate(cfg, f"reward.{name}", group="reward")


def build_composite(cfg, backbone=None, vocab=None) -> CompositeReward:
    """``cfg``: the ``reward`` group, ``{name: {_target_, weight, norm, ...options}}`` (or None)."""
    heads = []
    for name, hcfg in _plain(cfg).items():
        if hcfg is None:  # a preset may switch a head off with `reward.<name>: null`
            continue
        if not isinstance(hcfg, dict) or "_target_" not in hcfg:
            raise ValueError(f"reward.{name}: expected a head config with _target_, got {hcfg!r:.120}")
        hcfg = dict(hcfg)
        weight = float(hcfg.pop("weight", 1.0))
        norm = str(hcfg.pop("norm", "none"))
        if norm not in NORMS:
            raise ValueError(f"reward.{name}.norm={norm!r}; known: {NORMS}")
        missing = str(hcfg.pop("missing", "zero"))
        if missing not in MISSING:
            raise ValueError(f"reward.{name}.missing={missing!r}; known: {MISSING}")
        if not math.isfinite(weight):
            raise ValueError(f"reward.{name}.weight must be finite, got {weight}")
        if weight == 0.0:
            log.info("reward head %s has weight 0: not computed", name)
            continue
        heads.append(HeadSpec(name=name, head=build_head(hcfg, name), weight=weight, norm=norm, missing=missing))
    comp = CompositeReward(heads, backbone=backbone, vocab=vocab)
    log.info("rewards: %r", comp)
    return comp
