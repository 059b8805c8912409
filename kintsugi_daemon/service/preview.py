"""The overlay preview that travels over MQTT (`slices/latest/preview`): a small PNG that says which run
and slice it shows in its own text chunks, so a subscriber never has to pair it with another message
(retained messages arrive in no promised order)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Final

from PIL import Image, PngImagePlugin

__all__ = ["PREVIEW_MAX_WIDTH", "preview_identity", "preview_png"]

PREVIEW_MAX_WIDTH: Final = 768  # a phone screen's worth; ~0.3-0.6 MB instead of the full-size overlay
_RUN_KEY: Final = "kintsugi.run_id"
_SLICE_KEY: Final = "kintsugi.slice"


def preview_png(overlay: Path, run_id: str, slice_index: int, max_width: int = PREVIEW_MAX_WIDTH) -> bytes:
    """The overlay at `overlay`, scaled to at most `max_width` pixels wide, with its run and slice."""
    with Image.open(overlay) as image:
        image.load()
        rgb = image.convert("RGB")
    if rgb.width > max_width:
        rgb = rgb.resize((max_width, round(rgb.height * max_width / rgb.width)), Image.Resampling.LANCZOS)
    info = PngImagePlugin.PngInfo()
    info.add_text(_RUN_KEY, run_id)
    info.add_text(_SLICE_KEY, str(slice_index))
    out = io.BytesIO()
    rgb.save(out, format="PNG", pnginfo=info, optimize=False)
    return out.getvalue()


def preview_identity(png: bytes) -> tuple[str, int] | None:
    """(run_id, slice) of a preview made by `preview_png`, or None for anything else."""
    try:
        with Image.open(io.BytesIO(png)) as image:
            text = dict(getattr(image, "text", {}))
    except (OSError, ValueError, Image.DecompressionBombError):
        return None
    run_id, index = text.get(_RUN_KEY), text.get(_SLICE_KEY)
    if not run_id or index is None or not index.isdigit():
        return None
    return run_id, int(index)
