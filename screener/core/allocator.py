"""The C heap of a long-running ``serve``: few malloc arenas, free pages handed back to the system.

glibc's malloc gives a thread that finds its arena locked a new arena, up to 8 per core, and an arena
keeps the pages of its busiest moment. In a daemon whose threads (associations, worker, settler, sender,
decoders) allocate image-sized buffers, contention on a loaded host therefore shows up as resident memory
that steps up and never comes down: the 2-hour soak stepped +47 MiB in serve when other jobs started on
its two cores, with 13 arena-sized mappings (RELIABILITY.md). Capping the arenas (``mallopt(M_ARENA_MAX)``,
the runtime form of ``MALLOC_ARENA_MAX``) and returning free pages now and then (``malloc_trim``) keeps the
resident size a measure of what is in use. Both are glibc functions: elsewhere (musl, macOS) these calls
report that they did nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from functools import cache

M_ARENA_MAX = -8  # glibc malloc.h: mallopt parameter for the arena limit


@cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (the only one with these controls), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    if not all(hasattr(libc, f) for f in ("gnu_get_libc_version", "mallopt", "malloc_trim")):
        return None
    libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.mallopt.restype = ctypes.c_int
    libc.malloc_trim.argtypes = [ctypes.c_size_t]
    libc.malloc_trim.restype = ctypes.c_int
    return libc


def available() -> bool:
    """True where the C library is glibc, so that :func:`limit_arenas` and :func:`release_free_memory` act."""
    return _glibc() is not None


def limit_arenas(max_arenas: int) -> bool:
    """Cap malloc arenas at ``max_arenas`` for threads that ask for one from now on.

    Call before the threads start. Returns False where the C library is not glibc or refused the value.
    """
    libc = _glibc()
    return libc is not None and max_arenas > 0 and libc.mallopt(M_ARENA_MAX, max_arenas) == 1


def release_free_memory() -> bool:
    """Hand free heap pages of every arena back to the system. True when glibc released any."""
    libc = _glibc()
    return libc is not None and libc.malloc_trim(0) == 1


class HeapTrimmer:
    """A daemon thread that calls :func:`release_free_memory` every ``interval`` seconds until stopped."""

    def __init__(self, interval: float, stop: threading.Event) -> None:
        self.interval = interval
        self._stop = stop
        self.thread = threading.Thread(target=self._run, name="heap-trim", daemon=True)

    def start(self) -> None:
        if self.interval > 0 and _glibc() is not None:
            self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            release_free_memory()
