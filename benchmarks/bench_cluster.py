"""A two-node Ray cluster on this machine: `patchcore fit --ray --address` and `patchcore batch
--address`, throughput, and every input written exactly once with a worker killed mid-run.

The benchmark starts the cluster itself: a head node (``ray start --head``, 1 CPU) and a second
raylet joined with ``ray start --address`` (1 CPU, its own ``--temp-dir`` and a ``node2``
resource), each with a small object store. Then, as a user would, through the CLI:

1. ``patchcore fit TRAIN --ray --address HEAD --workers 2`` on the casting training images
   (a worker killed mid-fit with ``--kill-fit``; the fit must survive it);
2. a threshold set on the fitted model (median score of 20 training images: this benchmark
   measures throughput, not accuracy);
3. ``patchcore batch MODEL LIST --address HEAD --workers 2`` over ``--images`` distinct paths
   (symbolic links cycling over the casting test images, in a temporary folder), once quiet
   and once with a worker killed (SIGKILL by its pid) after the first finished block.

Each run checks that every input is in the output exactly once, and which node each worker
ran on (the raylet it descends from). At the end only the processes this benchmark started
are stopped (found by the cluster's temporary folder: ``ray stop`` would stop every Ray on
the machine). Rows go to benchmarks/out/cluster.jsonl; ``--doc`` writes the run into
docs/cluster.md and benchmarks/RESULTS.md ("Two-node cluster"); ``--table`` does so from the
last run's rows without running.

    python benchmarks/bench_cluster.py [--images 1000] [--train-images 200] [--kill-fit] [--doc]

Ray's token authentication: the cluster, the drivers and the nodes run with
``RAY_AUTH_MODE=token`` (Ray's own token file) unless ``RAY_AUTH_MODE`` is set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_ray import casting_links
from common import DATA, ROOT, append_row, machine, write_results_section

import patchcore.scale as scale
from patchcore.core.detector import PatchCore

ROWS = ROOT / "benchmarks" / "out" / "cluster.jsonl"
CLI = [sys.executable, "-c", "from patchcore.apps.cli import app; app()"]
RAY = str(Path(sys.executable).with_name("ray"))


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    env.setdefault("RAY_AUTH_MODE", "token")
    env.pop("RAY_ADDRESS", None)
    return env


def _load() -> str:
    return " / ".join(f"{v:.1f}" for v in os.getloadavg())


def _processes() -> tuple[dict[int, int], dict[int, str]]:
    """(pid -> parent pid, pid -> command line) of every process (Linux /proc)."""
    parents, cmds = {}, {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_bytes().decode(errors="replace")
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                cmds[int(entry)] = cmd.replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return parents, cmds


def _tree(marks: list[str]) -> set[int]:
    """Processes whose command line holds one of ``marks``, and their descendants."""
    parents, cmds = _processes()
    found = {p for p, c in cmds.items() if any(m in c for m in marks) and p != os.getpid()}
    front = set(found)
    while front:
        front = {p for p, pp in parents.items() if pp in front and p not in found}
        found |= front
    return found


def _node_of(pid: int, raylets: dict[int, str]) -> str:
    """The node (``head``/``node2``) whose raylet ``pid`` descends from, or ``?``."""
    parents, _ = _processes()
    while pid > 1:
        if pid in raylets:
            return raylets[pid]
        pid = parents.get(pid, 1)
    return "?"


class Cluster:
    """Two raylets on this machine; stopped by killing exactly the processes it started."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.ip = socket.gethostbyname(socket.gethostname())
        self.address = f"{self.ip}:{port}"
        self.dirs = {"head": root / "head", "node2": root / "node2"}

    def start(self) -> None:
        store = str(400 * 1024**2)
        common = ["--num-cpus", "1", "--object-store-memory", store, "--disable-usage-stats"]
        head = [RAY, "start", "--head", "--port", str(self.port), "--include-dashboard", "false"]
        subprocess.run(
            [*head, *common, "--temp-dir", str(self.dirs["head"])],
            env=_env(), check=True, capture_output=True, text=True,
        )  # fmt: skip
        node = [RAY, "start", "--address", self.address, "--resources", '{"node2": 1}']
        subprocess.run(
            [*node, *common, "--temp-dir", str(self.dirs["node2"])],
            env=_env(), check=True, capture_output=True, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while self.nodes() < 2:
            if time.monotonic() > deadline:
                raise SystemExit("the second raylet did not join in 120 s")
            time.sleep(2)

    def nodes(self) -> int:
        code = (
            f"import ray; ray.init(address={self.address!r}, logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code], env=_env(), capture_output=True, text=True
        ).stdout
        return int(out.strip().splitlines()[-1]) if out.strip() else 0

    def raylets(self) -> dict[int, str]:
        """raylet pid -> node name."""
        _, cmds = _processes()
        return {
            pid: name
            for pid, cmd in cmds.items()
            for name, folder in self.dirs.items()
            if "raylet/raylet" in cmd and str(folder) in cmd
        }

    def stop(self) -> None:
        pids = _tree([str(d) for d in self.dirs.values()])
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            time.sleep(2)


def _kill_one(pattern: str, after: float, cluster: Cluster, killed: list) -> None:
    """Kill the first process of the cluster whose command line matches ``pattern``."""
    time.sleep(after)
    marks = [str(d) for d in cluster.dirs.values()]
    _, cmds = _processes()
    for pid in sorted(_tree(marks)):
        if re.search(pattern, cmds.get(pid, "")):
            node = _node_of(pid, cluster.raylets())  # before the kill: then it has no parent
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, node))
            return


def _actors(cluster: Cluster, title: str, seen: dict[int, str]) -> None:
    """Add the cluster's live processes titled ``title`` (``ray::BlockScorer``...) to ``seen``
    (pid -> node), while they run: once the job ends they are gone."""
    _, cmds = _processes()
    raylets = cluster.raylets()
    for pid in _tree([str(d) for d in cluster.dirs.values()]):
        if cmds.get(pid, "").startswith(title) and pid not in seen:
            seen[pid] = _node_of(pid, raylets)


def fit(cluster: Cluster, train: Path, model: Path, kill: bool) -> dict:
    """``patchcore fit TRAIN --ray --address HEAD --workers 2``; with ``kill``, one FitShard
    actor SIGKILLed once both hold their features (at the first chunk stage call)."""
    cmd = [*CLI, "fit", str(train), "--out", str(model), "--ray", "--address", cluster.address]
    load0, t0, started = _load(), time.perf_counter(), time.strftime("%Y-%m-%d %H:%M")
    proc = subprocess.Popen(
        [*cmd, "--workers", "2", "-q"], env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed: list = []
    actors: dict[int, str] = {}
    while proc.poll() is None:
        _actors(cluster, "ray::FitShard", actors)
        if kill and not killed:
            _, cmds = _processes()
            if any(c.startswith("ray::FitShard.chunk_select") for c in cmds.values()):
                _kill_one(r"^ray::FitShard", 0.0, cluster, killed)
        time.sleep(0.2)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"fit --ray failed ({proc.returncode}): {err[-3000:]}")
    det = PatchCore.load(model)
    n = len(list(train.iterdir()))
    return {
        "run": "fit --ray --address, 2 workers" + (", one killed" if kill else ""),
        "images": n,
        "seconds": round(seconds, 1),
        "images_per_s": round(n / seconds, 2),
        "bank_rows": int(det.memory_bank_.shape[0]),
        "provenance": det.state_.provenance is not None,
        "killed": killed,
        "workers": {str(pid): node for pid, node in sorted(actors.items())},
        "restarted": len(actors) > 2,
        "stdout_tail": out.strip().splitlines()[-3:],
        "error_lines": [ln for ln in err.splitlines() if " E " in ln[:40] or "ERROR" in ln],
        "load_start": load0,
        "started": started,
    }


def fits(cluster: Cluster, work: Path, n_train: int, kill: bool) -> tuple[list[dict], Path]:
    """The fit (and, with ``kill``, the fit again with a worker killed: its bank must be the
    quiet fit's, bit for bit); the quiet fit's model gets a threshold for the batch runs."""
    train = work / "train"
    src = sorted((DATA / "casting" / "train" / "good").iterdir())[:n_train]
    train.mkdir()
    for f in src:
        (train / f.name).symlink_to(f)
    model = work / "model.pt"
    rows = [fit(cluster, train, model, kill=False)]
    print(json.dumps(rows[-1]), flush=True)
    det = PatchCore.load(model)
    if kill:
        rows.append(fit(cluster, train, work / "model-killed.pt", kill=True))
        again = PatchCore.load(work / "model-killed.pt")
        rows[-1]["same_bank"] = bool(torch.equal(det.memory_bank_, again.memory_bank_))
        print(json.dumps(rows[-1]), flush=True)
    scores = det.score(src[:20], progress=False).scores
    det.set_threshold(float(sorted(scores)[len(scores) // 2]))
    det.save(model)
    return rows, model


def batch(cluster: Cluster, model: Path, paths: list[str], out: Path, block: int, kill: bool):
    listing = out.with_suffix(".txt")
    listing.write_text("\n".join(paths) + "\n")
    cmd = [*CLI, "batch", str(model), str(listing), "--out", str(out)]
    cmd += ["--address", cluster.address, "--workers", "2", "--block-size", str(block), "-q"]
    load0, t0, started = _load(), time.perf_counter(), time.strftime("%Y-%m-%d %H:%M")
    proc = subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed: list = []
    actors: dict[int, str] = {}
    first = None
    while proc.poll() is None:
        _actors(cluster, "ray::BlockScorer", actors)
        parts = list(out.glob("*.parquet")) if out.is_dir() else []
        if parts and first is None:
            first = time.perf_counter() - t0
        if kill and parts and not killed:
            worker = scale.read_results(out, ["worker"]).column("worker")[0].as_py()
            pid = int(worker.rsplit(":", 1)[1])
            killed.append((pid, actors.get(pid) or _node_of(pid, cluster.raylets())))
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    seconds = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"batch failed ({proc.returncode}): {err[-3000:]}")
    table = scale.read_results(out)
    keys = table.column("image").to_pylist()
    per_worker = table.column("worker").to_pylist()
    workers = sorted(set(per_worker))
    return {
        "run": "batch --address, 2 workers" + (", one killed" if kill else ""),
        "images": len(paths),
        "rows": table.num_rows,
        "distinct_rows": len(set(keys)),
        "exactly_once": sorted(keys) == sorted(os.path.abspath(p) for p in paths),
        "errors": table.column("verdict").to_pylist().count("error"),
        "seconds": round(seconds, 1),
        "images_per_s": round(len(paths) / seconds, 2),
        "first_part_s": round(first, 1) if first else None,
        "workers": {w: actors.get(int(w.rsplit(":", 1)[1]), "?") for w in workers},
        "rows_per_worker": {w: per_worker.count(w) for w in workers},
        "summary": err.strip().splitlines()[-1:] if err.strip() else [],
        "killed": killed,
        "error_lines": [ln for ln in err.splitlines() if " E " in ln[:40] or "ERROR" in ln],
        "load_start": load0,
        "started": started,
    }


def doc(rows: list[dict], heading: str) -> str:
    """The run's table (docs/cluster.md and benchmarks/RESULTS.md)."""
    batch_rows = [r for r in rows if r["run"].startswith("batch")]
    fit_rows = [r for r in rows if r["run"].startswith("fit")]
    command = "python benchmarks/bench_cluster.py"
    if batch_rows and fit_rows:
        command += f" --images {batch_rows[0]['images']} --train-images {fit_rows[0]['images']}"
    command += " --kill-fit" * any("same_bank" in r for r in fit_rows) + " --doc"
    lines = [
        heading,
        "",
        f"Machine: {rows[0].get('machine') or machine()}. A head node and a second raylet joined "
        "with `ray start --address` (1 CPU each, own `--temp-dir`), started by the benchmark; "
        "the CLI driven as a user would (`--address HEAD:PORT --workers 2`: one actor per "
        "node). Casting images (training: the first of train/good; batch: distinct symbolic "
        "links cycling over the test images). A worker is killed with SIGKILL: in the fit at "
        "its first chunk stage call (its features then exist only in it), in the batch once "
        "the first block is written. Load is `uptime`'s 1/5/15-minute average at the start of "
        f"each run (a shared machine). Reproduce: `nice -n 10 {command}`.",
        "",
        "```bash",
        "ray start --head --port 6390 --num-cpus 1 --temp-dir /tmp/c/head "
        "--include-dashboard false",
        "ray start --address HOST:6390 --num-cpus 1 --temp-dir /tmp/c/node2 --resources "
        "'{\"node2\": 1}'",
        "patchcore fit TRAIN --out model.pt --ray --address HOST:6390 --workers 2",
        "patchcore batch model.pt list.txt --out out/ --address HOST:6390 --workers 2 "
        "--block-size 64",
        "```",
        "",
        "| run | images | seconds | images/s | rows (distinct) | check | killed (pid, node) "
        "| actors: pid node (: rows written) | ERROR lines | load | started |",
        "|---|---:|---:|---:|---|---|---|---|---:|---|---|",
    ]
    for r in rows:
        rows_txt = f"{r['rows']} ({r['distinct_rows']})" if "rows" in r else "-"
        per = r.get("rows_per_worker", {})
        workers = ", ".join(
            f"{w.rsplit(':', 1)[-1]} {node}" + (f": {per[w]}" if w in per else "")
            for w, node in r.get("workers", {}).items()
        )
        if "exactly_once" in r:
            check = f"each input exactly once: {r['exactly_once']}, errors {r['errors']}"
        elif "same_bank" in r:
            check = f"survived; bank = quiet fit's bit for bit: {r['same_bank']}"
        else:
            check = f"{r['bank_rows']:,} bank rows"
        killed = ", ".join(f"{pid} ({node})" for pid, node in r["killed"]) or "-"
        lines.append(
            f"| {r['run']} | {r['images']} | {r['seconds']} | {r['images_per_s']} "
            f"| {rows_txt} | {check} | {killed} | {workers} "
            f"| {len(r['error_lines'])} | {r['load_start']} | {r.get('started', r['date'])} |"
        )
    return "\n".join(lines)


def write_doc(body: str) -> None:
    path = ROOT / "docs" / "cluster.md"
    start, end = "<!-- cluster-run:start -->", "<!-- cluster-run:end -->"
    text = path.read_text()
    block = f"{start}\n{body}\n{end}"
    text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    path.write_text(text)


def write_all(rows: list[dict]) -> None:
    """The run into docs/cluster.md and into benchmarks/RESULTS.md's "Two-node cluster"."""
    write_doc(doc(rows, "## A two-node cluster on one machine (`benchmarks/bench_cluster.py`)"))
    write_results_section(
        "cluster", doc(rows, "## Two-node cluster (`benchmarks/bench_cluster.py`)")
    )


def last_run() -> list[dict]:
    """The rows of the last run in benchmarks/out/cluster.jsonl (from its first fit on)."""
    rows = [json.loads(line) for line in ROWS.read_text().splitlines()]
    first = max(i for i, r in enumerate(rows) if r["run"] == "fit --ray --address, 2 workers")
    return rows[first:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--train-images", type=int, default=200)
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--port", type=int, default=6390)
    ap.add_argument("--kill-fit", action="store_true", help="kill a fit worker mid-fit too")
    ap.add_argument(
        "--doc", action="store_true", help="write the run into docs/cluster.md and RESULTS.md"
    )
    ap.add_argument("--table", action="store_true", help="--doc from the last run's rows only")
    args = ap.parse_args()
    if args.table:
        write_all(last_run())
        return
    print(machine(), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        work = Path(tmp)
        cluster = Cluster(work / "ray", args.port)
        try:
            cluster.start()
            print(f"cluster up at {cluster.address}: {cluster.raylets()}", flush=True)
            fitted, model = fits(cluster, work, args.train_images, args.kill_fit)
            rows += fitted
            (work / "images").mkdir()
            paths = casting_links(args.images, work / "images")
            for kill in (False, True):
                out = work / f"out-{kill}"
                rows.append(batch(cluster, model, paths, out, args.block_size, kill))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            cluster.stop()
    rows = [append_row(ROWS, {"bench": "cluster", "machine": machine(), **r}) for r in rows]
    if args.doc:
        write_all(rows)


if __name__ == "__main__":
    main()
