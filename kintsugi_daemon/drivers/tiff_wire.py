"""Images on the wire: named 2-D arrays plus a JSON metadata object in one multi-page TIFF.

Each page carries its channel name in ImageDescription; the first page also carries the metadata, so a
saved response opens in Fiji or tifffile as an ordinary image stack.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import tifffile

__all__ = ["TIFF_MEDIA_TYPE", "decode_channels", "encode_channels"]

TIFF_MEDIA_TYPE = "image/tiff"


def encode_channels(channels: dict[str, np.ndarray], metadata: dict[str, Any]) -> bytes:
    if not channels:
        raise ValueError("no channels to encode")
    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tif:
        for i, (name, array) in enumerate(channels.items()):
            if array.ndim != 2:
                raise ValueError(f"channel {name!r} must be 2-D, got shape {array.shape}")
            desc: dict[str, Any] = {"channel": name}
            if i == 0:
                desc["metadata"] = metadata
            tif.write(np.ascontiguousarray(array), description=json.dumps(desc), metadata=None)
    return buf.getvalue()


def decode_channels(data: bytes) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Inverse of `encode_channels`; anything malformed raises ValueError (or a subclass)."""
    channels: dict[str, np.ndarray] = {}
    metadata: dict[str, Any] = {}
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        for page in tif.pages:
            if not isinstance(page, tifffile.TiffPage):
                raise ValueError("unexpected TIFF frame without its own description")
            desc = json.loads(page.description)
            if not isinstance(desc, dict) or "channel" not in desc:
                raise ValueError("TIFF page description is not a channel description")
            channels[str(desc["channel"])] = page.asarray()
            if "metadata" in desc:
                if not isinstance(desc["metadata"], dict):
                    raise ValueError("TIFF metadata is not a JSON object")
                metadata = desc["metadata"]
    if not channels:
        raise ValueError("TIFF without channels")
    return channels, metadata
