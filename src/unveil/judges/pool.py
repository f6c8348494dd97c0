"""Judgements on their way: requests run on a thread pool; the caller collects them by a deadline.

``Pending.result()`` waits until the batch's deadline (set when the requests were submitted),
then gives the scores that are back and NaN for the rest (their requests are cancelled if not
yet started; one already on the wire ends by its own ``timeout_s``, its answer unused). Each row
that ends NaN is counted in ``failures`` by reason (``timeout``, ``http``, ``network``,
``reply``, ``unparsable``, ``image``), so a caller can log and count it instead of stalling.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections import Counter

NAN = float("nan")


class Pending:
    def __init__(self, scores: list, keys: list, futures: dict, deadline: float, failures=None, on_done=None):
        self._scores, self._keys, self._futures, self._on_done = list(scores), list(keys), dict(futures), on_done
        self.deadline = float(deadline)
        self.failures: Counter = Counter(failures or {})
        self._done = False

    def result(self) -> list[float]:
        if self._done:
            return self._scores
        waiting = [f for f in self._futures.values()]
        if waiting:
            cf.wait(waiting, timeout=max(0.0, self.deadline - time.monotonic()))
        got: dict = {}
        for key, fut in self._futures.items():
            if fut.done() and not fut.cancelled():
                try:
                    got[key] = fut.result(timeout=0)
                except Exception:  # noqa: BLE001  (a worker that raised: that row fails, the batch goes on)
                    got[key] = (NAN, "error")
            else:
                fut.cancel()
                got[key] = (NAN, "timeout")
        for i, key in enumerate(self._keys):
            if key in got:
                score, reason = got[key]
                self._scores[i] = score
                if reason:
                    self.failures[reason] += 1
        self._done = True
        if self._on_done is not None:
            self._on_done(self.failures)
        return self._scores
