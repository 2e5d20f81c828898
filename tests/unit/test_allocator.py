"""screener/core/allocator.py on this machine's real glibc, in a child process (pytest's heap untouched)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from screener.core import allocator

CHILD = r"""
import sys
from screener.core.allocator import limit_arenas, release_free_memory

def rss_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

assert limit_arenas(2)
# 96 KiB blocks sit below glibc's mmap threshold, so they come from the heap; the last one kept pins the
# top of the heap, so freeing the others cannot shrink it by itself.
blocks = [bytearray(b"x" * (96 * 1024)) for _ in range(1500)]
keep = blocks[-1]
before = rss_kib()
del blocks
freed = rss_kib()
released = release_free_memory()
after = rss_kib()
print(before, freed, after, released)
"""


@pytest.mark.skipif(not allocator.available(), reason="the C library is not glibc")
def test_trim_gives_freed_heap_pages_back_to_the_system() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, check=True, timeout=60
    )
    before, freed, after, released = out.stdout.split()
    assert released == "True"
    # ~140 MiB was allocated; without the trim the freed pages stay resident.
    assert int(freed) > int(before) - 20 * 1024, (before, freed)
    assert int(after) < int(freed) - 100 * 1024, (freed, after)


def test_arena_limit_refuses_nonsense() -> None:
    assert allocator.limit_arenas(0) is False
