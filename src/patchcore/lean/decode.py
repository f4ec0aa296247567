"""Decoding image bytes: moved to :mod:`patchcore.lean.pixels` (one decoder for files and bytes).

Kept as an alias while the service and the Ray batch still import it from here.
"""

from patchcore.lean.pixels import IMAGE_FORMATS, ImageTooLargeError, decode_bytes

__all__ = ["IMAGE_FORMATS", "ImageTooLargeError", "decode_bytes"]
