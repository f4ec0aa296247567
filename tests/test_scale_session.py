"""The end of a scale-out job reaps Ray's processes only: a Ray worker (a process named
``ray::...``) and what runs below it go, another child of the caller stays."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from patchcore.scale import session

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs Linux /proc")


def test_only_ray_processes_are_reaped(tmp_path):
    mine = subprocess.Popen(["sleep", "60"])  # the caller's own child: never touched
    worker = subprocess.Popen(  # named as Ray names its workers, with a child of its own
        ["bash", "-c", "exec -a 'ray::FakeActor' bash -c 'sleep 60 & wait'"]
    )
    try:
        deadline = time.monotonic() + 10
        found: set[int] = set()
        while len(found) < 2 and time.monotonic() < deadline:  # the worker and its sleep
            found = session._ray_processes(os.getpid(), str(tmp_path / "no-ray-here"))
            time.sleep(0.05)
        assert worker.pid in found and mine.pid not in found and len(found) == 2
        session._reap(found, 0.2)
        worker.wait(timeout=10)
        deadline = time.monotonic() + 5
        while any(session._alive(p) for p in found) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in found if session._alive(p)]
        assert mine.poll() is None  # still running
        # a process run from Ray's package folder (the raylet, the GCS, agents) counts too
        pkg = str(tmp_path / "site-packages" / "ray")
        agent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", pkg])
        try:
            deadline = time.monotonic() + 10
            while agent.pid not in session._ray_processes(os.getpid(), pkg):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert mine.pid not in session._ray_processes(os.getpid(), pkg)
        finally:
            agent.kill()
            agent.wait()
    finally:
        for p in (mine, worker):
            p.kill()
            p.wait()
