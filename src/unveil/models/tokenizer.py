"""A byte-level BPE tokenizer trained locally on the data's text (nothing downloaded).

Box coordinates on the 0-100 grid are whole tokens ("0" ... "100"), the way PaliGemma and
Kosmos-2 give each location its own token: a coordinate is then one classification instead of
a digit pair whose units digit is a sawtooth of position (what a tiny model never learns in
CPU minutes). Other digit runs are split one digit per token by the pre-tokenizer, as in
Llama/Qwen.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from pathlib import Path

from filelock import FileLock

log = logging.getLogger(__name__)

SPECIAL = {"pad_token": "<pad>", "unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"}
IMAGE_TOKEN = "<image>"
# Whole-number tokens of the 0-100 box grid (matched longest-first: "100" beats "10" + "0").
NUMBER_TOKENS = [str(i) for i in range(101)]

# Plain-text chat template of the tiny model; assistant turns end with </s>. STLLaVA-Med's virtual
# user has its own role tag, "VUSER:" (add_virtual_user_prompt), and its questions end with </s>.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% elif m['role'] == 'virtual_user' %}VUSER: {{ m['content'] }}</s>\n"
    "{% elif m['role'] == 'assistant' %}ASSISTANT: {{ m['content'] }}</s>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% elif add_virtual_user_prompt %}VUSER:{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, cache_dir: str | Path | None = None):
    """Train (or load from cache) a tokenizer on ``texts``; returns a PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    key = hashlib.sha1(("\n".join(sorted(set(texts))) + f"|{vocab_size}|v2").encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"tok-{key}" if cache_dir else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):  # parallel multirun jobs share the cache
            if (path / "tokenizer.json").exists():
                tok = PreTrainedTokenizerFast.from_pretrained(str(path))
                tok.chat_template = TINY_CHAT_TEMPLATE  # the template of this code, not the one cached with it
                return tok
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
        special_tokens=[
            SPECIAL["pad_token"],
            SPECIAL["unk_token"],
            SPECIAL["bos_token"],
            SPECIAL["eos_token"],
            IMAGE_TOKEN,
        ],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    from tokenizers import AddedToken

    tok.add_tokens([AddedToken(t, single_word=False, normalized=False, special=False) for t in NUMBER_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, extra_special_tokens={"image_token": IMAGE_TOKEN}, **SPECIAL)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast
