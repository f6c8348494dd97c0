"""Reading a run's ``.hydra/config.yaml`` written before every component plugged in by ``_target_``.

Runs of earlier versions named the model builder with ``model.kind``, LoRA with ``peft.kind: lora``
(``alpha``, ``dropout``), the data set's adapter with ``data.format`` + ``data.adapter_kwargs`` and the
datamodule as ``data._target_``, the multi-image synthetic set with ``synthetic.kind``.
:func:`upgrade` rewrites such a config in the current shape, so ``python -m unveil.eval`` still
loads those runs; a current config passes through unchanged.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

_BUILDERS = {"tiny_llava": "tiny_llava", "tiny_hf": "tiny_hf", "hf": "hf"}
_LORA = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules"}


def upgrade(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        if cfg.get("model") is not None and "kind" in cfg.model:
            cfg.model._target_ = f"unveil.models.factory.{_BUILDERS[cfg.model.pop('kind')]}"
        if cfg.get("peft") is not None and "kind" in cfg.peft:
            old = cfg.pop("peft")
            cfg.peft = {} if old.kind != "lora" else {"_target_": "peft.LoraConfig", "bias": "none"}
            for k, new in _LORA.items() if old.kind == "lora" else ():
                cfg.peft[new] = old.get(k)
            if old.kind == "lora":
                cfg.peft.modules_to_save = list(old.get("modules_to_save") or []) or None
        if cfg.get("data") is not None and "format" in cfg.data:
            _upgrade_data(cfg.data)
    return cfg


def _upgrade_data(data: DictConfig) -> None:
    fmt = data.pop("format")
    kwargs = data.pop("adapter_kwargs", None)
    options = OmegaConf.to_container(kwargs, resolve=False) if isinstance(kwargs, DictConfig) else dict(kwargs or {})
    data.adapter = {"_target_": f"unveil.data.adapters.{fmt}.read", "_partial_": True, **options}
    data._target_ = "unveil.data.records.RecordSet"
    syn = data.get("synthetic")
    if syn is not None and "_target_" not in syn:
        multi = syn.pop("kind", "single_image") == "multi_image"
        syn._target_ = (
            "unveil.data.synthetic.multi_image.MultiImageConfig" if multi else "unveil.data.synthetic.SyntheticConfig"
        )
