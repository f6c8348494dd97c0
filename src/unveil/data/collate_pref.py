"""Preference batches for DPO: chosen and rejected sequences in one padded batch.

A batch of B pairs becomes 2B rows, chosen first (rows ``0..B-1``), then rejected (rows
``B..2B-1``), so one forward pass scores both sides and ``logps.chunk(2)`` splits them again
(the layout TRL's ``DataCollatorForPreference`` uses).

Each side brings its own images: a *visual* pair (MMedPO) keeps the chosen conversation and
swaps in a noised copy of the image (``Sample.rejected.images``); a *text* pair keeps the
images and swaps the answer (``Sample.rejected.messages``). Labels cover the final assistant
turn only (the answer being compared); prompt, image and padding tokens are ``-100``.

Extra keys: ``weights`` (B,) is each pair's raw ``Sample.weight``; the DPO stage decides how
to normalise it.
"""

from __future__ import annotations

from typing import Any

import torch

from unveil.data.collate import IGNORE, ImageCache, SFTCollator, backbone_messages
from unveil.data.schema import Sample


def _through_last_answer(messages: list[dict]) -> tuple[list[dict], list[dict]]:
    """(prompt, conversation through the final assistant turn) of a message list."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise ValueError("a preference conversation needs an assistant turn to compare")
    return messages[:last], messages[: last + 1]


class PreferenceCollator(SFTCollator):
    """Samples with ``rejected`` -> one right-padded batch of 2B rows (chosen, then rejected)."""

    def __init__(self, backbone, max_length: int | None = None, image_cache: ImageCache | None = None):
        super().__init__(backbone, max_length=max_length, image_cache=image_cache)

    def _rejected_side(self, s: Sample) -> tuple[list[dict], list[str]]:
        rj = s.rejected
        if rj is None or (rj.messages is None and rj.images is None):
            raise ValueError(
                f"sample {s.id!r} has no rejected side: stage=dpo needs preference records "
                "(MAU JSONL records with a 'rejected' field, e.g. written by unveil.curate)"
            )
        messages = s.messages if rj.messages is None else rj.messages
        images = s.images if rj.images is None else rj.images
        if len(images) != len(s.images):
            raise ValueError(f"sample {s.id!r}: {len(images)} rejected image(s) for {len(s.images)} chosen")
        return messages, images

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        image_paths = [s.images for s in samples] + [self._rejected_side(s)[1] for s in samples]
        images, sizes = self._load(image_paths)
        conversations = [backbone_messages(self.bb, s, z) for s, z in zip(samples, sizes)]  # chosen rows
        for s, z in zip(samples, sizes[len(samples) :]):  # rejected rows, same order
            messages, rj_images = self._rejected_side(s)
            rejected = Sample(id=s.id, images=rj_images, messages=messages, box_images=list(s.box_images))
            conversations.append(backbone_messages(self.bb, rejected, z))

        prompts, fulls = zip(*(_through_last_answer(m) for m in conversations))
        batch = self._encode([self.bb.render(m) for m in fulls], images)
        # The answer starts after the prompt rendered with the generation prompt, and runs to the
        # end of the row (the conversation stops at the answer).
        starts = self._lengths([self.bb.render(m, add_generation_prompt=True) for m in prompts], images)
        ends = batch["attention_mask"].sum(1).tolist()
        labels = torch.full_like(batch["input_ids"], IGNORE)
        for i, (a, b) in enumerate(zip(starts, ends)):
            labels[i, a:b] = batch["input_ids"][i, a:b]
        # keep the start: prompt and image tokens stay whole
        batch, labels = self._truncate(dict(batch), labels, [samples[i % len(samples)].id for i in range(len(starts))])
        if ((labels != IGNORE).sum(1) == 0).any():
            bad = [samples[i % len(samples)].id for i in ((labels != IGNORE).sum(1) == 0).nonzero().flatten().tolist()]
            raise ValueError(f"no answer tokens left (empty answer or max_length too short) in {bad[:5]}")
        out = dict(batch)
        out["labels"] = labels
        out["weights"] = torch.tensor([float(s.weight) for s in samples], dtype=torch.float32)
        out["n_images"] = [len(p) for p in image_paths]  # per row: micro-batches gather each row's images
        return out
