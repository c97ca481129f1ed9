"""Cheap checks on encoded image bytes, before a decoder that cannot skip a bad sample sees them.

DALI's decoders fail the WHOLE pipeline on one undecodable sample ("Current pipeline
object is no longer valid"), so the DALI backend screens each file's bytes first. The
checks read only the first and last bytes, so they cost microseconds, and they catch
what ImageNet-scale folders really contain: non-image files, and JPEG or PNG files cut
short by an interrupted copy (a truncated JPEG lacks its end-of-image marker and makes
libjpeg-turbo stop with "Premature end of JPEG data"). Corruption inside an otherwise
whole file decodes to wrong pixels, which is harmless for training.
"""

from __future__ import annotations

# Magic numbers of the formats DALI (nvImageCodec) and PIL both decode.
_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)
_JPEG_END = b"\xff\xd9"
_PNG_END = b"IEND"
MIN_BYTES = 32


def image_format(head: bytes) -> str | None:
    """'jpeg', 'png', 'bmp', 'tiff', 'webp', or None when the bytes are no image we decode."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    for magic, name in _SIGNATURES:
        if head.startswith(magic):
            return name
    return None


def problem(data: bytes | memoryview) -> str | None:
    """Why these encoded bytes would not decode (a short reason), or None if they look whole.

    The reason strings are written to logs and converter reports, so they name the fix.
    """
    head, tail, size = bytes(data[:16]), bytes(data[-64:]), len(data)
    if size < MIN_BYTES:
        return f"only {size} bytes: empty or cut short"
    fmt = image_format(head)
    if fmt is None:
        return "not an image (unknown file signature): remove it from the data folder"
    # FF D9 cannot occur inside entropy-coded data (0xFF is stuffed as FF 00), so finding
    # it among the last bytes (writers may pad after it) means the stream reached its end.
    if fmt == "jpeg" and _JPEG_END not in tail:
        return "truncated JPEG (no end-of-image marker): re-copy or re-download the file"
    if fmt == "png" and _PNG_END not in tail:
        return "truncated PNG (no IEND chunk): re-copy or re-download the file"
    return None
