"""Errors a user can cause and fix; the CLI prints them as one line and exits with status 2. Also
:func:`out_of_memory`, which tells a failed allocation (the input too large for this machine) from a bug, and
:func:`nests_too_deeply`, which tells a JSON or TOML text nested past Python's recursion limit from one."""

from __future__ import annotations

import re


class DownpourError(Exception):
    """Base of every error that is the input's fault, not a bug."""


class ConfigError(DownpourError, ValueError):
    """A config key, type or value is wrong; the message names the key and echoes the value."""


class CheckpointError(DownpourError):
    """A checkpoint is missing, corrupt, or belongs to another model or shape."""


class DataError(DownpourError):
    """A data source cannot be read or is too small for the requested split."""


# torch's allocators: "DefaultCPUAllocator: can't allocate memory: you tried to allocate N bytes", "not enough
# memory: you tried to allocate N bytes", CUDA's "out of memory" (torch.cuda.OutOfMemoryError is a RuntimeError);
# a shared-memory map: "Cannot allocate memory (12)"
_ALLOCATION_FAILED = re.compile(r"can't allocate memory|cannot allocate memory|not enough memory|out of memory", re.I)
_TRIED_BYTES = re.compile(r"tried to allocate (\d+) bytes")


# What a JSON or TOML text nested past Python's recursion limit (``[[[[...]]]]``, a few hundred deep) is told.
NESTS_TOO_DEEPLY = "nests too deeply to read (brackets within brackets past Python's recursion limit)"


def human_size(size: float) -> str:
    """``size`` bytes in the largest unit that keeps it at least 1: ``512 bytes``, ``16.0 KiB``, ``312.5 MiB``,
    ``2.6 GiB``."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:,.1f} {unit}"
    return f"{size:.0f} bytes"


def out_of_memory(exc: BaseException) -> str | None:
    """A few words on a failed allocation (``could not allocate 2.6 GiB``), or None when ``exc`` is not one: a
    :class:`MemoryError` (numpy's too) or torch's allocator failing (a RuntimeError)."""
    if not isinstance(exc, MemoryError | RuntimeError):
        return None
    text = str(exc)
    if not isinstance(exc, MemoryError) and not _ALLOCATION_FAILED.search(text):
        return None  # another RuntimeError: a bug, reported as one
    tried = _TRIED_BYTES.search(text)
    if tried:
        return f"could not allocate {human_size(int(tried.group(1)))}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else "an allocation failed"


def nests_too_deeply(exc: BaseException) -> bool:
    """Whether ``exc`` is the RecursionError of Python's JSON or TOML parser on a text nested past its recursion
    limit: the input's fault, not a bug (a RecursionError anywhere else is one)."""
    if not isinstance(exc, RecursionError):
        return False
    frame = exc.__traceback__
    while frame is not None:
        if frame.tb_frame.f_globals.get("__name__", "").partition(".")[0] in ("json", "tomllib"):
            return True
        frame = frame.tb_next
    return False
