"""MMedPO's full recipe in one pass: text pairs + visual pairs, then clinical-relevance weights.

Every input sample gives a text pair (``-txt``: reference vs hallucination) and, when it has a
lesion region, a visual pair (``-vis``: reference on the real image vs the same text on the
noised image); then each pair is weighted (text: judges' agreement; visual: the scorer).
The same as running ``builder=hallucination``, ``builder=lesion_noise`` and
``builder=relevance_weights`` one after the other and concatenating, in one directory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from unveil.curate.common import BaseBuilder, Context, Outcome
from unveil.data.schema import Sample


class MMedPOBuilder(BaseBuilder):
    name = "mmedpo"

    def __init__(
        self, text: BaseBuilder | None = None, visual: BaseBuilder | None = None, weights: BaseBuilder | None = None
    ):
        super().__init__()
        if text is None and visual is None:
            raise ValueError("builder=mmedpo needs a text and/or a visual builder")
        self.text, self.visual, self.weights = text, visual, weights

    def run(self, samples: list[Sample], ctx: Context) -> Iterator[Outcome]:
        quiet = dataclasses.replace(ctx, advance=lambda n: None)
        pairs: list[Sample] = []
        for part in (self.text, self.visual):
            if part is None:
                continue
            part.stats.clear()
            for oc in part.run(samples, quiet):
                if oc.sample is None:
                    self.stats[f"{part.name}/skipped_{oc.skipped}"] += 1
                else:
                    pairs.append(oc.sample)
            self.stats.update({f"{part.name}/{k}": v for k, v in part.stats.items()})
            if quiet._backbone is not None:  # built once, kept for the next split
                ctx._backbone, ctx.device = quiet._backbone, quiet.device
        ctx.advance(len(samples))
        if self.weights is None:
            yield from (Outcome(p) for p in pairs)
            return
        self.weights.stats.clear()
        yield from self.weights.run(pairs, quiet)
        self.stats.update({f"{self.weights.name}/{k}": v for k, v in self.weights.stats.items()})
