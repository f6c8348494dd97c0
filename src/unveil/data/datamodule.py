"""LightningDataModule: loaded records (:mod:`unveil.data.records`) -> batches.

Evaluation does not go through it: :func:`unveil.eval.evaluate.evaluate` batches the test split
with a prompt collator of its own.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from unveil.data.collate import PromptCollator, SFTCollator
from unveil.data.records import RecordSet
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
    """Batches of loaded records, made by the stage's collator: built last, from what came before it
    (``records -> backbone -> stage module -> UnveilDataModule(records, module.collator)``)."""

    def __init__(self, records: RecordSet, collate_fn: Callable):
        super().__init__()
        if not records.data:
            raise ValueError("UnveilDataModule takes loaded records: call records.load() first")
        self.records, self.collate_fn = records, self._fit_collator(collate_fn, records.max_tokens)
        self.data = records.data

    @staticmethod
    def _fit_collator(collate: Callable, max_tokens: int | None) -> Callable:
        """A training collator (SFT, preference) the stage built without ``max_length`` gets
        ``data.max_tokens``: rows are cut to it, keeping the start (``SFTCollator._truncate``).
        Prompt collators are left alone: generation needs the whole prompt."""
        if isinstance(collate, SFTCollator) and not isinstance(collate, PromptCollator) and collate.max_length is None:
            collate.max_length = max_tokens
        return collate

    def _loader(self, split: str, train: bool):
        r = self.records
        ds = ListDataset(self.data[split])
        common = dict(collate_fn=self.collate_fn, num_workers=r.num_workers, persistent_workers=r.num_workers > 0)
        if not train:
            return DataLoader(ds, batch_size=r.eval_batch_size, shuffle=False, **common)
        # the training loader's place in the epoch goes into checkpoints (Lightning saves a loader
        # with state_dict), so a run resumed mid-epoch goes on with the next batch
        gen = torch.Generator().manual_seed(r.seed)
        trainer = getattr(self, "trainer", None)
        shard = {"rank": trainer.global_rank, "world": trainer.world_size} if trainer is not None else {}
        if r.sampling_weights:  # data.sampling_weights (data.task_weights is its field "task")
            w = torch.tensor([r.weight(s) for s in ds.samples])  # float32, as before: the same draws
            sampler = ResumableWeightedSampler(
                w, num_samples=len(ds), generator=torch.Generator().manual_seed(r.seed), **shard
            )
        else:
            sampler = ResumableRandomSampler(ds, generator=gen, **shard)
        return StatefulDataLoader(ds, batch_size=r.batch_size, sampler=sampler, generator=gen, **common)

    def train_dataloader(self):
        return self._loader("train", True)

    def val_dataloader(self):
        return self._loader("val", False) if "val" in self.data else []
