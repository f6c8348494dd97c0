"""A local vision-language model as judge: it sees the sample's images with the rubric's text.

``judge: {_target_: unveil.judges.hf_vlm.HFVLMJudge, _recursive_: false, rubric: umed_relevance,
model: {<a model config>}}`` where ``model`` is what the ``model`` config group holds
(``conf/model/*.yaml``), e.g. ``{_target_: unveil.models.factory.hf, name_or_path:
Qwen/Qwen2-VL-7B-Instruct, box_format: qwen2vl, dtype: bfloat16}`` (``_recursive_: false``: Hydra
passes the model config on as a config instead of calling its builder), or a tiny model built
in code (tests). It is built by the same factory as the policy, so every backbone the project
supports (LLaVA, Qwen2-VL, Idefics3, ...) can judge, with its own processor and chat
template; images go through the same collator as in training.

Loaded once per process: backbones are kept in a module-level cache keyed by the model config
(and device), so the relevance head, the validation loop and a curation builder that ask for
the same judge share one copy. On several GPUs each rank process still holds one copy; to share
one model between ranks and nodes, serve it (``vllm serve <model>``) and use the OpenAI-compatible
judge instead.

Modes: ``score`` generates greedily (``max_new_tokens``) and reads the reply with the rubric's
parser (NaN when it holds no usable number); ``yes_no`` reads ``p(Yes) / (p(Yes) + p(No))`` from
the first generated token's distribution (single rubrics only; the rubric's text is followed by
``yes_no_suffix``). ``score_batch`` never raises: a failing chunk scores NaN.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Sequence

import torch

from unveil.judges.base import Judge, JudgeItem, as_item
from unveil.judges.rubrics import load_rubric

log = logging.getLogger(__name__)

_BACKBONES: dict[str, object] = {}
_LOCK = threading.Lock()
_BASE_CORPUS = ["Yes No yes no Score: 0 1 2 3 4 5 6 7 8 9 10 /10", "USER: ASSISTANT: </s>"]


def load_backbone(model_cfg: dict, corpus: Sequence[str] = (), device: str | None = None, cache_dir=None):
    """The judge's backbone, built once per process per (model config, device)."""
    from omegaconf import OmegaConf

    from unveil.models.factory import build_backbone

    cfg = (
        OmegaConf.to_container(model_cfg, resolve=True)
        if hasattr(model_cfg, "items") and not isinstance(model_cfg, dict)
        else dict(model_cfg)
    )
    cfg.setdefault("box_format", "int100")
    key = json.dumps({"model": cfg, "device": device}, sort_keys=True, default=str)
    with _LOCK:
        bb = _BACKBONES.get(key)
        if bb is None:
            bb = build_backbone(OmegaConf.create(cfg), corpus=[*_BASE_CORPUS, *corpus] * 8, cache_dir=cache_dir)
            bb.model.eval()
            if device:
                bb.model.to(device)
            _BACKBONES[key] = bb
            log.info("judge backbone %s loaded (once per process)", bb.name)
        return bb


class HFVLMJudge(Judge):
    name = "hf_vlm"
    sees_images = True

    def __init__(
        self,
        model: dict | None = None,
        backbone=None,
        rubric="umed_relevance",
        mode: str = "score",
        images: bool | None = None,
        max_new_tokens: int = 16,
        batch_size: int = 4,
        max_chars: int = 2000,
        yes_no_suffix: str = "Answer Yes or No.",
        device: str | None = None,
        cache_dir: str | None = None,
    ):
        if mode not in ("score", "yes_no"):
            raise ValueError(f"HFVLMJudge.mode must be score or yes_no, got {mode!r}")
        self.rubric = load_rubric(rubric)
        if mode == "yes_no" and self.rubric.mode != "single":
            raise ValueError(f"HFVLMJudge: yes_no mode needs a single-answer rubric, {self.rubric.name!r} is a pair")
        if backbone is None:
            if not model:
                raise ValueError("HFVLMJudge needs `model` (a model config, as in conf/model/) or a `backbone`")
            backbone = load_backbone(model, corpus=[self.rubric.template], device=device, cache_dir=cache_dir)
        self.bb, self.mode = backbone, mode
        self.images = self.rubric.images if images is None else bool(images)
        self.max_new_tokens, self.batch_size, self.max_chars = int(max_new_tokens), int(batch_size), int(max_chars)
        self.yes_no_suffix = yes_no_suffix
        self._yes, self._no = self._first_ids(("Yes", " Yes", "yes")), self._first_ids(("No", " No", "no"))

    def _first_ids(self, words) -> list[int]:
        tok, ids = self.bb.tokenizer, set()
        for w in words:
            t = tok(w, add_special_tokens=False)["input_ids"]
            if t and t[0] != tok.unk_token_id:
                ids.add(int(t[0]))
        return sorted(ids)

    def _sample(self, item: JudgeItem, other: str | None):
        from unveil.data.schema import IMAGE_PLACEHOLDER, Sample

        cut = lambda t: str(t if t is not None else "")[: self.max_chars]  # noqa: E731
        answers = (item[2],) if other is None else (item[2], other)
        text = self.rubric.render(cut(item[0]), cut(item[1]), *map(cut, answers))
        if self.mode == "yes_no":
            text = f"{text}\n{self.yes_no_suffix}"
        images = list(item.images) if self.images else []
        msgs = [{"role": "system", "content": self.rubric.system}] if self.rubric.system else []
        msgs.append({"role": "user", "content": "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images) + text})
        return Sample(id="judge", images=images, messages=msgs)

    @torch.no_grad()
    def _chunk(self, samples) -> list:
        from unveil.data.collate import PromptCollator
        from unveil.models.generation import generate
        from unveil.models.inputs import model_inputs

        batch = PromptCollator(self.bb)(samples)
        dev = next(self.bb.model.parameters()).device
        batch = {k: v.to(dev) if hasattr(v, "to") else v for k, v in batch.items()}
        if self.mode == "score":
            return generate(self.bb, batch, max_new_tokens=self.max_new_tokens, do_sample=False)["texts"]
        tok = self.bb.tokenizer
        out = self.bb.model.generate(
            **model_inputs(batch),
            max_new_tokens=1,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            pad_token_id=tok.pad_token_id,
        )
        p = torch.softmax(out.scores[0].float(), -1)
        py, pn = p[:, self._yes].sum(-1), p[:, self._no].sum(-1)
        return [float(v) if math.isfinite(float(v)) else float("nan") for v in (py / (py + pn)).cpu()]

    def _run(self, requests: list) -> list:
        pair = self.rubric.mode == "pair"
        out: list = []
        for i in range(0, len(requests), max(1, self.batch_size)):
            chunk = requests[i : i + self.batch_size]
            try:
                got = self._chunk([self._sample(as_item(it), other) for it, other in chunk])
                if self.mode == "score":
                    got = [self.rubric.parse_pair(t) if pair else self.rubric.parse(t) for t in got]
                out += got
            except Exception as e:  # noqa: BLE001  (contract: never raise, NaN for what cannot be scored)
                log.warning("HFVLMJudge failed on %d item(s) (%s: %s); scored NaN", len(chunk), type(e).__name__, e)
                out += [(float("nan"), float("nan")) if pair else float("nan")] * len(chunk)
        return out

    def score_batch(self, items: Sequence[tuple]) -> list[float]:
        if self.rubric.mode != "single":
            raise ValueError(f"rubric {self.rubric.name!r} compares two answers: use score_pairs")
        return [min(max(v, 0.0), 1.0) if v == v else float("nan") for v in self._run([(it, None) for it in items])]

    def score_pairs(self, pairs: Sequence[tuple[JudgeItem, str]]) -> list[tuple[float, float]]:
        if self.rubric.mode == "pair":
            return [tuple(v) for v in self._run([(as_item(it), other) for it, other in pairs])]
        return super().score_pairs(pairs)
