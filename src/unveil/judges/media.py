"""Images for a judge's request: any image the data layer reads (PNG, JPEG, DICOM, NIfTI, ...)
as a base64 PNG data URL, its longer side shrunk to ``max_side`` (aspect kept; never enlarged).

Encoded once per (file, its mtime and size, max_side): the G completions of a prompt share it.
The digest (SHA-256 of the PNG bytes) keys the judge's cache by image content, not path.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import os

from PIL import Image


@functools.lru_cache(maxsize=512)
def _encode(path: str, mtime_ns: int, size: int, max_side: int) -> tuple[str, str]:
    from unveil.data.images import load_image

    im = load_image(path)
    if max_side and max(im.size) > max_side:
        im = im.copy()
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    raw = buf.getvalue()
    return "data:image/png;base64," + base64.b64encode(raw).decode("ascii"), hashlib.sha256(raw).hexdigest()


def image_data_url(path: str, max_side: int = 512) -> tuple[str, str]:
    """``(data URL, sha256 of the PNG)``; OSError naming the file when it cannot be read."""
    st = os.stat(path)
    return _encode(str(path), st.st_mtime_ns, st.st_size, int(max_side or 0))
