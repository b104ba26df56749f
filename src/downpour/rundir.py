"""The run directory: where a run's config, metrics, summary, checkpoint and pictures live."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from downpour.errors import DownpourError
from downpour.signals import process_gone

CONFIG = "config.toml"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint"
CHECKPOINT_STATE = "state.json"  # in CHECKPOINT: the step, the shards' versions, the files' digests
FILTERS = "filters.png"
WHITENING = "whitening.safetensors"

if TYPE_CHECKING:  # the CLI imports this module before torch: config errors must come back at once
    from torch import Tensor


LOCK = ".lock"


_LOCK_PATIENCE_SECONDS = 0.2  # a lock held only for a moment (another command's in_use check) is waited out


def _lock(out: Path) -> int:
    """A descriptor of ``out/.lock`` holding its lock, for a whole training session (a second driver on the same run
    directory is refused; closing the descriptor releases it): waits up to :data:`_LOCK_PATIENCE_SECONDS` for another
    holder, then refuses. A lock file that its holder removed while this waited (its run was refused: see
    :func:`claimed`) is not taken: it is opened again (FileNotFoundError once ``out`` is gone too)."""
    deadline = time.monotonic() + _LOCK_PATIENCE_SECONDS
    while True:
        fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if time.monotonic() >= deadline:
                raise DownpourError(f"run directory {out} is in use by another downpour process") from None
            time.sleep(0.01)
            continue
        held = os.fstat(fd)
        try:
            current = os.stat(out / LOCK)
        except FileNotFoundError:
            current = None
        if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
            return fd
        os.close(fd)  # a removed lock file: locking it would claim nothing


@contextlib.contextmanager
def claimed(out: Path) -> Iterator[None]:
    """Create ``out`` (and missing parents) and hold its lock (:func:`_lock`) for a training session, from before its
    data loads, so that a second command sees the run at once. When the session fails while ``out`` holds nothing
    but the lock, the directories this made are removed again: a refused run leaves nothing behind. (A driver that
    was waiting for the lock meanwhile makes the directory again.)"""
    for _ in range(10):
        made = [path for path in (out, *out.parents) if not path.exists()]  # the deepest first
        out.mkdir(parents=True, exist_ok=True)
        try:
            fd = _lock(out)
            break
        except FileNotFoundError as exc:  # removed by a run refused as this one waited for its lock
            missing = exc
            continue
    else:
        if out.is_dir():  # there all along: no file can be made in it (a folder of /proc, say), not a removal
            raise DownpourError(f"run directory {out} cannot hold a run: its lock file {out / LOCK} cannot be created "
                                f"({missing.strerror})")  # fmt: skip
        raise DownpourError(f"run directory {out} keeps disappearing: another process removes it")
    remove_dead_temporaries(out)
    try:
        yield
    except BaseException:
        if made and [path.name for path in out.iterdir()] == [LOCK]:
            (out / LOCK).unlink()
            for path in made:
                with contextlib.suppress(OSError):  # not empty (another process wrote there): kept
                    path.rmdir()
        raise
    finally:
        os.close(fd)


# safetensors' save_file writes into a temporary file of its own beside its target (".tmp" and 6 random characters)
# and renames it: a driver killed mid-write leaves that file, as large as the parameters, under this name
SAFETENSORS_TEMPORARY = ".tmp??????"


def remove_dead_temporaries(out: Path) -> int:
    """Remove the temporary files of atomic writes (:func:`atomic_write_text`, :func:`save_tensors`) that a driver
    killed mid-write (SIGKILL, the OOM killer) left in ``out`` and its checkpoint folder, which nothing else removed:
    ``.summary.json.tmp-PID`` and the like whose process is gone (a live one's, ``downpour report`` writing beside
    a session, is left alone), and safetensors' own (:data:`SAFETENSORS_TEMPORARY`: a whole parameters file or ZCA
    matrix each), which name no process: only a session writes safetensors there, and the caller holds ``out``'s
    lock, so any there are a dead session's. Nothing is removed from a folder that holds no run's config.toml
    (``--out`` may name a user's folder of other files: a session writes its config before any of these). Returns
    how many were removed."""
    removed = 0
    if not (out / CONFIG).is_file():
        return removed
    for folder in (out, out / CHECKPOINT):  # a checkpoint's save cut off before its state.json
        for path in folder.glob(".*.tmp-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or not process_gone(int(pid)):
                continue
            with contextlib.suppress(OSError):
                path.unlink()
                removed += 1
        for path in folder.glob(SAFETENSORS_TEMPORARY):
            if path.name[len(".tmp") :].isalnum() and path.is_file():
                with contextlib.suppress(OSError):
                    path.unlink()
                    removed += 1
    return removed


def in_use(out: Path) -> bool:
    """Whether another training session holds ``out/.lock`` now (see :func:`claimed`; a session in this process
    counts as another). The check takes the lock for a moment when it is free; :func:`_lock` waits that out."""
    try:
        fd = os.open(out / LOCK, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:  # no lock file: no session ever started there
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def not_resumable(out: Path, *, ours: bool = False) -> str:
    """Why ``out``, which holds no config file, cannot be resumed: a run still starting there (its driver holds the
    lock while it loads the data, before it writes the config), or no run at all. ``ours``: this process holds the
    lock itself (:func:`claimed`), so no other run can be starting there."""
    if (problem := _not_a_file(out / CONFIG)) is not None:  # there, but not as a file: not "no config.toml"
        return f"cannot resume {out}: {problem}"
    if not ours and in_use(out):
        return f"cannot resume {out}: it is in use by another downpour process (a run still starting: no {CONFIG} yet)"
    return f"cannot resume {out}: it holds no {CONFIG} (not a run directory)"


def config_missing(out: Path) -> str:
    """Why ``out`` has no readable config file, in a few words: "it holds no config.toml", or what stands there in
    its place (a directory, a broken link)."""
    return _not_a_file(out / CONFIG) or f"it holds no {CONFIG}"


def _not_a_file(path: Path) -> str | None:
    """What stands at ``path`` in place of a file, in a few words naming it (a directory, a link to nothing or in a
    loop, another kind of file), or None where a file or nothing is there."""
    if path.is_symlink() and not path.exists():
        try:
            target = os.readlink(path)
        except OSError:  # gone meanwhile
            return None
        return f"its {path.name} is a link to {target}, which leads to no file"
    if path.is_dir():
        return f"its {path.name} is a directory, not a file"
    if path.exists() and not path.is_file():
        return f"its {path.name} is not a regular file"
    return None


def _remove(tmp: Path) -> None:
    """Remove a temporary file if it is there; a failure to (its folder is gone or not one) must not hide the
    error that made the write fail."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path`` (no temporary file is left
    behind when either step fails)."""
    tmp = _temporary_beside(path)
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise _about(exc, path) from None
    except BaseException:
        _remove(tmp)
        raise


def _temporary_beside(path: Path) -> Path:
    """The temporary file that an atomic write of ``path`` renames over it. A path that names a directory (``.``,
    ``/``, ``..``, or one that exists) is refused as the rename would be: there is no file name to write."""
    if path.name in ("", "..") or path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "Is a directory (cannot write a file over it):", str(path))
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _about(exc: OSError, path: Path) -> OSError:
    """``exc`` told about the user's ``path`` rather than the temporary file beside it (a missing directory, a
    directory where the file should go, no permission)."""
    if path.is_dir():
        return IsADirectoryError(exc.errno, "Is a directory (cannot write a file over it):", str(path))
    if not path.parent.is_dir():
        return FileNotFoundError(exc.errno, f"No such directory {path.parent} to write into:", str(path))
    return type(exc)(exc.errno, exc.strerror, str(path))


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """Write tensors as safetensors, atomically and durably (temporary file, fsync, then rename)."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    tmp = _temporary_beside(path)
    try:
        save_file(tensors, str(tmp))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        _remove(tmp)
        raise _about(exc, path) from None
    except SafetensorError as exc:  # its own writer's I/O errors (a full disk): said as the OSError they are
        _remove(tmp)
        full = "No space left on device" in str(exc)
        raise OSError(errno.ENOSPC if full else errno.EIO, "No space left on device:" if full else
                      f"Could not write ({exc}):", str(path)) from None  # fmt: skip


def new_run_dir(root: Path = Path("runs")) -> Path:
    """Create and return ``runs/<timestamp>``, with a numeric suffix if that name is taken (a run refused before it
    writes anything there removes it again: :func:`remove_unused`)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    for suffix in range(1000):
        candidate = root / (stamp if suffix == 0 else f"{stamp}-{suffix}")
        try:
            candidate.mkdir()  # claims the name: two runs started in the same second get different directories
            return candidate
        except FileExistsError:
            continue
    raise DownpourError(f"could not make a new run directory under {root}")


def remove_unused(out: Path, *, root_too: bool = False) -> None:
    """Remove ``out`` if it holds nothing, or only a lock file no session holds (a run refused before it wrote
    anything), and with ``root_too`` its parent if that is left empty; anything else is kept."""
    try:
        if {path.name for path in out.iterdir()} <= {LOCK} and not in_use(out):
            (out / LOCK).unlink(missing_ok=True)
            out.rmdir()
            if root_too:
                out.parent.rmdir()
    except OSError:  # gone already, written meanwhile, or not ours to remove: kept
        pass


def fresh_path(path: Path) -> Path:
    """``path``, or ``path-2``, ``path-3``, ... if something is already there (a rerun never overwrites a run)."""
    candidate, index = path, 1
    while candidate.exists():
        index += 1
        candidate = path.with_name(f"{path.name}-{index}")
    return candidate


def json_safe(value: Any) -> Any:
    """JSON has no NaN or Inf: write them as null (recursively through dicts and lists)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def read_json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in the file at ``path``, or None where there is none to read: no file, an unreadable one, or
    text that holds no JSON object (:func:`json_object`)."""
    try:
        text = path.read_text()
    except (OSError, ValueError):  # ValueError: not UTF-8
        return None
    return json_object(text)


def json_object(text: str | bytes) -> dict[str, Any] | None:
    """The JSON object ``text`` holds (a file, or one row of ``metrics.jsonl``), or None: text that is no JSON (or
    nests past the parser's recursion limit, a RecursionError), or JSON that is no object."""
    try:
        payload = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return payload if isinstance(payload, dict) else None


def row_start(event: str) -> bytes:
    """How a ``metrics.jsonl`` row of ``event`` begins (:class:`MetricsLog` writes compact JSON, the event first):
    what a reader scanning the log for rows of one kind matches, before parsing only those."""
    return b'{"event":"' + event.encode() + b'"'


def json_text(value: Any) -> str:
    """``value`` as standard, indented JSON text (NaN and Inf as null: what ``--json`` prints)."""
    return json.dumps(json_safe(value), indent=2, default=str, allow_nan=False)


class MetricsLog:
    """``metrics.jsonl``: one JSON object per event, appended (a resumed run continues the same file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "a", buffering=1 << 16)  # noqa: SIM115 - closed by close()
        if _ends_mid_line(path):  # a killed driver's cut-off last row: this session's rows start on a line of their own
            self._handle.write("\n")

    def write(self, event: str, **fields: Any) -> None:
        """Append one event."""
        record = {"event": event, **{k: json_safe(v) for k, v in fields.items()}}
        self._handle.write(json.dumps(record, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        """Push buffered lines to the file."""
        self._handle.flush()

    def close(self) -> None:
        """Flush and close."""
        self._handle.close()


def _ends_mid_line(path: Path) -> bool:
    """Whether the file at ``path`` is not empty and its last byte is not a newline."""
    with open(path, "rb") as handle:
        if handle.seek(0, os.SEEK_END) == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` as indented JSON (NaN and Inf become null), atomically: a driver killed mid-write leaves the
    previous file, not a cut-off one."""
    atomic_write_text(path, json.dumps(json_safe(payload), indent=2, default=str) + "\n")
