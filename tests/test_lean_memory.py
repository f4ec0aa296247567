"""The allocator policy of the image pipeline (:mod:`patchcore.lean.memory`), each case in a
fresh process (the policy is set once per process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CHECK = """
import ctypes, numpy as np
from patchcore.lean import memory
from patchcore.lean.inputs import iter_batches
assert memory.keep_freed_memory.cache_info().currsize == 0
list(iter_batches([np.zeros((8, 8, 3), np.uint8)], batch_size=1, target_size=lambda h, w: (h, w)))
assert memory.keep_freed_memory.cache_info().currsize == 1  # the pipeline set it
print([memory.keep_freed_memory()])
"""


def _run(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", CHECK],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_pipeline_sets_the_policy_once_and_the_variable_turns_it_off() -> None:
    import platform

    on = _run({})
    if platform.libc_ver()[0] == "glibc":
        assert on == "[True]"
    else:  # no mallopt: nothing set, nothing broken
        assert on in ("[True]", "[False]")
    assert _run({"PATCHCORE_KEEP_FREED_MEMORY": "0"}) == "[False]"
