"""A local Hugging Face causal LM as judge (``judge: {_target_: unveil.judges.hf.HFJudge, name_or_path: ...}``);
it reads no image (:mod:`unveil.judges.hf_vlm` is the judge that sees).

Two ways to read a score, both in [0, 1]:

- ``mode: score`` (default): the judge is asked for a 0-10 rating and generates greedily; the
  first number in its reply is read (``"8"``, ``"8/10"``, ``"Score: 7.5"``) and divided by 10.
  A reply without a number in [0, 10] gives NaN.
- ``mode: yes_no``: the judge is asked whether the answer agrees with the reference; the score
  is ``p(Yes) / (p(Yes) + p(No))`` from the next-token distribution (one forward pass, no
  sampling; several spellings of Yes/No are pooled). Always defined.

Pass ``name_or_path`` (hub id or local dir; loaded once, eval mode) or a ready ``model`` and
``tokenizer``. The weights are loaded once per process (:func:`load_lm`, keyed by the settings),
not once per head or call. ``score_batch`` never raises: a failing batch gives NaN for its items.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence

import torch

from unveil.judges.base import Judge

log = logging.getLogger(__name__)

SCORE_PROMPT = (
    "You are a radiologist grading an assistant's answer against the reference answer.\n"
    "Question: {question}\nReference answer: {reference}\nAssistant's answer: {answer}\n"
    "How well does the assistant's answer agree with the reference (findings, location, diagnosis)? "
    "Reply with one integer from 0 (wrong) to 10 (fully correct)."
)
YES_NO_PROMPT = (
    "You are a radiologist checking an assistant's answer against the reference answer.\n"
    "Question: {question}\nReference answer: {reference}\nAssistant's answer: {answer}\n"
    "Does the assistant's answer agree with the reference? Answer Yes or No."
)
_NUMBER = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d+)?)(?!\d)")
_DTYPES = {None: None, "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LOADED: dict[tuple, tuple] = {}  # one copy per process, however many heads, builders or calls ask
_LOAD_LOCK = threading.Lock()


def load_lm(name_or_path: str, dtype=None, device=None, local_files_only=False, trust_remote_code=False):
    """``(model, tokenizer)`` loaded once per process and per settings, eval mode."""
    key = (str(name_or_path), str(dtype), str(device), bool(local_files_only), bool(trust_remote_code))
    with _LOAD_LOCK:
        if key not in _LOADED:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            kw = dict(local_files_only=local_files_only, trust_remote_code=trust_remote_code)
            tok = AutoTokenizer.from_pretrained(name_or_path, **kw)
            model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=_DTYPES[dtype], **kw)
            _LOADED[key] = (model.to(device) if device else model).eval(), tok
            log.info("judge model %s loaded (once per process)", name_or_path)
        return _LOADED[key]


def parse_score(text: str, scale: float = 10.0) -> float:
    """First number of a judge's reply divided by ``scale``; NaN when none or out of range."""
    m = _NUMBER.search(text if isinstance(text, str) else "")
    if not m:
        return float("nan")
    try:
        v = float(m.group(1))
    except ValueError:
        return float("nan")
    return v / scale if 0.0 <= v <= scale else float("nan")


class HFJudge(Judge):
    name = "hf"

    def __init__(
        self,
        name_or_path: str | None = None,
        model=None,
        tokenizer=None,
        mode: str = "score",
        max_new_tokens: int = 8,
        batch_size: int = 8,
        max_chars: int = 2000,
        scale: float = 10.0,
        prompt: str | None = None,
        use_chat_template: bool = True,
        device: str | None = None,
        dtype: str | None = None,
        local_files_only: bool = False,
        trust_remote_code: bool = False,
    ):
        if mode not in ("score", "yes_no"):
            raise ValueError(f"HFJudge.mode must be score or yes_no, got {mode!r}")
        if model is None:
            if not name_or_path:
                raise ValueError("HFJudge needs name_or_path or a model (and its tokenizer)")
            model, loaded_tok = load_lm(name_or_path, dtype, device, local_files_only, trust_remote_code)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise ValueError("HFJudge: pass the tokenizer with the model")
        self.model = model.eval()
        self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.mode = mode
        self.max_new_tokens, self.batch_size, self.max_chars, self.scale = (
            int(max_new_tokens),
            int(batch_size),
            int(max_chars),
            float(scale),
        )
        self.prompt = prompt or (SCORE_PROMPT if mode == "score" else YES_NO_PROMPT)
        self.use_chat_template = bool(use_chat_template) and bool(getattr(tokenizer, "chat_template", None))
        self._yes, self._no = (
            self._word_ids(("Yes", " Yes", "yes", " yes")),
            self._word_ids(("No", " No", "no", " no")),
        )

    def _word_ids(self, words) -> list[int]:
        ids = set()
        for w in words:
            t = self.tokenizer(w, add_special_tokens=False)["input_ids"]
            if t and t[0] != self.tokenizer.unk_token_id:
                ids.add(int(t[0]))
        return sorted(ids)

    def _render(self, question: str, reference: str, answer: str) -> str:
        clip = lambda s: str(s if s is not None else "")[: self.max_chars]  # noqa: E731
        text = self.prompt.format(question=clip(question), reference=clip(reference), answer=clip(answer))
        if self.use_chat_template:
            try:
                return self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                )
            except Exception:  # noqa: BLE001  (a template that wants other roles: fall back to plain text)
                pass
        return text + ("\nScore:" if self.mode == "score" else "\nAnswer:")

    @property
    def _device(self):
        try:
            return next(self.model.parameters()).device
        except StopIteration:  # pragma: no cover
            return torch.device("cpu")

    @torch.no_grad()
    def _chunk(self, prompts: list[str]) -> list[float]:
        tok = self.tokenizer
        side = tok.padding_side
        tok.padding_side = "left"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not self.use_chat_template)
        finally:
            tok.padding_side = side
        enc = {k: v.to(self._device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        if self.mode == "yes_no":
            if not self._yes or not self._no:
                return [float("nan")] * len(prompts)
            pos = (enc["attention_mask"].cumsum(-1) - 1).clamp_min(0)
            logits = self.model(**enc, position_ids=pos).logits[:, -1].float()
            p = torch.softmax(logits, -1)
            py, pn = p[:, self._yes].sum(-1), p[:, self._no].sum(-1)
            s = py / (py + pn)
            return [float(v) if math.isfinite(float(v)) else float("nan") for v in s.cpu()]
        out = self.model.generate(
            **enc,
            max_new_tokens=self.max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        return [parse_score(t, self.scale) for t in texts]

    def score_batch(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        items = list(items)
        out: list[float] = []
        for i in range(0, len(items), max(1, self.batch_size)):
            chunk = items[i : i + self.batch_size]
            try:
                prompts = [self._render(q, r, a) for q, r, a in chunk]
                out += self._chunk(prompts)
            except Exception as e:  # noqa: BLE001  (contract: never raise, NaN for what cannot be scored)
                log.warning("HFJudge failed on a batch of %d (%s: %s); scored NaN", len(chunk), type(e).__name__, e)
                out += [float("nan")] * len(chunk)
        return [min(max(v, 0.0), 1.0) if v == v else float("nan") for v in out]
