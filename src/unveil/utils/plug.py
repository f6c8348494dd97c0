"""Plugging a component in: the one way, a ``_target_`` naming a class or function.

Rewards, judges, data adapters, model builders, LoRA, stages, builders, callbacks, loggers and the
trainer are all configured as ``{_target_: dotted.path, key: value, ...}`` and built with
:func:`instantiate`, which wraps ``hydra.utils.instantiate`` so that a typo fails before any
work with a message naming the config group, the bad target or key, and the valid choices
(the ``_target_`` of every yaml in ``conf/<group>/``, or the parameters the target takes).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parents[3] / "conf"


def choices(group: str) -> list[str]:
    """``name -> _target_`` lines of the yamls in ``conf/<group>/`` (what the error lists)."""
    folder = CONF / group
    out = []
    for f in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        target = next(
            (ln.split(":", 1)[1].strip() for ln in f.read_text().splitlines() if ln.startswith("_target_:")), None
        )
        if target and not f.stem.startswith("_"):
            out.append(f"{group}={f.stem} ({target})")
    return out


def locate(target: str | None, where: str, group: str | None = None) -> Any:
    """The class or function ``target`` names, or a ValueError naming ``where`` and the choices."""
    if not target:
        raise ValueError(f"{where}._target_ is missing; {_listing(group)}")
    obj = _import(str(target))
    if obj is None:
        raise ValueError(f"{where}._target_={target!r} names nothing importable; {_listing(group)}")
    return obj


def _import(path: str) -> Any:
    """The object a dotted path names (the longest importable module, then attributes), or None."""
    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError as e:
            if e.name is not None and not ".".join(parts[:i]).startswith(e.name):
                raise  # the module exists but an import inside it fails: show that, not "names nothing"
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                return None
        return obj
    return None


def _listing(group: str | None) -> str:
    found = choices(group) if group else []
    return "choices: " + ", ".join(found) if found else "give a dotted path to a class or function"


def check_keys(target: Any, cfg: dict, where: str, extra: tuple[str, ...] = ()) -> None:
    """A key ``target`` does not take (a typo) is a ValueError listing the keys it takes; a target
    with ``**kwargs`` takes anything."""
    fn = target.func if isinstance(target, functools.partial) else target
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    known = set(params) | set(extra)
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in known)
    if unknown:
        valid = sorted(k for k in known if k != "self")
        hints = "".join(
            f" ({k!r}: did you mean {m[0]!r}?)" for k in unknown if (m := difflib.get_close_matches(k, valid, 1))
        )
        raise ValueError(f"{where}: unknown key(s) {unknown} for {_name(fn)}{hints}; valid keys: {', '.join(valid)}")


def _name(fn) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def as_dict(cfg) -> dict:
    if cfg is None:
        return {}
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg)


def check(d: dict, where: str, group: str | None = None, given: tuple[str, ...] = ()) -> None:
    """Check ``d``'s target and keys, and those of every ``_target_`` nested in it, without building.

    A model config (``_target_`` a builder in ``unveil.models.factory``) is a spec that
    ``build_backbone`` reads, not a call Hydra can make: nested in another component (a VLM judge),
    that component must say ``_recursive_: false`` so that it receives the spec as it is."""
    target = locate(d.get("_target_"), where, group)
    check_keys(target, d, where, extra=given)
    if d.get("_recursive_") is False:
        return
    for k, v in d.items():
        for i, item in enumerate(v if isinstance(v, list) else [v]):
            if isinstance(item, dict) and "_target_" in item:
                path = f"{where}.{k}" + (f"[{i}]" if isinstance(v, list) else "")
                if str(item["_target_"]).startswith("unveil.models.factory."):
                    raise ValueError(
                        f"{path} is a model config: {where} needs `_recursive_: false` to receive it as a config"
                    )
                check(item, path)


def instantiate(cfg, where: str, group: str | None = None, **kwargs) -> Any:
    """Build the component ``cfg`` describes, checking its target and keys first (see module doc).

    Objects in ``kwargs`` (a backbone, a callable) are passed as they are: they never go through
    OmegaConf, which would copy them."""
    d = as_dict(cfg)
    check(d, where, group, given=tuple(kwargs))
    try:
        built = hydra.utils.instantiate(d, _partial_=True, _convert_="all")
    except Exception as e:
        raise ValueError(f"{where}: could not build {d.get('_target_')}: {e}") from e
    return built(**kwargs) if not d.get("_partial_") else functools.partial(built, **kwargs)
