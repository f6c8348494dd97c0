"""A byte-level BPE tokenizer trained locally on the data's text (nothing downloaded).

Digits are split one per token, as in Llama/Qwen tokenizers, so box coordinates are spelled
digit by digit and a tiny model can learn them coarse-to-fine.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Iterable

from filelock import FileLock

log = logging.getLogger(__name__)

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
IMAGE_TOKEN = "<image>"

# Plain-text chat template of the tiny model; assistant turns end with </s>.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% elif m['role'] == 'virtual_user' %}USER: {{ m['content'] }}</s>\n"
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}</s>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: str | Path | None = None):
    """Train (or load from cache) a tokenizer on ``texts``; returns a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    key = hashlib.sha1(("\n".join(sorted(set(texts))) + f"|{vocab_size}|v1").encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"tok-{key}" if cache_dir else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # parallel multirun jobs share the cache
            if (path / "tokenizer.json").exists():
                return PreTrainedTokenizerFast.from_pretrained(str(path))
            tok = _build(texts, vocab_size)
            tok.save_pretrained(str(path))
            log.info("trained tokenizer (%d tokens) cached at %s", len(tok), path)
            return tok
    return _build(texts, vocab_size)


def _build(texts, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk_token"]))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL["pad_token"], SPECIAL["unk_token"], SPECIAL["bos_token"], SPECIAL["eos_token"], IMAGE_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens={"image_token": IMAGE_TOKEN}, **SPECIAL)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast
