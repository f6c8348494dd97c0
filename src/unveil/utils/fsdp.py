"""``trainer=fsdp``: Lightning's FSDPStrategy (PyTorch FSDP) fitted to our backbones.

- auto-wrap by layer class: every class named in the backbone's HF ``_no_split_modules`` (the
  decoder layer, the vision block) that occurs in the model is its own FSDP unit
  (:func:`layer_classes`); activation checkpointing, when on, applies to the same classes;
- ``compute_dtype: bfloat16``: FSDP's own mixed precision, bf16 all-gathers and compute over the
  fp32 sharded parameters (the optimiser updates fp32 shards); gradients reduced in fp32;
- the frozen reference of RL / DPO (:class:`unveil.models.policy.ReferencePolicy`'s copy) is
  wrapped with the same policy (``reference: shard``) or sharded with its parameters offloaded to
  the CPU (``reference: cpu_offload``), instead of a full replica on every rank;
- :func:`full_params`: the whole model gathered on every rank, for generation (HF ``generate``
  runs a different number of forwards on each rank, which sharded forwards cannot) and the export.

On the CPU: Lightning 2.6.6 refuses ``strategy="fsdp"`` with ``accelerator=cpu`` ("requires a GPU
accelerator") and torch's FSDP raises "FSDP needs a non-CPU accelerator device" unless it is given
``device_id=cpu``. This subclass is passed as an instance (Lightning checks the string flag and the
exact class only) and gives FSDP ``device_id=cpu`` when the root device is the CPU, so the tests run
it over gloo; on GPUs it is Lightning's strategy unchanged.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from pytorch_lightning.strategies import FSDPStrategy

log = logging.getLogger(__name__)

REFERENCE_MODES = ("shard", "cpu_offload", "replicate")


def layer_classes(model: torch.nn.Module, names: list[str] | None = None) -> set[type]:
    """The module classes to wrap: those named in ``names``, else in any submodule's
    ``_no_split_modules`` (HF models list their decoder layer and vision block there), that occur
    in ``model``. Raises when none does: a single root unit would not shard anything."""
    wanted = set(names or [])
    if not wanted:
        for m in model.modules():
            wanted.update(getattr(m, "_no_split_modules", None) or [])
    found = {type(m) for m in model.modules() if type(m).__name__ in wanted}
    if not found:
        raise ValueError(
            f"trainer.strategy.wrap_layers: no module of {type(model).__name__} is of a class in {sorted(wanted)}; "
            "name the decoder layer and vision block classes (e.g. [LlamaDecoderLayer, CLIPEncoderLayer])"
        )
    return found


def _uniform_dtype(module: torch.nn.Module) -> None:
    """FSDP flattens each unit's parameters into one tensor of one dtype: a bf16 frozen base next to
    fp32 trainable weights (LoRA adapters, master weights) is upcast to fp32 (sharded: 1/world each)."""
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if len(dtypes) > 1:
        log.info(
            "FSDP: parameters of dtypes %s upcast to float32 (one dtype per flat shard)", sorted(map(str, dtypes))
        )
        for p in module.parameters():
            if p.is_floating_point():
                p.data = p.data.float()


class UnveilFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy with the wrap policy taken from the backbone at setup (see module doc)."""

    def __init__(
        self,
        wrap_layers: list[str] | None = None,
        activation_checkpointing: bool = False,
        compute_dtype: str | None = "bfloat16",
        reference: str = "shard",
        **kwargs: Any,
    ) -> None:
        if reference not in REFERENCE_MODES:
            raise ValueError(f"trainer.strategy.reference={reference!r}; expected one of {REFERENCE_MODES}")
        kwargs.setdefault("use_orig_params", True)  # frozen and trainable weights in one unit; our param groups
        if compute_dtype:
            from torch.distributed.fsdp import MixedPrecision

            dt = getattr(torch, str(compute_dtype))
            kwargs.setdefault(
                "mixed_precision", MixedPrecision(param_dtype=dt, reduce_dtype=torch.float32, buffer_dtype=dt)
            )
        super().__init__(**kwargs)
        self.wrap_layers = list(wrap_layers) if wrap_layers else None
        self.activation_checkpointing_on = bool(activation_checkpointing)
        self.reference_mode = reference

    def setup(self, trainer) -> None:
        from pytorch_lightning.strategies.fsdp import _activation_checkpointing_kwargs
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        if not self.lightning_module.automatic_optimization:
            raise NotImplementedError(
                f"trainer=fsdp: {type(self.lightning_module).__name__} steps its optimiser inside training_step "
                "(RL stages, DPO), which Lightning runs within the root FSDP module's forward; FSDP then fails in "
                "the backward ('Expects BACKWARD_PRE or BACKWARD_POST state but got HandleTrainingState.FORWARD'). "
                "Use trainer=ddp for this stage; trainer=fsdp runs SFT"
            )
        classes = layer_classes(self.lightning_module.model, self.wrap_layers)
        log.info("FSDP units: %s", sorted(c.__name__ for c in classes))
        self.kwargs["auto_wrap_policy"] = ModuleWrapPolicy(classes)
        if self.activation_checkpointing_on:
            self._activation_checkpointing_kwargs = _activation_checkpointing_kwargs(None, classes)
        _uniform_dtype(self.lightning_module)
        super().setup(trainer)
        self._wrap_reference()

    def _fsdp(self, module: torch.nn.Module, **overrides):
        from torch.distributed.fsdp import FullyShardedDataParallel

        kw = dict(
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=self.root_device if self.root_device.type == "cpu" else self.root_device.index,
            **self.kwargs,
        )
        kw.update(overrides)
        return FullyShardedDataParallel(module=module, **kw)

    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.root_device.type != "cpu":
            return super()._setup_model(model)
        from pytorch_lightning.strategies.fsdp import _setup_activation_checkpointing

        model = self._fsdp(model)  # Lightning's own wrap, with device_id=cpu (see module doc)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model

    def _wrap_reference(self) -> None:
        """The frozen copy of RL / DPO, sharded like the policy (its forward unshards unit by unit)."""
        ref = getattr(self.lightning_module, "reference", None)
        if ref is None or getattr(ref, "copy", None) is None or self.reference_mode == "replicate":
            return
        from torch.distributed.fsdp import CPUOffload

        _uniform_dtype(ref.copy)
        over = {"cpu_offload": CPUOffload(offload_params=True)} if self.reference_mode == "cpu_offload" else {}
        # fp32, no compute_dtype: its top-level weights are summoned in their own dtype
        # (ReferencePolicy.model), which a bf16 unit's output would not meet
        over["mixed_precision"] = None
        ref.copy = self._fsdp(ref.copy, **over)
        log.info("FSDP: frozen reference %s", "sharded, offloaded to the CPU" if over else "sharded")


def fsdp_root(trainer) -> torch.nn.Module | None:
    """The root FSDP module of a run under FSDP; None otherwise (no trainer, DDP, one process)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = getattr(getattr(trainer, "strategy", None), "model", None) if trainer is not None else None
    return model if isinstance(model, FullyShardedDataParallel) else None


@contextlib.contextmanager
def full_params(trainer, rank0_only: bool = False):
    """Under FSDP: every parameter gathered whole (on every rank, or rank 0 with ``rank0_only``, then
    on the CPU), read-only, for the body; elsewhere nothing. Every rank must enter it. Inside it the
    model runs without collectives and in fp32 (not ``compute_dtype``), so ranks may generate
    different numbers of tokens."""
    root = fsdp_root(trainer)
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp._common_utils import TrainingState

    if root.training_state != TrainingState.IDLE:
        # inside a training step (Lightning runs it within the root's forward, where FSDP cannot
        # summon): the root's own weights are gathered already, each unit gathers its own per
        # forward, and HF generate's synced_gpus (on for FSDP-managed models) keeps every rank
        # stepping until all are done, so the collectives match
        yield
        return

    # Inside summon_full_params a unit's own forward would still all-gather (its compute-dtype copy),
    # a collective per forward: each unit runs its wrapped module directly, on the gathered fp32 weights.
    units = [m for m in root.modules() if isinstance(m, FullyShardedDataParallel) and m is not root]
    with (
        torch.no_grad(),
        FullyShardedDataParallel.summon_full_params(
            root, writeback=False, rank0_only=rank0_only, offload_to_cpu=rank0_only
        ),
    ):
        for m in units:
            m.forward = m.module.forward
        # torch marks FSDP-managed modules; HF generate then defaults to synced_gpus (every rank steps
        # until all finish), which would wait on ranks that generate less or nothing
        marked = [m for m in root.modules() if getattr(m, "_is_fsdp_managed_module", False)]
        for m in marked:
            m._is_fsdp_managed_module = False
        try:
            yield
        finally:
            for m in units:
                del m.forward
            for m in marked:
                m._is_fsdp_managed_module = True


def clip_grad_norm(trainer, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to ``max_norm`` over the global gradient norm: under FSDP each rank holds a shard of the
    gradients, so the norm is all-reduced by FSDP's own ``clip_grad_norm_``; else torch's."""
    root = fsdp_root(trainer)
    if root is not None:
        return root.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
