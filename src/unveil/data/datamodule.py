"""LightningDataModule: records on disk -> Samples -> batches.

With ``data.synthetic`` set it first generates the synthetic set (cached by fingerprint), then
reads it back through the same adapter a real data set uses.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from unveil.data import adapters
from unveil.data.adapters.base import collect
from unveil.data.collate import PromptCollator, SFTCollator
from unveil.data.errors import RecordError
from unveil.data.samplers import ResumableRandomSampler, ResumableWeightedSampler
from unveil.data.schema import Sample

# torchdata 0.11 calls a torch API that torch 2.14 deprecates, once per loader iterator: noise in every log
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)

log = logging.getLogger(__name__)


def stop_loader_workers(loader) -> None:
    """Stop a StatefulDataLoader's persistent workers. Lightning does this for torch's loaders
    when fit ends, but only drops torchdata's iterator (it is not torch's class): its workers would
    idle through evaluation, and a process that trains twice (tests, notebooks) waits 5 s per
    worker when the orphaned iterator is collected."""
    it = getattr(loader, "_iterator", None)
    if isinstance(loader, StatefulDataLoader) and it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
        loader._iterator = None


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


class UnveilDataModule(pl.LightningDataModule):
    def __init__(
        self,
        root: str,
        format: str = "mau_jsonl",
        splits: dict | None = None,
        synthetic: dict | None = None,
        on_bad_record: str = "raise",
        check_images: bool = True,
        batch_size: int = 16,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        task_weights: dict | None = None,
        train_tasks: list | None = None,
        max_samples: dict | None = None,
        adapter_kwargs: dict | None = None,
        medical: dict | None = None,
        allow_split_overlap: bool = False,
        max_tokens: int | None = 4096,
        seed: int = 0,
    ):
        super().__init__()
        self.root = Path(root)
        self.format, self.on_bad_record, self.check_images = format, on_bad_record, check_images
        self.splits = dict(splits or {"train": "train.jsonl", "val": "val.jsonl", "test": "test.jsonl"})
        self.synthetic = dict(synthetic) if synthetic else None
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.task_weights = dict(task_weights or {})
        self.train_tasks = list(train_tasks) if train_tasks else None
        self.max_samples = dict(max_samples or {})
        self.adapter_kwargs = dict(adapter_kwargs or {})  # format-specific options (see conf/data/<format>.yaml)
        self.medical = dict(medical or {})  # DICOM / NIfTI windowing and slice defaults
        self.allow_split_overlap = allow_split_overlap  # a training id in val/test is an error unless set
        # text longer than this many tokens can hold is a bad record at load (adapters.base.CHARS_PER_TOKEN),
        # and the training collators cut rows to it (when the stage gives them no max_length of their own)
        self.max_tokens = max_tokens
        self.seed = seed
        self.data: dict[str, list[Sample]] = {}
        self.skipped: dict[str, int] = {}
        self.collate_fn: Callable | None = None  # set by the stage: batches depend on the backbone
        self.eval_collate_fn: Callable | None = None

    def prepare_data(self) -> None:
        if self.synthetic is not None:
            from unveil.data.synthetic import SyntheticConfig, generate

            cfg = dict(self.synthetic)
            if cfg.pop("kind", "single_image") == "multi_image":  # Med-MIM-style multiple choice
                from unveil.data.synthetic.multi_image import MultiImageConfig, generate_multi_image

                return generate_multi_image(MultiImageConfig(**cfg), self.root)
            cfg["studies_per_patient"] = tuple(cfg.get("studies_per_patient", (1, 3)))
            generate(SyntheticConfig(**cfg), self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.data:
            return
        self.prepare_data()
        if self.medical:
            from unveil.data import medical

            medical.configure(**self.medical)
        for split, rel in self.splits.items():
            if rel is None:
                continue
            path = self.root / rel
            samples = adapters.read(
                self.format,
                path,
                root=self.root,
                on_bad_record=self.on_bad_record,
                check_images=self.check_images,
                max_tokens=self.max_tokens,
                **self.adapter_kwargs,
            )
            self.skipped[split] = collect.last_skipped
            if split == "train" and self.train_tasks:
                samples = [s for s in samples if s.task in self.train_tasks]
            n = self.max_samples.get(split)
            if n:
                samples = samples[: int(n)]
            if not samples:
                raise ValueError(f"{path}: no usable samples in split '{split}'")
            self.data[split] = samples
        self._check_split_overlap()
        log.info("data: %s", {k: len(v) for k, v in self.data.items()})

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
            where = f"{self.root / self.splits['train']} (train) and {self.root / self.splits[split]} ({split})"
            msg = f"{len(common)} record id(s) are in both {where}, e.g. {common[:5]}"
            if self.allow_split_overlap:
                log.warning("%s (data.allow_split_overlap=true)", msg)
                continue
            raise RecordError(
                str(self.root / self.splits[split]),
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

    def _fit_collator(self, collate: Callable) -> Callable:
        """A training collator (SFT, preference) the stage built without ``max_length`` gets
        ``data.max_tokens``: rows are cut to it, keeping the start (``SFTCollator._truncate``).
        Prompt collators are left alone: generation needs the whole prompt."""
        if isinstance(collate, SFTCollator) and not isinstance(collate, PromptCollator) and collate.max_length is None:
            collate.max_length = self.max_tokens
        return collate

    def _loader(self, split: str, train: bool, collate: Callable | None):
        if collate is None:
            raise RuntimeError("datamodule.collate_fn is unset: the stage module sets it from its backbone")
        collate = self._fit_collator(collate)
        ds = ListDataset(self.data[split])
        common = dict(collate_fn=collate, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)
        if not train:
            return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, **common)
        # the training loader's place in the epoch goes into checkpoints (Lightning saves a loader
        # with state_dict), so a run resumed mid-epoch goes on with the next batch
        gen = torch.Generator().manual_seed(self.seed)
        trainer = getattr(self, "trainer", None)
        shard = {"rank": trainer.global_rank, "world": trainer.world_size} if trainer is not None else {}
        if self.task_weights:
            w = torch.tensor([float(self.task_weights.get(s.task, 1.0)) for s in ds.samples])
            sampler = ResumableWeightedSampler(
                w, num_samples=len(ds), generator=torch.Generator().manual_seed(self.seed), **shard
            )
        else:
            sampler = ResumableRandomSampler(ds, generator=gen, **shard)
        return StatefulDataLoader(ds, batch_size=self.batch_size, sampler=sampler, generator=gen, **common)

    def train_dataloader(self):
        return self._loader("train", True, self.collate_fn)

    def val_dataloader(self):
        return self._loader("val", False, self.collate_fn) if "val" in self.data else []

    def test_dataloader(self):
        return self._loader("test", False, self.eval_collate_fn or self.collate_fn)
