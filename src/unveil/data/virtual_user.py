"""STLLaVA-Med's stage-1 conversion of human turns into virtual-user turns (``sq_r``).

The official ``preprocess_v1_sq2`` (heliossun/STLLaVA-Med, ``train.py``), run each time a record
is fetched: for a record with an image, every human turn except the conversation's first message
becomes a ``VUSER`` turn with probability ``sq_r`` (0.5 in ``sqllava_med.sh``), and its question
tokens are trained (the ``VUSER:`` tag is masked, the question and its ``</s>`` are not). Here the
draw is seeded by (seed, epoch, record id), so a record gets a fresh draw every epoch, as the
official loader's ``random()`` gives it, and a resumed or repeated run draws the same turns.

One departure: a later turn that holds an ``<image>`` placeholder is never converted (the official
loader moves the image to the first turn, so it never meets one; training on image tokens would
be wrong).
"""

from __future__ import annotations

import hashlib
import random

from unveil.data.schema import IMAGE_PLACEHOLDER, Sample


def record_rng(seed: int, epoch: int, record_id: str) -> random.Random:
    """A generator of its own for one record in one epoch (independent of batch order and workers)."""
    digest = hashlib.blake2b(f"{seed}|{epoch}|{record_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def to_virtual_user(messages: list[dict], sq_r: float, rng: random.Random) -> list[dict]:
    """``messages`` with each user turn after the first message turned into ``virtual_user`` with
    probability ``sq_r`` (system messages do not count as the first message)."""
    out, first = [], True
    for m in messages:
        if m["role"] == "system":
            out.append(m)
            continue
        if not first and m["role"] == "user" and IMAGE_PLACEHOLDER not in m["content"] and rng.random() < sq_r:
            m = {**m, "role": "virtual_user"}
        out.append(m)
        first = False
    return out


def convert(sample: Sample, messages: list[dict], sq_r: float, seed: int, epoch: int) -> list[dict]:
    """The conversion of one record's ``messages`` (already in the backbone's box format) for ``epoch``;
    records without an image are left alone, as the official code leaves them."""
    if sq_r <= 0 or not sample.images:
        return messages
    return to_virtual_user(messages, sq_r, record_rng(seed, epoch, sample.id))
