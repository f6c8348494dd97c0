"""Keep secrets out of logged configs: keys come from the environment, never from yaml."""

from __future__ import annotations

import re
from typing import Any

_SECRET = re.compile(r"(api[_-]?key|secret|token|password)$", re.I)


def scrub(obj: Any) -> Any:
    """A copy of a (nested) dict with secret-looking values replaced, for logging only.

    Fields that *name* an environment variable (``*_env``) are kept: they hold no secret.
    """
    if isinstance(obj, dict):
        return {
            k: ("***" if isinstance(k, str) and _SECRET.search(k) and v not in (None, "") else scrub(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [scrub(v) for v in obj]
    return obj
