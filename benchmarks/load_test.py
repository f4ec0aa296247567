"""Load, slow-client and memory-amplification figures of the inspection service, both backends.

Fits a small real model (efficientnet-lite0 on a few casting images, float32 search), saves it
and exports it (ONNX), then for each backend (``patchcore serve model.pt`` = torch,
``patchcore-run serve export/`` = onnxruntime) starts the one service in a subprocess on
127.0.0.1 and measures:

- **load**: a fixed number of concurrent clients for a fixed time posting real casting test
  images to ``POST /v1/inspect``; every answer checked (status 200, the score within 1e-6
  (torch) / 1e-4 (runtime) relative of the library's, the verdict the record's rule on it);
  ``/healthz`` probed meanwhile.
- **slow clients**: 40 clients sending their bodies at 1 byte a second from another address
  (127.0.0.2) and 8 sending their headers at 1 byte a second, while a normal client posts
  images: its statuses and latencies.
- **amplification**: the server's peak RSS above its resting RSS for single requests (a real
  image, single-colour PNGs at and over the pixel limits, a batch at and over its pixel budget,
  a 200 MB body), divided by the request's bytes. The peak is reset before each request
  (``/proc/PID/clear_refs``; Linux, root or the same user).

Writes its own section of ``benchmarks/RESULTS.md`` (between ``<!-- service-load:start -->`` and
``<!-- service-load:end -->``, inside the reliability section; nothing else is touched).

    python benchmarks/load_test.py                      # both backends, 4 clients, 20 s
    python benchmarks/load_test.py --backends runtime --clients 8 --duration 30
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import os
import platform
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from patchcore.core.detector import PatchCore

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "casting"
OUT = ROOT / "benchmarks" / "out"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- service-load:start -->", "<!-- service-load:end -->"
RELIABILITY_END = "<!-- reliability:end -->"
BACKEND_NAMES = {"torch": "torch (`patchcore serve model.pt`)",
                 "runtime": "onnxruntime (`patchcore-run serve export/`)"}  # fmt: skip


@dataclass
class Tally:
    latencies_ms: list[float] = field(default_factory=list)
    ok: int = 0
    wrong: list[str] = field(default_factory=list)  # answered, but not what the library says
    lost: list[str] = field(default_factory=list)  # no answer, or an unexpected status
    rejected: int = 0  # 503 busy (by design when the queue is full; not expected here)
    health_ms: list[float] = field(default_factory=list)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def build_model(args: argparse.Namespace) -> tuple[Path, Path, list, float]:
    """Fit, calibrate, save and export; (model, export folder, images, threshold) where each
    image is (name, bytes, library score)."""
    from patchcore.core.export import export

    if not DATA.is_dir():
        sys.exit(f"{DATA}: real data not found (expected ../shared/data next to the repo)")
    train = sorted((DATA / "train" / "good").iterdir())[: args.train_images]
    good = sorted((DATA / "test" / "good").iterdir())[: args.test_images // 2]
    bad = sorted((DATA / "test" / "defective").iterdir())[: args.test_images // 2]
    t0 = time.perf_counter()
    det = PatchCore(
        backbone="efficientnet-lite0",
        image_size=args.image_size,
        coreset_ratio=0.1,
        search_precision="float32",
        progress=False,
        seed=0,
    ).fit(train)
    tests = good + bad
    det.calibrate(tests, [0] * len(good) + [1] * len(bad))
    OUT.mkdir(parents=True, exist_ok=True)
    path = det.save(OUT / "load-test-model.pt")
    folder = OUT / "load-test-export"
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    export(det, folder, format="onnx")
    print(f"model: {len(train)} images, fit + export {time.perf_counter() - t0:.1f} s, {det!r}")
    lib = PatchCore.load(path)  # the reference: the saved-and-reloaded model, one at a time
    images = [(p.name, p.read_bytes(), float(lib.score_samples([p])[0])) for p in tests]
    return path, folder, images, float(lib.threshold_)


def start_server(target: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    code = (
        "from patchcore.apps.service import serve; "
        f"serve({str(target)!r}, '127.0.0.1', {port}, log_level='warning', "
        f"workers={args.workers}, queue_length={args.queue_length})"
    )
    env = dict(os.environ, PATCHCORE_TOKEN="")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    end = time.monotonic() + 180
    while time.monotonic() < end:
        if proc.poll() is not None:
            sys.exit(f"service exited with status {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.terminate()
    sys.exit("service did not become ready within 180 s")


# ---------------------------------------------------------------------- load


def check(body: dict, want: float, threshold: float, rtol: float) -> str | None:
    """Why an answer is wrong (None: right): the score against the library's, the verdict
    against the record's rule on the answered score, the library's verdict away from it."""
    score, verdict = body["score"], body["verdict"]
    if abs(score - want) > rtol * abs(want):
        return f"score {score!r}, library {want!r}"
    if verdict != ("anomalous" if score >= body["threshold"] else "normal"):
        return f"verdict {verdict} for score {score!r} / threshold {body['threshold']!r}"
    if abs(want - threshold) > rtol * abs(threshold) and verdict != (
        "anomalous" if want >= threshold else "normal"
    ):
        return f"verdict {verdict}, library's score {want!r} says otherwise"
    return None


async def client(k: int, http: httpx.AsyncClient, images: list, deadline: float,
                 tally: Tally, threshold: float, rtol: float) -> None:  # fmt: skip
    i = k
    while time.perf_counter() < deadline:
        name, data, want = images[i % len(images)]
        i += 1
        t0 = time.perf_counter()
        try:
            r = await http.post("/v1/inspect", content=data, headers={"Content-Type": "image/jpeg"})
        except httpx.HTTPError as exc:
            tally.lost.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        ms = (time.perf_counter() - t0) * 1000.0
        if r.status_code == 503:
            tally.rejected += 1
            continue
        if r.status_code != 200:
            tally.lost.append(f"{name}: HTTP {r.status_code} {r.text[:120]}")
            continue
        tally.latencies_ms.append(ms)
        problem = check(r.json(), want, threshold, rtol)
        if problem:
            tally.wrong.append(f"{name}: {problem}")
        else:
            tally.ok += 1


async def health_probe(http: httpx.AsyncClient, deadline: float, tally: Tally) -> None:
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        r = await http.get("/healthz")
        if r.status_code == 200:
            tally.health_ms.append((time.perf_counter() - t0) * 1000.0)
        await asyncio.sleep(0.25)


async def run_load(port: int, images: list, args: argparse.Namespace, threshold: float,
                   rtol: float) -> tuple[Tally, float]:  # fmt: skip
    tally = Tally()
    limits = httpx.Limits(max_connections=args.clients + 1)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60.0
    ) as http:
        for name, data, _ in images:  # one untimed request per image first
            r = await http.post("/v1/inspect", content=data)
            assert r.status_code == 200, (name, r.text)
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        await asyncio.gather(
            health_probe(http, deadline, tally),
            *(
                client(k, http, images, deadline, tally, threshold, rtol)
                for k in range(args.clients)
            ),  # fmt: skip
        )
        elapsed = time.perf_counter() - t0
    return tally, elapsed


# ---------------------------------------------------------------------- slow clients


def _request(port: int, body: bytes, path: str = "/v1/inspect", ctype: str = "image/jpeg") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


def _status(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return 0
        data += chunk
    return int(data.split(b" ", 2)[1])


def _slow_sender(port: int, head: bytes, slow: bytes, stop: threading.Event, out: list,
                 i: int) -> None:  # fmt: skip
    """From 127.0.0.2: send ``head`` at once, then ``slow`` one byte a second until answered
    or ``stop``."""
    out[i] = -1
    try:
        with socket.create_connection(("127.0.0.1", port), 30, ("127.0.0.2", 0)) as s:
            s.sendall(head)
            s.settimeout(1.0)
            for byte in slow:
                if stop.is_set():
                    return
                s.sendall(bytes([byte]))
                try:
                    out[i] = _status(s)
                    return
                except TimeoutError:
                    continue
    except OSError:
        out[i] = 0


def slow_client_probe(port: int, images: list, slow: int, header_slow: int) -> dict:
    """A normal client's statuses and latencies while ``slow`` clients send bodies and
    ``header_slow`` send headers at 1 byte a second (all from 127.0.0.2)."""
    body = b"\0" * 1000
    head = _request(port, body)[: -len(body)]
    stop = threading.Event()
    results: list = [None] * (slow + header_slow)
    jobs = [(head, body)] * slow + [(b"", head)] * header_slow
    threads = [
        threading.Thread(target=_slow_sender, args=(port, h, b, stop, results, i))
        for i, (h, b) in enumerate(jobs)
    ]
    for t in threads:
        t.start()
    time.sleep(2.0)  # all connected and sending
    statuses, ms = [], []
    for k in range(10):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(_request(port, images[k % len(images)][1]))
            statuses.append(_status(s))
        ms.append((time.perf_counter() - t0) * 1000.0)
    time.sleep(max(0.0, 12.0 - 2.0 - sum(ms) / 1000.0))  # header_timeout_s (10 s) passes
    stop.set()
    for t in threads:
        t.join(5)
    return {"normal": statuses, "ms": ms, "bodies": results[:slow], "headers": results[slow:]}


# ---------------------------------------------------------------------- amplification


def flat_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (width, height), 128).save(buf, format="PNG")
    return buf.getvalue()


def multipart(files: list[bytes]) -> tuple[bytes, str]:
    head = b"--b\r\nContent-Disposition: form-data; name=files; filename=f%d.png\r\n\r\n"
    parts = [head % i + f + b"\r\n" for i, f in enumerate(files)]
    return b"".join(parts) + b"--b--\r\n", "multipart/form-data; boundary=b"


def _kb(pid: int, key: str) -> int:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))  # type: ignore[union-attr]


def amplification_cases(image: bytes) -> list[tuple[str, bytes, str, int | None, str | None]]:
    """(what, body, content type, declared length or None, path) of each probe."""
    big = flat_png(5000, 5000)
    batch16, ctype16 = multipart([big] * 16)
    batch2, ctype2 = multipart([big] * 2)
    return [
        ("casting 300x300 JPEG", image, "image/jpeg", None, None),
        ("single-colour 5000x5000 PNG (25 M px: max_pixels)", big, "image/png", None, None),
        ("single-colour 7000x7000 PNG", flat_png(7000, 7000), "image/png", None, None),
        ("single-colour 8x3,000,000 PNG strip", flat_png(8, 3_000_000), "image/png", None, None),
        ("batch of 2 single-colour 5000x5000 PNGs (50 M px: max_batch_pixels)", batch2, ctype2,
         None, "/v1/inspect/batch"),
        ("batch of 16 single-colour 5000x5000 PNGs", batch16, ctype16, None, "/v1/inspect/batch"),
        ("200 MB body (Content-Length), 1 MB of it sent", b"\0" * 2**20, "image/png",
         200 * 2**20, None),
    ]  # fmt: skip


def amplification_probe(port: int, pid: int, image: bytes) -> list[dict]:
    out = []
    for what, body, ctype, declared, path in amplification_cases(image):
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := RSS
        time.sleep(0.2)
        rest = _kb(pid, "VmRSS")
        length = declared or len(body)
        head = (
            f"POST {path or '/v1/inspect'} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
        ).encode()
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
            with contextlib.suppress(OSError):  # refused before it was all sent
                s.sendall(head + body)
            status = _status(s)
        took = time.perf_counter() - t0
        time.sleep(0.2)
        peak_mb = max(0, _kb(pid, "VmHWM") - rest) / 1024
        out.append({"what": what, "bytes": length, "status": status, "ms": took * 1000,
                    "peak_mb": peak_mb, "per_byte": peak_mb * 2**20 / length})  # fmt: skip
    return out


# ---------------------------------------------------------------------- report


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    return f"{os.cpu_count()} CPU cores ({cpu}), no GPU used"


def backend_rows(name: str, run: dict, args: argparse.Namespace, n_images: int) -> list[str]:
    tally, elapsed, slow, amp = run["tally"], run["elapsed"], run["slow"], run["amp"]
    answered = tally.ok + len(tally.wrong)
    bodies = {s: slow["bodies"].count(s) for s in sorted(set(slow["bodies"]), key=str)}
    lines = [
        f"### {BACKEND_NAMES[name]}",
        "",
        f"Load average {run['load']:.1f} at the start of this backend's runs.",
        "",
        f"Load: {args.clients} clients for {args.duration:g} s posting {n_images} casting test "
        "images (300x300 JPEG) as raw bodies; `/healthz` probed every 0.25 s.",
        "",
        "| requests | req/s | median ms | p99 ms | max ms | lost | wrong | 503 | healthz median / max ms |",  # noqa: E501
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {answered} | {answered / elapsed:.1f} | {percentile(tally.latencies_ms, 50):.0f} "
        f"| {percentile(tally.latencies_ms, 99):.0f} | {max(tally.latencies_ms, default=0):.0f} "
        f"| {len(tally.lost)} | {len(tally.wrong)} | {tally.rejected} "
        f"| {percentile(tally.health_ms, 50):.1f} / {max(tally.health_ms, default=0):.1f} |",
        "",
        f"Slow clients: {len(slow['bodies'])} sending bodies and {len(slow['headers'])} sending "
        "headers at 1 byte/s from 127.0.0.2; meanwhile 10 normal requests from 127.0.0.1: "
        f"statuses {dict((s, slow['normal'].count(s)) for s in set(slow['normal']))}, median "
        f"{percentile(slow['ms'], 50):.0f} ms, max {max(slow['ms']):.0f} ms. The slow bodies: "
        f"{bodies} (-1: still sending after 12 s, held until body_timeout_s = 30 s; 503: the "
        f"address's upload slots); the slow headers: {sorted(slow['headers'])} (408 after "
        "header_timeout_s = 10 s).",
        "",
        "| request | bytes | status | ms | peak RSS above rest, MB | MB per request MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for a in amp:
        lines.append(f"| {a['what']} | {a['bytes']:,} | {a['status']} | {a['ms']:.0f} "
                     f"| {a['peak_mb']:.0f} | {a['per_byte']:,.0f} |")  # fmt: skip
    return [*lines, ""]


def report(runs: dict, args: argparse.Namespace, n_images: int) -> str:
    lines = [
        START,
        "### One service over two backends: load, slow clients, memory (`benchmarks/load_test.py`)",  # noqa: E501
        "",
        f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine()}. The machine is "
        "shared with other developers' jobs (load average below; figures are contention "
        "figures). Client and server share it (loopback). Model: efficientnet-lite0, "
        f"{args.train_images} casting training images, image size {args.image_size}, coreset "
        f"0.1, float32 search, max-F1 threshold; its ONNX export for the runtime. Service "
        f"defaults (workers={args.workers}, queue_length={args.queue_length}, 20 MiB, 25 M px, "
        "50 M px a batch, 32 upload slots, 8 per address once half are taken).",
        "",
    ]
    for name, run in runs.items():
        lines += backend_rows(name, run, args, n_images)
    lines += [
        "Wrong = answered, but the score differs from the library's (relative 1e-6 torch, 1e-4 "
        "runtime) or the verdict is not the record's rule on it; lost = an error or an "
        "unexpected status. Peak RSS: the server process's VmHWM after the request minus its "
        "VmRSS before (peak reset with /proc/PID/clear_refs); MB per request MB = that peak over "
        "the request's bytes. Before (issue #25, the old services): 16 single-colour 5000x5000 "
        "PNGs 3.5 GB and 25-30 s; runtime service: a 200 MB body 454 MB, a 7000x7000 "
        "single-colour PNG 1.34 GB, 40 slow uploads gave a normal client 503 on 30 of 35 "
        "requests.",
        END,
    ]
    return "\n".join(lines)


def write_section(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    elif RELIABILITY_END in text:
        text = text.replace(RELIABILITY_END, section + "\n" + RELIABILITY_END, 1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def run_backend(name: str, target: Path, images: list, threshold: float,
                args: argparse.Namespace) -> dict:  # fmt: skip
    load = os.getloadavg()[0]
    port = free_port()
    proc = start_server(target, port, args)
    rtol = 1e-6 if name == "torch" else 1e-4  # relative; scores here are about 10-40
    try:
        tally, elapsed = asyncio.run(run_load(port, images, args, threshold, rtol))
        slow = slow_client_probe(port, images, args.slow_clients, args.slow_headers)
        amp = amplification_probe(port, proc.pid, images[0][1])
    finally:
        proc.terminate()
        proc.wait(10)
    for line in (tally.lost + tally.wrong)[:10]:
        print("  ", line)
    return {"tally": tally, "elapsed": elapsed, "slow": slow, "amp": amp, "load": load}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backends", default="torch,runtime", help="torch, runtime or both")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    ap.add_argument("--slow-clients", type=int, default=40)
    ap.add_argument("--slow-headers", type=int, default=8)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--queue-length", type=int, default=8)
    ap.add_argument("--train-images", type=int, default=8)
    ap.add_argument("--test-images", type=int, default=8, help="half good, half defective")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()

    path, folder, images, threshold = build_model(args)
    runs = {}
    for name in args.backends.split(","):
        target = path if name == "torch" else folder
        runs[name] = run_backend(name, target, images, threshold, args)
    section = report(runs, args, len(images))
    print(section)
    if not args.no_write:
        write_section(section)
        print(f"written to {RESULTS}")
    if any(r["tally"].lost or r["tally"].wrong for r in runs.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
