"""STLLaVA-Med stage 2: self-questioning preference data from unlabeled images.

For every distinct image (labels, if any, are ignored):
1. the model describes it (``describe_prompt``, greedy unless ``describe_sample``);
2. it asks itself ``num_questions`` questions: the dialogue so far plus ``question_prompt``,
   sampled ``num_questions`` times (duplicates and empty questions dropped);
3. it answers each question twice (sampled, prompt ``<image>\\n<question>``);
4. a judge scores both answers (``score_pairs``: one request with both answers and the image
   for a pairwise rubric such as ``stllava_preference``, the paper's GPT-4o expert; each answer
   on its own otherwise); the better one becomes chosen. The judge sees the question, the
   images, a reference (``reference=description``: the model's own description, which is all
   there is on unlabeled data; ``none``: empty, for judges that grade without one) and the
   answers. Pairs whose scores differ by no more than ``min_margin`` (ties), identical or empty
   answers, and pairs the judge cannot score (NaN) are skipped and counted. A negative
   ``min_margin`` keeps ties (the first sample is then chosen), for plumbing checks.

Written per split:
- ``<split>.jsonl``: MAU preference records (query = the question, answer = chosen,
  ``rejected.answer`` = the worse answer): ``data=mau_jsonl data.root=<out_dir>`` trains DPO
  on them directly. The prompt is the one the answers were sampled with.
- ``<split>.llava.json``: LLaVA conversations with the self-asked questions as ``vuser``
  turns (describe -> description, then question -> chosen answer, ...), for stage-1 style
  SFT with ``train_on_virtual_user`` (``format=llava``, which maps vuser -> virtual_user).
- ``<split>.stllava_dpo.json``: the same pairs in STLLaVA-Med's DPO format
  (``chosen_conversations`` / ``reject_conversations`` with the ``vuser`` question turn;
  ``format=stllava_dpo``).
Asking is an instruction to the assistant (the reply is taken as the question): chat
templates have no generation prompt for a user turn.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from unveil.curate.common import BaseBuilder, Context, Outcome, clean_text, make_judge, to_canonical
from unveil.data.schema import IMAGE_PLACEHOLDER, Rejected, Sample
from unveil.judges.base import JudgeItem

log = logging.getLogger(__name__)


@dataclass
class _Dialogue:
    key: str
    images: list[str]
    description: str = ""
    turns: list[tuple[str, str, str]] = field(default_factory=list)  # (question, chosen, rejected)


def _norm(t: str) -> str:
    return re.sub(r"\W+", " ", t.lower()).strip()


class SelfTrainingBuilder(BaseBuilder):
    name = "self_training"

    def __init__(
        self,
        num_questions: int = 3,
        judge: dict | None = None,
        reference: str = "description",
        min_margin: float = 0.0,
        describe_prompt: str = "Describe this image in detail.",
        question_prompt: str = "Ask one question about this image that a doctor would ask.",
        describe_sample: bool = False,
        batch_size: int = 8,
        max_new_tokens: int = 48,
        question_max_new_tokens: int = 32,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        max_images: int | None = None,
        write_conversations: bool = True,
    ):
        super().__init__()
        if reference not in ("description", "none"):
            raise ValueError(f"builder.reference must be 'description' or 'none', got {reference!r}")
        self.k, self.judge_cfg, self.reference = int(num_questions), judge, reference
        self.min_margin = float(min_margin)
        self.describe_prompt, self.question_prompt, self.describe_sample = (
            describe_prompt,
            question_prompt,
            bool(describe_sample),
        )
        self.batch_size, self.max_new_tokens, self.q_tokens = (
            int(batch_size),
            int(max_new_tokens),
            int(question_max_new_tokens),
        )
        self.temperature, self.top_p, self.top_k = float(temperature), float(top_p), int(top_k)
        self.max_images = max_images
        self.write_conversations = bool(write_conversations)
        self._judge = None
        self._dialogues: list[_Dialogue] = []

    def judge(self):
        if self._judge is None:
            self._judge = make_judge(self.judge_cfg)
        return self._judge

    # --- generation ------------------------------------------------------------------------
    def _generate(
        self, ctx: Context, samples: list[Sample], n: int, sample: bool, max_new_tokens: int
    ) -> list[list[str]]:
        from unveil.data.collate import PromptCollator
        from unveil.data.frames import answer_frame
        from unveil.models.generation import generate

        bb = ctx.backbone()
        batch = PromptCollator(bb)(samples)
        batch = {k: v.to(ctx.device) if hasattr(v, "to") else v for k, v in batch.items()}
        out = generate(
            bb,
            batch,
            max_new_tokens=max_new_tokens,
            do_sample=sample,
            num_return_sequences=n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
        )
        frames = [answer_frame(bb, s) for s in samples for _ in range(n)]  # back to the original image
        texts = [clean_text(to_canonical(t, bb.box_format, f)) for t, f in zip(out["texts"], frames)]
        return [texts[i * n : (i + 1) * n] for i in range(len(samples))]

    @staticmethod
    def _ph(images: list[str]) -> str:
        return "".join(f"{IMAGE_PLACEHOLDER}\n" for _ in images)

    def _describe_msgs(self, d: _Dialogue) -> list[dict]:
        return [{"role": "user", "content": self._ph(d.images) + self.describe_prompt}]

    def _describe(self, ctx: Context, chunk: list[_Dialogue]) -> None:
        """Step 1: the model's description of each image (greedy unless describe_sample)."""
        desc = self._generate(
            ctx,
            [Sample(id=d.key, images=d.images, messages=self._describe_msgs(d)) for d in chunk],
            1,
            self.describe_sample,
            self.max_new_tokens,
        )
        for d, (t,) in zip(chunk, desc):
            d.description = t

    def _ask_questions(self, ctx: Context, chunk: list[_Dialogue]) -> list[tuple[_Dialogue, str]]:
        """Step 2: ``num_questions`` sampled questions per image, empty and duplicate ones dropped."""
        # the trailing empty assistant turn marks where the prompt ends
        qs = self._generate(
            ctx,
            [
                Sample(
                    id=d.key,
                    images=d.images,
                    messages=[
                        *self._describe_msgs(d),
                        {"role": "assistant", "content": d.description},
                        {"role": "user", "content": self.question_prompt},
                        {"role": "assistant", "content": ""},
                    ],
                )
                for d in chunk
            ],
            self.k,
            True,
            self.q_tokens,
        )
        asks: list[tuple[_Dialogue, str]] = []
        for d, group in zip(chunk, qs):
            seen = set()
            for q in group:
                q = q.replace(IMAGE_PLACEHOLDER, "").strip()
                if not q:
                    self.stats["questions/empty"] += 1
                    continue
                if _norm(q) in seen:
                    self.stats["questions/duplicate"] += 1
                    continue
                seen.add(_norm(q))
                asks.append((d, q))
        self.stats["images"] += len(chunk)
        self.stats["questions"] += len(asks)
        return asks

    def _answer(self, ctx: Context, asks: list[tuple[_Dialogue, str]]) -> list[list[str]]:
        """Step 3: two sampled answers per question."""
        return self._generate(
            ctx,
            [
                Sample(id=d.key, images=d.images, messages=[{"role": "user", "content": self._ph(d.images) + q}])
                for d, q in asks
            ],
            2,
            True,
            self.max_new_tokens,
        )

    def _judge_answers(self, asks: list[tuple[_Dialogue, str]], answers: list[list[str]]) -> Iterator[Outcome]:
        """Step 4: the judge's better answer becomes chosen; unusable pairs are skipped with their reason."""
        ref = lambda d: d.description if self.reference == "description" else ""  # noqa: E731
        pairs = [(JudgeItem(q, ref(d), a, d.images), b) for (d, q), (a, b) in zip(asks, answers)]
        # one request per pair for a pairwise rubric (STLLaVA-Med's preference), else each answer alone
        scores = [s for pair in self.judge().score_pairs(pairs) for s in pair] if pairs else []
        for j, ((d, q), (a, b)) in enumerate(zip(asks, answers)):
            sa, sb = float(scores[2 * j]), float(scores[2 * j + 1])
            if not a or not b:
                yield Outcome(skipped="empty_answer")
            elif _norm(a) == _norm(b):
                yield Outcome(skipped="identical_answers")
            elif not (math.isfinite(sa) and math.isfinite(sb)):
                yield Outcome(skipped="judge_failed")
            elif abs(sa - sb) <= self.min_margin:
                yield Outcome(skipped="tie")
            else:
                (chosen, cs), (rejected, rs) = sorted([(a, sa), (b, sb)], key=lambda x: -x[1])
                d.turns.append((q, chosen, rejected))
                yield Outcome(self._pair(d, q, chosen, rejected, [cs, rs]))

    def _pair(self, d: _Dialogue, q: str, chosen: str, rejected: str, scores: list[float]) -> Sample:
        """The preference record of the dialogue's latest turn (prompt = the one the answers were sampled with)."""
        query = self._ph(d.images) + q
        return Sample(
            id=f"{d.key}-st{len(d.turns) - 1}",
            images=list(d.images),
            messages=[
                {"role": "user", "content": query},
                {"role": "assistant", "content": chosen},
            ],
            task="vqa_open",
            rejected=Rejected(
                messages=[
                    {"role": "user", "content": query},
                    {"role": "assistant", "content": rejected},
                ]
            ),
            meta={
                "curate_builder": self.name,
                "self_description": d.description,
                "curate_scores": scores,
                "source": "self_training",
            },
        )

    def run(self, samples: list[Sample], ctx: Context) -> Iterator[Outcome]:
        import torch

        torch.manual_seed(ctx.seed)
        groups: dict[tuple, list[Sample]] = {}
        for s in samples:
            if s.images:
                groups.setdefault(tuple(s.images), []).append(s)
        dialogues = [_Dialogue(key=g[0].meta.get("study_id") or g[0].id, images=list(k)) for k, g in groups.items()]
        sizes = [len(g) for g in groups.values()]
        no_image = len(samples) - sum(sizes)
        for _ in range(no_image):
            yield Outcome(skipped="no_image")
        ctx.advance(no_image)
        if self.max_images is not None:
            dialogues, sizes = dialogues[: int(self.max_images)], sizes[: int(self.max_images)]
        self._dialogues = dialogues
        for start in range(0, len(dialogues), self.batch_size):
            chunk = dialogues[start : start + self.batch_size]
            self._describe(ctx, chunk)
            asks = self._ask_questions(ctx, chunk)
            if asks:
                yield from self._judge_answers(asks, self._answer(ctx, asks))
            ctx.advance(sum(sizes[start : start + self.batch_size]))

    # --- multi-turn files with virtual-user turns ------------------------------------------
    def finish(self, ctx: Context, written: list[Sample]) -> None:
        if not self.write_conversations:
            return
        conv, dpo = [], []
        for d in self._dialogues:
            if not d.turns:
                continue
            rel = [ctx.images.rel(p) for p in d.images]
            image = rel[0] if len(rel) == 1 else rel
            head = [
                {"from": "human", "value": self._ph(d.images) + self.describe_prompt},
                {"from": "gpt", "value": d.description},
            ]
            turns = list(head)
            for j, (q, chosen, rejected) in enumerate(d.turns):
                turns += [{"from": "vuser", "value": q}, {"from": "gpt", "value": chosen}]
                dpo.append(
                    {
                        "id": f"{d.key}-st{j}",
                        "image": image,
                        "chosen_conversations": [
                            *head,
                            {"from": "vuser", "value": q},
                            {"from": "gpt", "value": chosen},
                        ],
                        "reject_conversations": [
                            *head,
                            {"from": "vuser", "value": q},
                            {"from": "gpt", "value": rejected},
                        ],
                    }
                )
            conv.append({"id": d.key, "image": image, "conversations": turns})
        ctx.write_json(f"{ctx.split}.llava.json", conv)
        ctx.write_json(f"{ctx.split}.stllava_dpo.json", dpo)
        self.stats["conversations"] += len(conv)
