"""Format adapters: each turns one released record format into Samples.

A new format is one module here with ``read(path, root=None, on_bad_record="raise",
check_images=True, max_tokens=None, **options) -> Records`` (passing ``on_bad_record`` and
``max_tokens`` to ``base.collect``, which returns the samples with their skipped count) plus one
yaml in ``conf/data/`` that plugs it in like every other component:
``adapter: {_target_: unveil.data.adapters.<module>.read, _partial_: true, <option>: ...}``.
"""
