"""Decoding for the runtime and the torch path (issue #25): NaN pixels refused, one limits object,
limits from the header before decoding, symbolic link loops named, and a fuzz pass.

The fuzz pass mutates the bytes of real images (a casting crop in every accepted format, and in
formats Pillow knows but the readers refuse: DDS, ICO, TGA, ... plus the damaged DDS that once
stopped the runtime) with hypothesis (flips, overwrites, insertions, deletions, truncations,
repeated chunks), always under a ``.png`` name, and feeds each result to the file reader, the
bytes decoder and the runtime's whole route (``ExportedModel.inspect`` on the synthetic export):
every outcome must be an array / a record, or an ``ImageReadError`` / an error record, never
another exception, and never take longer than :data:`CASE_SECONDS` (a SIGALRM stops a hang).
``PATCHCORE_FUZZ_EXAMPLES`` sets the number of cases (CI: the bounded default).
"""

from __future__ import annotations

import io
import os
import signal
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from _runtime_export import damaged_dds, synthetic_export
from conftest import data_set
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from patchcore.lean.pixels import (
    SURFACE_LIMITS,
    ImageReadError,
    ImageTooLargeError,
    InputLimits,
    decode_bytes,
    read_image,
)
from patchcore.lean.runtime import ExportedModel

FUZZ_EXAMPLES = int(os.environ.get("PATCHCORE_FUZZ_EXAMPLES", "300"))
CASE_SECONDS = 10
FORMATS = ("PNG", "JPEG", "TIFF", "BMP", "WEBP", "GIF", "PPM")
FOREIGN = ("DDS", "ICO", "TGA", "PCX", "SGI", "IM", "QOI", "JPEG2000", "SPIDER")


def _float_tiff(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.float32), mode="F").save(path)
    return path


def test_float_tiff_with_nan_pixels_is_refused(tmp_path):
    a = np.full((16, 16), 0.5, np.float32)
    a[3, 4] = np.nan
    with pytest.raises(ImageReadError, match="nan.tif: float image holds NaN or infinite pixels"):
        read_image(_float_tiff(tmp_path / "nan.tif", a))
    a[3, 4] = np.inf
    with pytest.raises(ImageReadError, match="float image holds NaN or infinite"):
        read_image(_float_tiff(tmp_path / "inf.tif", a))
    with pytest.raises(ImageReadError, match=r"float values must lie in \[0, 1\]"):
        read_image(_float_tiff(tmp_path / "wide.tif", np.full((16, 16), 200.0)))
    ok = read_image(_float_tiff(tmp_path / "ok.tif", np.full((16, 16), 0.5)))
    assert ok.dtype == np.uint8 and (ok == 128).all()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_limits_are_checked_from_the_header_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(_png_header(13_000, 13_000))  # 169 M pixels in 100 bytes
    t = time.perf_counter()
    with pytest.raises(ImageTooLargeError, match="13000x13000 image has 169,000,000 pixels"):
        read_image(path)
    assert time.perf_counter() - t < 1.0
    with pytest.raises(ImageTooLargeError, match="over the limit of 25,000,000"):
        decode_bytes(path.read_bytes(), limits=SURFACE_LIMITS["service"])
    seen = []

    def refuse(h: int, w: int) -> None:
        seen.append((h, w))
        raise ImageReadError("small.png", "refused from its header")

    small = tmp_path / "small.png"
    small.write_bytes(_png_header(300, 200))  # its pixel data is truncated: never reached
    with pytest.raises(ImageReadError, match="refused from its header"):
        read_image(small, check_size=refuse)
    assert seen == [(200, 300)]
    with pytest.raises(ImageReadError, match="damaged or truncated"):
        read_image(small)


def test_one_limits_object_with_its_defaults_per_surface():
    assert SURFACE_LIMITS["library"] == InputLimits()
    assert SURFACE_LIMITS["library"].max_pixels == 150_000_000
    assert SURFACE_LIMITS["service"].max_pixels == 25_000_000
    with pytest.raises(ValueError, match="max_pixels must be None or a number >= 1, got -5"):
        InputLimits(max_pixels=-5)
    with pytest.raises(ValueError, match="max_processed_pixels must be None or a number"):
        InputLimits(max_processed_pixels=2.5)
    with pytest.raises(ImageTooLargeError, match="aspect ratio of 25:1"):
        SURFACE_LIMITS["service"].check("strip", 40, 1000)


def test_a_symbolic_link_loop_is_named(tmp_path):
    (tmp_path / "a.png").symlink_to(tmp_path / "b.png")
    (tmp_path / "b.png").symlink_to(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="a.png: symbolic link loop"):
        read_image(tmp_path / "a.png")
    with pytest.raises(ImageReadError, match="missing.png: no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        read_image(tmp_path)


def test_a_foreign_format_is_refused_whatever_its_name(tmp_path):
    im = Image.fromarray(np.zeros((16, 16, 3), np.uint8))
    im.save(tmp_path / "x.ico", format="ICO")
    os.replace(tmp_path / "x.ico", tmp_path / "x.png")
    with pytest.raises(ImageReadError, match="x.png: not an image file"):
        read_image(tmp_path / "x.png")


# ---------------------------------------------------------------------------- the fuzz pass
@pytest.fixture(scope="module")
def seeds(tmp_path_factory) -> dict[str, bytes]:
    """A 64x48 crop of a real casting image in every accepted format and in the foreign ones
    this Pillow can write, and the damaged DDS."""
    first = sorted((data_set("casting") / "test" / "defective").iterdir())[0]
    crop = Image.open(first).convert("RGB").crop((100, 100, 164, 148))
    out = {}
    for fmt in FORMATS + FOREIGN:
        buf = io.BytesIO()
        try:
            crop.save(buf, format=fmt)
        except (KeyError, OSError, ValueError):  # a plugin this Pillow lacks
            assert fmt in FOREIGN, fmt
            continue
        out[fmt] = buf.getvalue()
    out["damaged DDS"] = damaged_dds(tmp_path_factory.mktemp("dds") / "x.png").read_bytes()
    return out


@pytest.fixture(scope="module")
def runtime(tmp_path_factory) -> ExportedModel:
    return ExportedModel(synthetic_export(tmp_path_factory.mktemp("fuzz") / "export"))


def _mutate(data: bytes, ops: list[tuple[int, int, int, bytes]]) -> bytes:
    """Apply (kind, position, length, payload) mutations, positions taken modulo the size."""
    b = bytearray(data)
    for kind, pos, length, payload in ops:
        if not b:
            b = bytearray(payload)
            continue
        at = pos % len(b)
        if kind == 0:  # flip bits of one byte
            b[at] ^= payload[0] or 0xFF
        elif kind == 1:  # overwrite with the payload
            b[at : at + len(payload)] = payload
        elif kind == 2:  # insert the payload
            b[at:at] = payload
        elif kind == 3:  # delete a run
            del b[at : at + length]
        elif kind == 4:  # truncate
            del b[at:]
        else:  # repeat a chunk (lengths and counts in headers now lie)
            b[at:at] = b[at : at + length] * 3
    return bytes(b)


MUTATION = st.tuples(
    st.integers(0, 5),
    st.integers(0, 1 << 20),
    st.integers(1, 64),
    st.binary(min_size=1, max_size=16),
)


class _HangError(Exception):
    pass


def _alarm(signum, frame):  # noqa: ANN001, ARG001
    raise _HangError(f"a decode took over {CASE_SECONDS} s")


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL's notes on damaged TIFF/EXIF tags
@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_fuzzed_images_decode_or_give_an_image_read_error(seeds, runtime, tmp_path):
    path = tmp_path / "fuzz.png"  # every format under one name, as a mislabelled file would be
    ends: dict[str, int] = {}
    previous = signal.signal(signal.SIGALRM, _alarm)

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(fmt=st.sampled_from(sorted(seeds)), ops=st.lists(MUTATION, max_size=4))
    def case(fmt: str, ops: list) -> None:
        data = _mutate(seeds[fmt], ops)
        path.write_bytes(data)
        signal.alarm(CASE_SECONDS)
        try:
            for what, call in (
                ("read_image", lambda: read_image(path)),
                ("decode_bytes", lambda: decode_bytes(data)),
            ):
                try:
                    a = call()
                    assert isinstance(a, np.ndarray) and a.dtype == np.uint8, type(a)
                    assert a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3), a.shape
                    ends[f"{what}: decoded"] = ends.get(f"{what}: decoded", 0) + 1
                except ImageReadError:
                    ends[f"{what}: ImageReadError"] = ends.get(f"{what}: ImageReadError", 0) + 1
            (r,) = runtime.inspect([path])  # never raises: a record either way
            assert r.verdict in ("anomalous", "normal", "error")
            assert (r.verdict == "error") == (r.score is None), r
            ends[f"runtime: {r.verdict}"] = ends.get(f"runtime: {r.verdict}", 0) + 1
        finally:
            signal.alarm(0)

    try:
        case()
    finally:
        signal.signal(signal.SIGALRM, previous)
    print(f"\nfuzz: {FUZZ_EXAMPLES} cases: {dict(sorted(ends.items()))}")
    assert ends.get("runtime: error", 0) > 0 and ends.get("read_image: decoded", 0) > 0
