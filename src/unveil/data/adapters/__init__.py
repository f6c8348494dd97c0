"""Format adapters: each turns one released record format into Samples.

A new format is one module here with ``read(path, root=None, on_bad_record="raise",
check_images=True, max_tokens=None, **options) -> list[Sample]`` (passing ``on_bad_record`` and
``max_tokens`` to ``base.collect``) plus one entry in ADAPTERS and one yaml in ``conf/data/``.
"""

from __future__ import annotations

import importlib

ADAPTERS = {
    "mau_jsonl": "unveil.data.adapters.mau_jsonl",
    "llava": "unveil.data.adapters.llava",
    "med_mim": "unveil.data.adapters.med_mim",
    "vqa_table": "unveil.data.adapters.vqa_table",
    "mmedpo": "unveil.data.adapters.mmedpo",
    "stllava_dpo": "unveil.data.adapters.stllava_dpo",
}


def get_adapter(name: str):
    if name not in ADAPTERS:
        raise ValueError(f"unknown data format {name!r}; known: {sorted(ADAPTERS)}")
    return importlib.import_module(ADAPTERS[name])


def read(format: str, path, root=None, on_bad_record: str = "raise", **kw):
    return get_adapter(format).read(path, root=root, on_bad_record=on_bad_record, **kw)
