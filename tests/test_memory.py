"""node.retain_memory: glibc keeps freed memory in the process for the next study."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from medsegagent.node.config import parse_config

# A fresh interpreter: the setting is process-wide and one-way, so it is tested where nothing else runs.
PROBE = textwrap.dedent(
    """
    import numpy as np
    from medsegagent.node.memory import resident_mb, retain_freed_memory

    if RETAIN:
        assert retain_freed_memory() and retain_freed_memory()  # applied, then idempotent
    array = np.ones((64, 1024, 1024), np.uint8)  # 64 MB: above glibc's largest mmap threshold (32 MB)
    held = resident_mb()
    del array
    print(held - resident_mb())
    """
)


def _freed_mb(retain: bool) -> float:
    code = f"RETAIN = {retain}\n" + PROBE
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return float(done.stdout.strip())


def test_freed_memory_stays_in_the_process_only_when_retained() -> None:
    # glibc's default gives a 64 MB array back to the kernel on free: the resident set drops by it.
    assert _freed_mb(retain=False) > 50
    # Retained, the pages stay resident for the next study's arrays.
    assert _freed_mb(retain=True) < 5


def test_retain_memory_is_on_by_default_and_can_be_turned_off() -> None:
    assert parse_config({}).node.retain_memory is True
    assert parse_config({"node": {"retain_memory": False}}).node.retain_memory is False
