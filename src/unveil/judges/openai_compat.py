"""A judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...).

``judge: {_target_: unveil.judges.openai_compat.OpenAIJudge, model: gpt-4o, rubric: umed_relevance,
base_url: https://api.openai.com/v1, api_key_env: OPENAI_API_KEY}``.

What it sends: the rubric's system and user text (:mod:`unveil.judges.rubrics`) and, when the
rubric says ``images: true``, the sample's images as base64 PNG data URLs, longer side shrunk to
``max_image_side`` (:mod:`unveil.judges.media`). A ``pair`` rubric (STLLaVA-Med's preference)
sends both answers in one request and reads two scores.

Security: the key is read from the environment variable *named* by ``api_key_env`` at request
time; it is never a constructor argument, never stored on the object and never part of
:meth:`OpenAIJudge.config` or ``repr``. With the variable unset no ``Authorization`` header is
sent (local servers need none; hosted ones answer 401 -> NaN). No redirect is followed.

Off the critical path: requests run on a persistent pool of ``max_workers`` threads; each attempt
times out after ``timeout_s``; network errors, 429 and 5xx are retried ``retries`` times with
exponential backoff, never past the batch's deadline, ``deadline_s`` after submission. Whatever
is not back by then scores NaN and is counted (``Pending.failures``); ``score_batch`` never
raises and never waits past the deadline. ``submit`` starts the requests and returns at once.

Cache: by content (SHA-256 of the model, the rubric, the texts and the PNG bytes of each image),
up to ``cache_size`` entries per process; a repeated item (the same completion sampled twice, a
second epoch) sends no request. Failures are not cached. Standard library only (urllib).
:func:`post_chat` (a request with retries and refused redirects) and :func:`auth_headers` are
shared with the MAU data builder (``unveil.curate.mau``).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import logging
import math
import os
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence

from unveil.judges.base import Judge, JudgeItem, as_item
from unveil.judges.media import image_data_url
from unveil.judges.pool import NAN, Pending
from unveil.judges.rubrics import load_rubric, parse_score  # noqa: F401  (parse_score: re-exported)

log = logging.getLogger(__name__)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib re-sends every header, the Authorization one too, to wherever a redirect points: an
    API endpoint has no reason to redirect a POST, so none is followed (the request fails, the
    item scores NaN)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        where = urllib.parse.urlsplit(newurl).netloc or newurl
        raise urllib.error.HTTPError(req.full_url, code, f"redirect to {where} refused", headers, fp)


_OPENER = urllib.request.build_opener(_NoRedirect)
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


def check_key_env(api_key_env, who: str) -> str:
    """The NAME of the environment variable holding the key; a literal key is refused without echoing it
    (it would end up in logged configs)."""
    if not isinstance(api_key_env, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", api_key_env or ""):
        raise ValueError(
            f"{who}.api_key_env must be the NAME of an environment variable holding the key "
            "(e.g. OPENAI_API_KEY), not the key itself"
        )
    return api_key_env


def auth_headers(api_key_env: str) -> dict:
    """JSON headers, with ``Authorization: Bearer <key>`` when the named variable is set (read now)."""
    h = {"Content-Type": "application/json", "Accept": "application/json"}
    key = os.environ.get(api_key_env)
    if key:
        h["Authorization"] = f"Bearer {key}"
    return h


def _error_kind(e: BaseException) -> str:
    if isinstance(e, TimeoutError) or isinstance(getattr(e, "reason", None), TimeoutError):
        return "timeout"
    return "network"


def post_chat(
    url: str,
    data: bytes,
    headers: dict,
    timeout: float,
    retries: int,
    backoff: float,
    who: str = "endpoint",
    allow: Callable[[], bool] | None = None,
) -> tuple[str | None, str | None]:
    """POST a chat-completions body; (reply text, None), or (None, why) after the retries are spent.

    ``why``: ``http_<status>``, ``timeout``, ``network``, ``bad_reply`` (not the expected JSON) or
    ``budget_exhausted`` (``allow()`` said no before an attempt). Network errors, timeouts, 429 and
    5xx are retried with exponential back-off (``backoff * 2**attempt`` seconds); other statuses are
    not. Redirects are refused (see ``_NoRedirect``). Never raises.
    """
    why = "network"
    for attempt in range(retries + 1):
        if allow is not None and not allow():
            return None, "budget_exhausted"
        retry = False
        try:
            req = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with _OPENER.open(req, timeout=timeout) as resp:
                payload = json.loads(resp.read().decode("utf-8", errors="replace"))
            content = payload["choices"][0]["message"]["content"]
            return (content if isinstance(content, str) else json.dumps(content)), None
        except urllib.error.HTTPError as e:
            retry, why = e.code in _RETRY_STATUS, f"http_{e.code}"
            log.warning("%s: HTTP %s from %s (attempt %d/%d)", who, e.code, url, attempt + 1, retries + 1)
        except (urllib.error.URLError, TimeoutError, OSError) as e:
            retry, why = True, _error_kind(e)
            log.warning("%s: %s from %s (attempt %d/%d)", who, type(e).__name__, url, attempt + 1, retries + 1)
        except (ValueError, KeyError, IndexError, TypeError) as e:  # not the JSON shape we expect
            why = "bad_reply"
            log.warning("%s: unexpected reply from %s: %s", who, url, type(e).__name__)
        except Exception as e:  # never raise into a training or curation loop
            why = "network"
            log.warning("%s: %s from %s", who, type(e).__name__, url)
        if not retry or attempt == retries:
            return None, why
        time.sleep(backoff * (2**attempt))
    return None, why


class _Failed(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class OpenAIJudge(Judge):
    name = "openai"
    sees_images = True

    def __init__(
        self,
        model: str,
        rubric="umed_relevance",
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str = "OPENAI_API_KEY",
        images: bool | None = None,
        max_image_side: int = 512,
        timeout_s: float = 30.0,
        deadline_s: float = 120.0,
        retries: int = 2,
        backoff: float = 1.0,
        temperature: float | None = None,
        max_tokens: int | None = None,
        max_workers: int = 8,
        max_chars: int = 4000,
        cache_size: int = 4096,
        extra_body: dict | None = None,
    ):
        if not model:
            raise ValueError("OpenAIJudge needs `model` (the endpoint's model name)")
        check_key_env(api_key_env, "OpenAIJudge")
        self.rubric = load_rubric(rubric)
        self.model, self.base_url, self.api_key_env = str(model), str(base_url).rstrip("/"), api_key_env
        self.images = self.rubric.images if images is None else bool(images)
        self.max_image_side = int(max_image_side)
        self.timeout_s, self.deadline_s = float(timeout_s), float(deadline_s)
        self.retries, self.backoff = int(retries), float(backoff)
        self.temperature = float(self.rubric.temperature if temperature is None else temperature)
        self.max_tokens = int(self.rubric.max_tokens if max_tokens is None else max_tokens)
        self.max_workers, self.max_chars = max(1, int(max_workers)), int(max_chars)
        self.cache_size, self.extra_body = int(cache_size), dict(extra_body or {})
        self.totals: Counter = Counter()  # requests, cache hits and failures by reason, over the process
        self._warned = False
        self._setup()

    def _setup(self) -> None:
        self._lock = threading.Lock()
        self._cache: OrderedDict = OrderedDict()
        self._pool: cf.ThreadPoolExecutor | None = None

    def __getstate__(self):  # threads, locks and the cache stay in this process
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_cache", "_pool")}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._setup()

    # --- what may be logged ----------------------------------------------------------------
    def config(self) -> dict:
        """Settings for logs and summaries: the variable's name, never its value."""
        return {
            "_target_": f"{type(self).__module__}.{type(self).__name__}",
            "model": self.model,
            "rubric": self.rubric.name,
            "base_url": self.base_url,
            "api_key_env": self.api_key_env,
            "images": self.images,
            "max_image_side": self.max_image_side,
            "timeout_s": self.timeout_s,
            "deadline_s": self.deadline_s,
            "retries": self.retries,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
        }

    def __repr__(self) -> str:
        return (
            f"OpenAIJudge(model={self.model!r}, rubric={self.rubric.name!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    # --- one request -----------------------------------------------------------------------
    def _headers(self) -> dict:
        h = auth_headers(self.api_key_env)
        if "Authorization" not in h and not self._warned:
            self._warned = True
            log.warning(
                "OpenAIJudge: environment variable %s is unset; sending no Authorization header", self.api_key_env
            )
        return h

    def _text(self, item: JudgeItem, other: str | None) -> str:
        cut = lambda t: str(t if t is not None else "")[: self.max_chars]  # noqa: E731
        answers = (item[2],) if other is None else (item[2], other)
        return self.rubric.render(cut(item[0]), cut(item[1]), *map(cut, answers))

    def _request(self, item: JudgeItem, other: str | None) -> tuple[bytes, str]:
        """The request body and its cache key (content hash: model, rubric, texts, image bytes)."""
        text = self._text(item, other)
        urls, digests = [], []
        for p in item.images if self.images else ():
            url, digest = image_data_url(p, self.max_image_side)
            urls.append(url)
            digests.append(digest)
        content = (
            text
            if not urls
            else [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]
        )
        msgs = ([{"role": "system", "content": self.rubric.system}] if self.rubric.system else []) + [
            {"role": "user", "content": content}
        ]
        body = {
            "model": self.model,
            "messages": msgs,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        key = json.dumps([self.model, self.rubric.config(), self.rubric.system, text, digests, self.extra_body])
        return json.dumps(body).encode(), hashlib.sha256(key.encode()).hexdigest()

    def _post(self, data: bytes, deadline: float) -> str:
        """The endpoint's reply text; _Failed(reason) after the retries, or at the deadline."""
        url = f"{self.base_url}/chat/completions"
        reason = "network"
        for attempt in range(self.retries + 1):
            left = deadline - time.monotonic()
            if left <= 0:
                raise _Failed("timeout")
            retry = False
            try:
                req = urllib.request.Request(url, data=data, headers=self._headers(), method="POST")
                with _OPENER.open(req, timeout=min(self.timeout_s, left)) as resp:
                    payload = json.loads(resp.read().decode("utf-8", errors="replace"))
                content = payload["choices"][0]["message"]["content"]
                return content if isinstance(content, str) else json.dumps(content)
            except urllib.error.HTTPError as e:
                retry, reason = e.code in _RETRY_STATUS, "http"
                log.warning("OpenAIJudge: HTTP %s from %s (attempt %d/%d)", e.code, url, attempt + 1, self.retries + 1)
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                retry, reason = True, "timeout" if "timed out" in str(e) else "network"
                log.warning(
                    "OpenAIJudge: %s from %s (attempt %d/%d)", type(e).__name__, url, attempt + 1, self.retries + 1
                )
            except (ValueError, KeyError, IndexError, TypeError) as e:  # not the JSON shape we expect
                reason = "reply"
                log.warning("OpenAIJudge: unexpected reply from %s: %s", url, type(e).__name__)
            if not retry or attempt == self.retries:
                break
            time.sleep(min(self.backoff * (2**attempt), max(0.0, deadline - time.monotonic())))
        raise _Failed(reason)

    def complete(self, question: str, reference: str, answer: str, images: Sequence[str] = ()) -> str | None:
        """The endpoint's reply text for one single-answer item, or None when it failed."""
        try:
            data, _ = self._request(JudgeItem(question, reference, answer, images), None)
            return self._post(data, time.monotonic() + self.deadline_s)
        except Exception:  # noqa: BLE001
            return None

    # --- batches ---------------------------------------------------------------------------
    def _run(self, data: bytes, key: str, pair: bool, deadline: float):
        """Worker: one request -> ((score | (s1, s2)), failure reason or None); caches successes."""
        try:
            reply = self._post(data, deadline)
        except _Failed as e:
            return ((NAN, NAN) if pair else NAN), e.reason
        except Exception:  # noqa: BLE001  (never raise into a training or curation loop)
            return ((NAN, NAN) if pair else NAN), "error"
        score = self.rubric.parse_pair(reply) if pair else self.rubric.parse(reply)
        ok = all(math.isfinite(v) for v in (score if pair else (score,)))
        if ok:
            with self._lock:
                self._cache[key] = score
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return score, (None if ok else "unparsable")

    def _submit(self, requests: list, pair: bool) -> Pending:
        deadline = time.monotonic() + self.deadline_s
        empty = (NAN, NAN) if pair else NAN
        scores, keys, futures, failures = [], [], {}, Counter()
        for item, other in requests:
            try:
                data, key = self._request(as_item(item), other)
            except Exception as e:  # noqa: BLE001  (an unreadable image fails that row only)
                log.warning("OpenAIJudge: cannot build the request (%s: %s); scored NaN", type(e).__name__, e)
                scores.append(empty), keys.append(None)
                failures["image"] += 1
                continue
            with self._lock:
                hit = self._cache.get(key)
                if hit is not None:
                    self._cache.move_to_end(key)
            keys.append(key)
            scores.append(hit if hit is not None else empty)
            if hit is None and key not in futures:
                if self._pool is None:
                    self._pool = cf.ThreadPoolExecutor(self.max_workers, thread_name_prefix="judge")
                futures[key] = self._pool.submit(self._run, data, key, pair, deadline)
            self.totals["cache_hits" if hit is not None else "rows_sent"] += 1
        self.totals["requests"] += len(futures)
        return Pending(scores, keys, futures, deadline, failures, on_done=self._record)

    def submit(self, items: Sequence[tuple]) -> Pending:
        """Start the requests now (cache hits need none); ``.result()`` collects them by the deadline."""
        if self.rubric.mode != "single":
            raise ValueError(f"rubric {self.rubric.name!r} compares two answers: use score_pairs")
        return self._submit([(it, None) for it in items], pair=False)

    def submit_pairs(self, pairs: Sequence[tuple[JudgeItem, str]]) -> Pending:
        if self.rubric.mode == "pair":
            return self._submit([(as_item(it), other) for it, other in pairs], pair=True)
        flat = []
        for it, other in pairs:  # a single-answer rubric: each answer on its own
            it = as_item(it)
            flat += [(it, None), (JudgeItem(it[0], it[1], other, it.images), None)]
        return self._submit(flat, pair=False)

    def _record(self, failures: Counter) -> None:
        """Called once per batch when it is collected: failures counted over the process, and logged."""
        self.totals.update(failures)
        if failures:
            log.warning("OpenAIJudge: %d row(s) scored NaN (%s)", sum(failures.values()), dict(failures))

    def score_batch(self, items: Sequence[tuple]) -> list[float]:
        return [float(v) for v in self.submit(items).result()]

    def score_pairs(self, pairs: Sequence[tuple[JudgeItem, str]]) -> list[tuple[float, float]]:
        out = self.submit_pairs(pairs).result()
        if self.rubric.mode == "pair":
            return [tuple(map(float, v)) for v in out]
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(pairs))]
