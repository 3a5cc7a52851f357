"""Images on the wire: a :class:`~fastgen.pipelines.request.SampleResult` as PNG bytes or base64 PNG text."""

from __future__ import annotations

import base64
import io

from ..pipelines.request import SampleResult


def png_bytes(result: SampleResult) -> bytes:
    try:
        from PIL import Image
    except ImportError as exc:
        raise ImportError("serving PNGs needs Pillow: pip install 'fastgen[serve]'") from exc
    arr = result.to_uint8()
    image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def png_base64(result: SampleResult) -> str:
    return base64.b64encode(png_bytes(result)).decode("ascii")
