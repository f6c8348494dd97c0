"""The records of a data set: what the ``data`` config group describes, loaded once per run.

``data`` -> :class:`RecordSet` -> ``load()``: the synthetic set is generated first when
``data.synthetic`` is set (cached by fingerprint), then every split is read through the format
adapter (``data.adapter``, a ``_target_``), validated (bad records raise or are skipped and
counted), filtered and checked for train/test leakage. The backbone is built from its text
(``corpus``, ``findings``); the datamodule batches it with the stage's collator.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path

from unveil.data.errors import RecordError
from unveil.data.schema import Sample

log = logging.getLogger(__name__)


class RecordSet:
    """Splits of Samples read from ``root`` by ``adapter`` (``data.*`` keys, conf/data/<name>.yaml).

    A split is one file or a list of files read in order (a mixture, e.g. one file per Med-MIM
    ability); ``split_options[split]`` are adapter options of one split over ``data.adapter``'s own
    (VQA-RAD: the train and test rows of one file).

    ``batch_size``, ``eval_batch_size``, ``num_workers``, ``sampling_weights`` (``task_weights``: its
    field ``task``) and ``seed`` are how the datamodule batches the records; they live here so that
    ``data.*`` stays one flat group.
    """

    def __init__(
        self,
        root: str,
        adapter: Callable,
        splits: dict | None = None,
        synthetic=None,
        on_bad_record: str = "raise",
        check_images: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        task_weights: dict | None = None,
        train_tasks: list | None = None,
        max_samples: dict | None = None,
        medical: dict | None = None,
        allow_split_overlap: bool = False,
        max_tokens: int | None = 4096,
        seed: int = 0,
        split_options: dict | None = None,
        sampling_weights: dict | None = None,
    ):
        if not callable(adapter):
            raise ValueError(f"data.adapter must be a `_target_` naming an adapter's read function, got {adapter!r}")
        self.root, self.adapter = Path(root), adapter
        self.on_bad_record, self.check_images = on_bad_record, check_images
        self.splits = dict(splits or {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"})
        self.synthetic = synthetic  # a SyntheticConfig / MultiImageConfig, or None for a data set on disk
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.task_weights = dict(task_weights or {})
        self.train_tasks = list(train_tasks) if train_tasks else None
        self.max_samples = dict(max_samples or {})
        self.medical = dict(medical or {})  # DICOM / NIfTI windowing and slice defaults
        self.allow_split_overlap = allow_split_overlap  # a training id in val/test is an error unless set
        # text longer than this many tokens can hold is a bad record at load (adapters.base.CHARS_PER_TOKEN),
        # and the training collators cut rows to it (when the stage gives them no max_length of their own)
        self.max_tokens = max_tokens
        self.seed = seed
        from unveil.utils.plug import check_keys

        self.split_options = {k: dict(v or {}) for k, v in (split_options or {}).items()}
        for split, options in self.split_options.items():  # a typo fails here, before any file is read
            check_keys(adapter, options, f"data.split_options.{split}")
        # {field: {value: weight}}: a training record is drawn in proportion to the product of its
        # fields' weights (field "task" or a meta field, e.g. Med-MIM's "ability"; 1.0 when unlisted)
        self.sampling_weights = {k: dict(v or {}) for k, v in (sampling_weights or {}).items()}
        if self.task_weights:  # the older spelling of sampling_weights.task
            self.sampling_weights.setdefault("task", {}).update(self.task_weights)
        self.data: dict[str, list[Sample]] = {}
        self.skipped: dict[str, int] = {}
        self.dropped: dict[str, dict[str, int]] = {}  # split -> {reason: count}: left out on purpose by the adapter

    @property
    def format(self) -> str:
        """The adapter's module name (``mau_jsonl``, ``llava``, ...), for logs."""
        fn = self.adapter.func if isinstance(self.adapter, functools.partial) else self.adapter
        return getattr(fn, "__module__", "?").rsplit(".", 1)[-1]

    def load(self) -> RecordSet:
        """Generate (synthetic) and read every split; a second call does nothing."""
        if self.data:
            return self
        if self.synthetic is not None:
            from unveil.data.synthetic import make

            make(self.synthetic, self.root)
        if self.medical:
            from unveil.data import medical

            medical.configure(**self.medical)
        for split in self.splits:
            if self._files(split):
                self.data[split] = self._read(split, self._files(split))
        self._check_split_overlap()
        log.info("data: %s", {k: len(v) for k, v in self.data.items()})
        if self.sampling_weights and "train" in self.data:
            shares = {k: round(v, 3) for k, v in self.sampling_shares().items()}
            log.info(
                "data.sampling_weights %s: expected share of the training draws %s", self.sampling_weights, shares
            )
        return self

    def _files(self, split: str) -> list[Path]:
        """The file(s) of a split (``data.splits.<split>``: a path, a list of paths, or null)."""
        rel = self.splits.get(split)
        return [self.root / r for r in ([] if rel is None else [rel] if isinstance(rel, (str, Path)) else rel)]

    def _split_files(self, split: str) -> str:
        return ", ".join(str(p) for p in self._files(split))

    def _read(self, split: str, files: list[Path]) -> list[Sample]:
        """The Samples of one split: its file(s) read in order, with ``split_options[split]`` over the
        adapter's options; what each file skipped (bad records) and dropped (the adapter's own filters,
        ``Records.dropped``) is summed into ``skipped`` / ``dropped``."""
        options = self.split_options.get(split, {})
        samples: list[Sample] = []
        self.skipped[split], dropped = 0, self.dropped.setdefault(split, {})
        for path in files:
            got = self.adapter(
                path,
                root=self.root,
                on_bad_record=self.on_bad_record,
                check_images=self.check_images,
                max_tokens=self.max_tokens,
                **options,
            )
            samples += got
            self.skipped[split] += got.skipped
            for reason, k in got.dropped.items():
                dropped[reason] = dropped.get(reason, 0) + k
        if split == "train" and self.train_tasks:
            samples = [s for s in samples if s.task in self.train_tasks]
        n = self.max_samples.get(split)
        if n:
            samples = samples[: int(n)]
        if not samples:
            raise ValueError(f"{self._split_files(split)}: no usable samples in split '{split}'")
        return samples

    def counts(self) -> dict[str, float]:
        """``data/skipped_<split>`` (bad records) and ``data/dropped_<reason>_<split>``, for metrics.json."""
        out = {f"data/skipped_{k}": float(v) for k, v in self.skipped.items()}
        for split, reasons in self.dropped.items():
            out.update({f"data/dropped_{r}_{split}": float(k) for r, k in reasons.items()})
        return out

    def weight(self, s: Sample) -> float:
        """A training record's sampling weight: the product of its fields' ``sampling_weights``."""
        w = 1.0
        for field, weights in self.sampling_weights.items():
            w *= float(weights.get(str(s.task if field == "task" else s.meta.get(field)), 1.0))
        return w

    def sampling_shares(self) -> dict[str, float]:
        """Expected share of each weighted field value in the training draws (logged at load):
        value v of field f gets sum_i w_i [f_i = v] / sum_i w_i."""
        samples = self.data.get("train", [])
        weights = [self.weight(s) for s in samples]
        total = sum(weights) or 1.0
        out: dict[str, float] = {}
        for field in self.sampling_weights:
            for s, w in zip(samples, weights):
                key = f"{field}/{s.task if field == 'task' else s.meta.get(field)}"
                out[key] = out.get(key, 0.0) + w / total
        return out

    def _check_split_overlap(self) -> None:
        """A record id of the training split that is also in another split is an error (unless
        ``data.allow_split_overlap``): evaluation on training records inflates every table.

        Compared are the ids the records define; ids an adapter made from a record's position
        (``meta["id_from_position"]``: a table without an id column, Med-MIM, whose ids repeat)
        name nothing across files and are left out. Repeats that an adapter made unique
        (``fig1#2``) are compared as they are: ``fig1`` in train and test is caught.
        """
        train = self.data.get("train")
        if train is None:
            return
        train_ids = {s.id for s in train if not s.meta.get("id_from_position")}
        for split, samples in self.data.items():
            if split == "train":
                continue
            common = sorted({s.id for s in samples if not s.meta.get("id_from_position")} & train_ids)
            if not common:
                continue
            where = f"{self._split_files('train')} (train) and {self._split_files(split)} ({split})"
            msg = f"{len(common)} record id(s) are in both {where}, e.g. {common[:5]}"
            if self.allow_split_overlap:
                log.warning("%s (data.allow_split_overlap=true)", msg)
                continue
            raise RecordError(
                self._split_files(split),
                None,
                "id",
                f"{msg}: {split} records the model trains on inflate every metric. Fix the splits, or set "
                "data.allow_split_overlap=true where the same id legitimately names different records",
            )

    def corpus(self) -> list[str]:
        """Text the tiny model's tokenizer is trained on: every message of the training split."""
        return [m["content"] for s in self.data["train"] for m in s.messages]

    def findings(self) -> list[str]:
        """Finding vocabulary of the training split (labels the parser looks for)."""
        return sorted({f for s in self.data["train"] for f in s.findings})


def load_records(cfg) -> RecordSet:
    """The ``data`` config group's records, loaded (a typo in a key or the adapter fails first)."""
    from unveil.utils.plug import instantiate

    return instantiate(cfg, "data", group="data").load()
