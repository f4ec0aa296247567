"""Bounded load test of the inspection service on loopback.

Fits a small real model (efficientnet-lite0 on a few casting images), starts
``patchcore.apps.service``
in a subprocess on 127.0.0.1, and runs a fixed number of concurrent clients for a fixed time
against ``POST /v1/inspect`` with real images. Every answer is checked: status 200, the score
equal (within 1e-5) to the one the library gives for that image, the verdict consistent with
score and threshold. A probe hits ``/healthz`` meanwhile to show it is not blocked by scoring.

Reports requests per second, median and p99 latency, lost / wrong / rejected counts, and writes
them into its own section of ``benchmarks/RESULTS.md`` (between ``<!-- load-test:start -->`` and
``<!-- load-test:end -->``; the rest of the file is left alone).

    python benchmarks/load_test.py                 # 4 clients, 20 s
    python benchmarks/load_test.py --clients 8 --duration 30 --workers 2
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import platform
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import torch

from patchcore.core.detector import PatchCore

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "casting"
OUT = ROOT / "benchmarks" / "out"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
START, END = "<!-- load-test:start -->", "<!-- load-test:end -->"


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


def build_model(args: argparse.Namespace) -> tuple[Path, list[tuple[str, bytes, float, bool]]]:
    """Fit, save, and the (name, bytes, library score, library verdict) of each test image."""
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
        progress=False,
        seed=0,
    ).fit(train)
    tests = good + bad
    det.calibrate(tests, [0] * len(good) + [1] * len(bad))
    OUT.mkdir(parents=True, exist_ok=True)
    path = det.save(OUT / "load-test-model.pt")
    print(f"model: {len(train)} images, fit {time.perf_counter() - t0:.1f} s, {det!r}")
    # The reference: the library, one image at a time, on the saved-and-reloaded model.
    lib = PatchCore.load(path)
    expected = []
    for p in tests:
        score = float(lib.score_samples([p], progress=False)[0])
        expected.append((p.name, p.read_bytes(), score, score >= lib.threshold_))
    return path, expected


def start_server(path: Path, port: int, args: argparse.Namespace) -> subprocess.Popen:
    code = (
        "from patchcore.apps.service import serve; "
        f"serve({str(path)!r}, '127.0.0.1', {port}, log_level='warning', "
        f"workers={args.workers}, queue_length={args.queue_length})"
    )
    env = dict(os.environ, PATCHCORE_TOKEN="")
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    end = time.monotonic() + 120
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
    sys.exit("service did not become ready within 120 s")


async def client(
    k: int,
    http: httpx.AsyncClient,
    images: list[tuple[str, bytes, float, bool]],
    deadline: float,
    tally: Tally,
) -> None:
    i = k
    while time.perf_counter() < deadline:
        name, data, want, want_fail = images[i % len(images)]
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
        body = r.json()
        fail = body["verdict"] == "fail"
        if (
            abs(body["score"] - want) > 1e-5
            or fail != want_fail
            or fail != (body["score"] >= body["threshold"])
            or body["anomalous"] != fail
        ):
            tally.wrong.append(f"{name}: got {body['score']!r}/{body['verdict']}, want {want!r}")
        else:
            tally.ok += 1


async def health_probe(http: httpx.AsyncClient, deadline: float, tally: Tally) -> None:
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        r = await http.get("/healthz")
        if r.status_code == 200:
            tally.health_ms.append((time.perf_counter() - t0) * 1000.0)
        await asyncio.sleep(0.25)


async def run_load(port: int, images, args: argparse.Namespace) -> tuple[Tally, float]:
    tally = Tally()
    limits = httpx.Limits(max_connections=args.clients + 1)
    async with httpx.AsyncClient(
        base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=60.0
    ) as http:
        # one untimed request per image first, so every image has passed through the server
        for name, data, *_ in images:
            r = await http.post("/v1/inspect", content=data)
            assert r.status_code == 200, (name, r.text)
        t0 = time.perf_counter()
        deadline = t0 + args.duration
        await asyncio.gather(
            health_probe(http, deadline, tally),
            *(client(k, http, images, deadline, tally) for k in range(args.clients)),
        )
        elapsed = time.perf_counter() - t0
    return tally, elapsed


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}"


def report(tally: Tally, elapsed: float, args: argparse.Namespace, n_images: int) -> str:
    answered = tally.ok + len(tally.wrong)
    lines = [
        START,
        "## Inspection service load test (`benchmarks/load_test.py`)",
        "",
        f"{dt.date.today().isoformat()}, {machine()}. Client and server share the machine "
        f"(loopback); load average {args.load_before:.1f} just before the run"
        + (" (other jobs were using the same cores)." if args.load_before > 1 else "."),
        f"Model: efficientnet-lite0, {args.train_images} casting training images, image size "
        f"{args.image_size}, coreset 0.1. Service: workers={args.workers}, "
        f"queue_length={args.queue_length}. Load: {args.clients} concurrent clients for "
        f"{args.duration:g} s, each posting {n_images} real casting test images (300x300 JPEG) "
        "in turn as raw bodies to `POST /v1/inspect`.",
        "",
        "| requests | req/s | median ms | p99 ms | max ms | lost | wrong | 503 "
        "| healthz median / max ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {answered} | {answered / elapsed:.1f} | {percentile(tally.latencies_ms, 50):.0f} "
        f"| {percentile(tally.latencies_ms, 99):.0f} | {max(tally.latencies_ms, default=0):.0f} "
        f"| {len(tally.lost)} | {len(tally.wrong)} | {tally.rejected} "
        f"| {percentile(tally.health_ms, 50):.1f} / {max(tally.health_ms, default=0):.1f} |",
        "",
        "Wrong = answered, but the score differs from the library's by more than 1e-5 or the "
        "verdict disagrees; lost = an error or an unexpected status. Latency is per request, "
        "seen by the client (queueing included). `/healthz` was probed every 0.25 s during the "
        "run.",
        END,
    ]
    return "\n".join(lines)


def write_section(section: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    RESULTS.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--queue-length", type=int, default=8)
    ap.add_argument("--train-images", type=int, default=8)
    ap.add_argument("--test-images", type=int, default=8, help="half good, half defective")
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = ap.parse_args()

    path, images = build_model(args)
    args.load_before = os.getloadavg()[0]
    port = free_port()
    proc = start_server(path, port, args)
    try:
        tally, elapsed = asyncio.run(run_load(port, images, args))
    finally:
        proc.terminate()
        proc.wait(10)
    section = report(tally, elapsed, args, len(images))
    print(section)
    for line in (tally.lost + tally.wrong)[:10]:
        print("  ", line)
    if not args.no_write:
        write_section(section)
        print(f"written to {RESULTS}")
    if tally.lost or tally.wrong:
        sys.exit(1)


if __name__ == "__main__":
    main()
