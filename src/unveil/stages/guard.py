"""A non-finite loss or gradient never trains on silently (``callbacks.non_finite``).

Every stage's backward passes its loss through Lightning's ``on_before_backward`` and every
optimiser step through ``on_before_optimizer_step`` (automatic and manual optimisation alike).
Before each optimiser step the guard looks at the losses of that step and at the total gradient
norm; if any is NaN or infinite it either

- ``action: raise`` (default): stops the run with :class:`NonFiniteError`, naming the step, what was
  non-finite and the last finite loss. The exception leaves ``trainer.fit``, so ``train()`` writes no
  ``backbone/`` and no ``metrics.json``, the process exits non-zero and a sweeper records a failed
  trial, not a metric; or
- ``action: skip``: drops the step's gradients (the optimiser skips parameters without a gradient),
  counts it (``train/non_finite_skips``) and raises once ``max_in_a_row`` steps in a row were skipped.

One host sync per optimiser step (the flags are reduced on the device first). Under fp16 mixed
precision the grad scaler already skips steps with overflowing gradients, so only losses are checked.
"""

from __future__ import annotations

import contextlib
import logging
import math

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)
ACTIONS = ("raise", "skip")


class NonFiniteError(RuntimeError):
    """A loss or gradient was NaN or infinite."""


def _last_finite(last: tuple[int, float] | None) -> str:
    return f"the last finite loss was {last[1]:.6g} at step {last[0]}" if last else "no finite loss was seen before"


class NonFiniteGuard(pl.Callback):
    def __init__(self, action: str = "raise", max_in_a_row: int = 3):
        if action not in ACTIONS:
            raise ValueError(f"callbacks.non_finite.action={action!r}; expected one of {ACTIONS}")
        self.action, self.max_in_a_row = action, max(1, int(max_in_a_row))
        self._losses: list[torch.Tensor] = []
        self.last_finite: tuple[int, float] | None = None  # (step, loss)
        self.skipped, self.in_a_row = 0, 0

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._losses.append(loss.detach())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        losses, self._losses = self._losses, []
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        loss = torch.stack([x.float().reshape(()) for x in losses]).sum() if losses else None
        check_grads = grads and not str(trainer.precision).startswith("16")
        norm = torch.nn.utils.get_total_norm(grads) if check_grads else None
        loss_v = None if loss is None else float(loss)  # the step's one host sync
        norm_v = None if norm is None else float(norm)
        bad = []
        if loss_v is not None and not math.isfinite(loss_v):
            bad.append(f"loss {loss_v}")
        if norm_v is not None and not math.isfinite(norm_v):
            bad.append(f"gradient norm {norm_v}")
        step = trainer.global_step
        if not bad:
            self.in_a_row = 0
            if loss_v is not None:
                self.last_finite = (step, loss_v)
            return
        what, last = " and ".join(bad), _last_finite(self.last_finite)
        if self.action == "raise":
            raise NonFiniteError(
                f"non-finite {what} at step {step}; {last}. Lower the learning rate, check the data and "
                f"the reward heads, or set callbacks.non_finite.action=skip to skip such steps."
            )
        self.skipped += 1
        self.in_a_row += 1
        for g in optimizer.param_groups:  # the optimiser skips parameters without a gradient
            for p in g["params"]:
                p.grad = None
        log.warning("skipped step %d: non-finite %s (%d in a row, %d in all)", step, what, self.in_a_row, self.skipped)
        pl_module.log("train/non_finite_skips", float(self.skipped), on_step=True, on_epoch=False)
        if self.in_a_row >= self.max_in_a_row:
            raise NonFiniteError(
                f"{self.in_a_row} steps in a row had a non-finite {what} (last at step {step}); {last}"
            )

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "in_a_row": self.in_a_row}

    def load_state_dict(self, state: dict) -> None:
        self.skipped, self.in_a_row = int(state.get("skipped", 0)), int(state.get("in_a_row", 0))


@contextlib.contextmanager
def non_finite_sampling(trainer):
    """Names the cause when sampling meets NaN / inf probabilities (weights or logits overflowed)."""
    try:
        yield
    except RuntimeError as e:
        if "probability tensor contains" not in str(e):
            raise
        guard = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, NonFiniteGuard)), None)
        raise NonFiniteError(
            f"sampling at step {trainer.global_step}: the policy's next-token probabilities are not finite (its "
            f"weights or logits overflowed); {_last_finite(guard.last_finite if guard else None)}. Lower the "
            f"learning rate. ({e})"
        ) from e


def assert_finite_weights(model: torch.nn.Module) -> None:
    """Refuses to let non-finite weights out of a run (``backbone/`` is only saved from finite ones)."""
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise NonFiniteError(f"{len(bad)} parameter tensors hold NaN or inf (e.g. {bad[:3]}): not saved")
