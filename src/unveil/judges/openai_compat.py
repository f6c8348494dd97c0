"""A judge behind an OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, llama.cpp, ...).

``judge: {kind: openai, model: gpt-4o-mini, base_url: https://api.openai.com/v1,
api_key_env: OPENAI_API_KEY}``. The key is read from the environment variable *named* by
``api_key_env`` at request time; it is never a constructor argument, never stored on the
object and never part of :meth:`OpenAIJudge.config` or ``repr``. With the variable unset no
``Authorization`` header is sent (local servers need none; hosted ones answer 401 -> NaN).

The judge asks for a 0-10 rating and reads the first number of the reply (``"8"``,
``"Score: 7.5"``, ``"8/10"``, ``"80/100"`` as a fraction), divided by 10. Network errors,
timeouts, 429 and 5xx are retried ``retries`` times with exponential backoff; anything that
still fails, and any reply without a usable number, gives NaN. ``score_batch`` never raises.
Standard library only (urllib). :func:`post_chat` (the request, retries, refused redirects) and
:func:`auth_headers` are shared with the MAU data builder (``unveil.curate.mau``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from unveil.judges.base import Judge

log = logging.getLogger(__name__)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """urllib re-sends every header, the Authorization one too, to wherever a redirect points: an
    API endpoint has no reason to redirect a POST, so none is followed (the request fails, the
    head scores NaN)."""

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


SYSTEM_PROMPT = "You are a careful radiologist who grades answers. Reply with a number only."
USER_PROMPT = (
    "Question: {question}\nReference answer: {reference}\nAnswer to grade: {answer}\n"
    "How well does the answer agree with the reference (finding, location, diagnosis)? "
    "Reply with one number from 0 (wrong) to 10 (fully correct)."
)
_FRACTION = re.compile(r"(?<![\d.])(\d{1,4}(?:\.\d+)?)\s*(?:/|out of)\s*(\d{1,4}(?:\.\d+)?)")
_NUMBER = re.compile(r"(?<![\d.])(\d{1,4}(?:\.\d+)?)")


def parse_score(text: str, scale: float = 10.0) -> float:
    """A judge reply -> score in [0, 1]; NaN when it holds no number in range."""
    if not isinstance(text, str):
        return float("nan")
    m = _FRACTION.search(text)
    if m:
        num, den = float(m.group(1)), float(m.group(2))
        return num / den if den > 0 and 0 <= num <= den else float("nan")
    m = _NUMBER.search(text)
    if not m:
        return float("nan")
    v = float(m.group(1))
    return v / scale if 0.0 <= v <= scale else float("nan")


class OpenAIJudge(Judge):
    name = "openai"

    def __init__(
        self,
        model: str,
        base_url: str = "https://api.openai.com/v1",
        api_key_env: str = "OPENAI_API_KEY",
        timeout: float = 30.0,
        retries: int = 2,
        backoff: float = 1.0,
        temperature: float = 0.0,
        max_tokens: int = 16,
        system_prompt: str = SYSTEM_PROMPT,
        prompt: str = USER_PROMPT,
        scale: float = 10.0,
        max_workers: int = 4,
        max_chars: int = 4000,
        extra_body: dict | None = None,
    ):
        if not model:
            raise ValueError("OpenAIJudge needs `model` (the endpoint's model name)")
        check_key_env(api_key_env, "OpenAIJudge")
        self.model, self.base_url, self.api_key_env = str(model), str(base_url).rstrip("/"), api_key_env
        self.timeout, self.retries, self.backoff = float(timeout), int(retries), float(backoff)
        self.temperature, self.max_tokens = float(temperature), int(max_tokens)
        self.system_prompt, self.prompt, self.scale = system_prompt, prompt, float(scale)
        self.max_workers, self.max_chars = max(1, int(max_workers)), int(max_chars)
        self.extra_body = dict(extra_body or {})
        self._warned = False

    # --- what may be logged ----------------------------------------------------------------
    def config(self) -> dict:
        """Settings for logs and summaries: the variable's name, never its value."""
        return {
            "kind": "openai",
            "model": self.model,
            "base_url": self.base_url,
            "api_key_env": self.api_key_env,
            "timeout": self.timeout,
            "retries": self.retries,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "scale": self.scale,
        }

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r}, api_key_env={self.api_key_env!r})"

    # --- one request -----------------------------------------------------------------------
    def _headers(self) -> dict:
        h = auth_headers(self.api_key_env)
        if "Authorization" not in h and not self._warned:
            self._warned = True
            log.warning(
                "OpenAIJudge: environment variable %s is unset; sending no Authorization header", self.api_key_env
            )
        return h

    def _body(self, question: str, reference: str, answer: str) -> bytes:

        def cut(t) -> str:
            return str(t)[: self.max_chars]

        msgs = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append(
            {
                "role": "user",
                "content": self.prompt.format(question=cut(question), reference=cut(reference), answer=cut(answer)),
            }
        )
        body = {
            "model": self.model,
            "messages": msgs,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            **self.extra_body,
        }
        return json.dumps(body).encode()

    def complete(self, question: str, reference: str, answer: str) -> str | None:
        """The endpoint's reply text, or None after the retries are spent."""
        url = f"{self.base_url}/chat/completions"
        reply, _ = post_chat(
            url,
            self._body(question, reference, answer),
            self._headers(),
            self.timeout,
            self.retries,
            self.backoff,
            who="OpenAIJudge",
        )
        return reply

    def _score_one(self, item) -> float:
        try:
            q, ref, ans = item
            reply = self.complete(q, ref, ans)
            s = parse_score(reply, self.scale) if reply is not None else float("nan")
            return float(min(max(s, 0.0), 1.0)) if math.isfinite(s) else float("nan")
        except Exception:
            return float("nan")

    def score_batch(self, items: Sequence[tuple[str, str, str]]) -> list[float]:
        items = list(items)
        if len(items) <= 1 or self.max_workers == 1:
            return [self._score_one(it) for it in items]
        with ThreadPoolExecutor(max_workers=min(self.max_workers, len(items))) as pool:
            return list(pool.map(self._score_one, items))
