"""Collators: Samples -> model batches, built on each backbone's own processor.

Loss masks are found by rendering the conversation prefix before each trained turn and
counting its tokens, which works for any chat template whose turns are separated by special
tokens (all the backbones we support).
"""

from __future__ import annotations

from typing import Any

import torch

from unveil.data.frames import model_messages, prepare_image
from unveil.data.images import load_image
from unveil.data.schema import Sample
from unveil.data.virtual_user import convert
from unveil.models import chat
from unveil.models.chat_templates import CHAT_TEMPLATES

IGNORE = -100
PER_TOKEN = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")  # cut by max_length


def backbone_messages(backbone, s: Sample, sizes=None) -> list[dict]:
    """The sample's messages with answer boxes in the backbone's own format and image frame
    (:func:`unveil.data.frames.model_messages`; ``sizes``: the images' (w, h) when loaded)."""
    return model_messages(backbone, s, sizes)


class ImageCache:
    """Decoded images by path; small synthetic sets fit in memory and skip PNG decoding."""

    def __init__(self, max_items: int = 20000):
        self.max_items, self._d = max_items, {}

    def __call__(self, path: str):
        im = self._d.get(path)
        if im is None:
            im = load_image(path)
            if len(self._d) < self.max_items:
                self._d[path] = im
        return im


class SFTCollator:
    """Cross-entropy batches: labels on assistant tokens only (and virtual-user questions).

    ``train_on_virtual_user``: STLLaVA-Med's stage 1 also trains on the question tokens of
    turns marked ``virtual_user`` (after the virtual user's role tag, through its end-of-turn
    token), so the model learns to ask about an image. ``sq_r``: first turn each later human turn
    of a record with an image into a virtual-user turn with that probability, drawn per record and
    epoch (:mod:`unveil.data.virtual_user`), as the official stage 1 does with ``sq_r`` 0.5.
    """

    def __init__(
        self,
        backbone,
        train_on_virtual_user: bool = False,
        max_length: int | None = None,
        image_cache: ImageCache | None = None,
        sq_r: float = 0.0,
        seed: int = 0,
    ):
        """``max_length``: tokens per row, the start kept (see :meth:`_truncate`); the datamodule
        sets ``data.max_tokens`` here when the stage leaves it None."""
        self.bb = backbone
        self.train_on_virtual_user = train_on_virtual_user
        self.max_length = max_length
        self.images = image_cache or ImageCache()
        self.sq_r, self.seed = float(sq_r), int(seed)
        if not 0.0 <= self.sq_r <= 1.0:
            raise ValueError(f"stage.sq_r must be a probability in [0, 1], got {sq_r}")
        if self.sq_r > 0 and not train_on_virtual_user:
            raise ValueError(
                "stage.sq_r > 0 makes virtual-user turns to train on: set stage.train_on_virtual_user=true"
            )
        if train_on_virtual_user and not chat.supports_virtual_user(backbone):
            raise ValueError(
                f"stage.train_on_virtual_user: the chat template of {backbone.name} has no virtual-user role, so "
                "its questions would be trained behind a plain user tag; set model.chat_template to one of "
                f"{sorted(CHAT_TEMPLATES)} (unveil.models.chat_templates)"
            )
        # the epoch the sq_r draws belong to; in shared memory, so loader workers see what the stage sets
        self.epoch = torch.zeros((), dtype=torch.long).share_memory_()

    def messages(self, s: Sample, sizes=None) -> list[dict]:
        """The sample's messages as trained: answer boxes in the backbone's format and image frame
        (``sizes``: the images' (w, h)), and this epoch's virtual-user turns when ``sq_r`` > 0."""
        return convert(s, backbone_messages(self.bb, s, sizes), self.sq_r, self.seed, int(self.epoch))

    def _load(self, paths_per_row) -> tuple[list[list[Any]], list[list[tuple[int, int]]]]:
        """Per row: the images as the processor gets them (padded to a square under
        ``model.image_aspect: pad``) and their original (w, h), which the box text is mapped from."""
        loaded = [[self.images(p) for p in paths] for paths in paths_per_row]
        return [[prepare_image(self.bb, im) for im in ims] for ims in loaded], [
            [im.size for im in ims] for ims in loaded
        ]

    def _encode(self, texts: list[str], images: list[list[Any]], padding_side: str = "right"):
        flat = [im for ims in images for im in ims]
        tok = self.bb.tokenizer
        tok.padding_side = padding_side
        kw: dict[str, Any] = dict(text=texts, return_tensors="pt", padding=True)
        if flat:
            kw["images"] = self.bb.extra.get("nest_images") and images or flat
        return self.bb.processor(**kw)

    def _lengths(self, texts: list[str], images: list[list[Any]]) -> list[int]:
        return self._encode(texts, images)["attention_mask"].sum(1).tolist()

    def _truncate(self, batch, labels: torch.Tensor, row_ids: list[str]):
        """(batch, labels) cut to ``max_length`` tokens per row, keeping the start: the prompt and
        its image tokens stay whole, the end of a long answer goes. A ValueError names the samples
        when the cut would go through image tokens (the model would count fewer image tokens than
        image features) or leave a trained row without any labelled token."""
        n = self.max_length
        if n is None or batch["input_ids"].shape[1] <= n:
            return batch, labels
        try:
            image_ids = torch.tensor(self.bb.image_token_ids, dtype=batch["input_ids"].dtype)
        except (AttributeError, TypeError):  # a backbone without a model config (tests' stubs)
            image_ids = torch.tensor([], dtype=batch["input_ids"].dtype)
        dropped = batch["input_ids"][:, n:]
        cut_images = (torch.isin(dropped, image_ids) & batch["attention_mask"][:, n:].bool()).any(1)
        if cut_images.any():
            bad = [row_ids[i] for i in cut_images.nonzero().flatten().tolist()]
            raise ValueError(
                f"max_length={n} (data.max_tokens) cuts through the image tokens of {bad[:5]}: "
                "raise it, or shorten the text before the images"
            )
        trained = (labels != IGNORE).any(1)
        batch = {k: v[:, :n] if k in PER_TOKEN else v for k, v in batch.items()}
        labels = labels[:, :n]
        lost = trained & ~(labels != IGNORE).any(1)
        if lost.any():
            bad = [row_ids[i] for i in lost.nonzero().flatten().tolist()]
            raise ValueError(f"no answer tokens left within max_length={n} (data.max_tokens) in {bad[:5]}")
        return batch, labels

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        images, sizes = self._load([s.images for s in samples])
        msgs = [self.messages(s, z) for s, z in zip(samples, sizes)]
        full = [self.bb.render(m) for m in msgs]
        batch = self._encode(full, images)
        labels = torch.full_like(batch["input_ids"], IGNORE)
        trained = {"assistant"} | ({"virtual_user"} if self.train_on_virtual_user else set())
        # One processor call per turn position: the prefix before the turn and the text through it.
        n_turns = max(len(m) for m in msgs)
        for j in range(n_turns):
            rows = [i for i, m in enumerate(msgs) if j < len(m) and m[j]["role"] in trained]
            if not rows:
                continue
            gen = [msgs[i][j]["role"] == "assistant" for i in rows]
            # the prefix ends with the turn's role tag: ASSISTANT: (generation prompt) or VUSER:
            pre = self._lengths(
                [
                    self.bb.render(msgs[i][:j], add_generation_prompt=g, add_virtual_user_prompt=not g)
                    for i, g in zip(rows, gen)
                ],
                [images[i] for i in rows],
            )
            upto = (
                batch["attention_mask"][rows].sum(1).tolist()
                if j == n_turns - 1 and all(len(msgs[i]) == j + 1 for i in rows)
                else self._lengths([self.bb.render(msgs[i][: j + 1]) for i in rows], [images[i] for i in rows])
            )
            for i, a, b in zip(rows, pre, upto):
                labels[i, a:b] = batch["input_ids"][i, a:b]
        labels[batch["attention_mask"] == 0] = IGNORE
        batch, labels = self._truncate(dict(batch), labels, [s.id for s in samples])
        batch["labels"] = labels
        return batch


class PromptCollator(SFTCollator):
    """Left-padded prompts for generation (evaluation and rollouts), with the Samples kept."""

    def __call__(self, samples: list[Sample]) -> dict[str, Any]:
        images, sizes = self._load([s.images for s in samples])
        prompts = [
            self.bb.render(backbone_messages(self.bb, s, z)[: len(s.prompt_messages)], add_generation_prompt=True)
            for s, z in zip(samples, sizes)
        ]
        batch = dict(self._encode(prompts, images, padding_side="left"))
        batch["samples"] = samples
        return batch
