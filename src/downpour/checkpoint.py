"""Checkpoints: shard values and rule state as safetensors, everything else as JSON; never pickle.

``checkpoint/state.json`` is the commit point. A save writes a new ``params-*.safetensors`` file, then replaces
``state.json`` (which names that file) with an atomic rename, then deletes the older parameter file. A process
killed at any moment leaves either the old checkpoint or the new one, never a mixture.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from downpour.errors import NESTS_TOO_DEEPLY, CheckpointError
from downpour.rundir import (
    CHECKPOINT_STATE,
    SAFETENSORS_TEMPORARY,
    atomic_write_text,
    read_json_object,
    save_tensors,
)

FORMAT = 1
STATE_FILE = CHECKPOINT_STATE
MAX_COUNT = 2**53  # versions, steps and counters above this are corrupt (and would overflow an int64 counter)


@dataclass
class Checkpoint:
    """What :func:`load` returns: the tensors by name and the JSON state."""

    tensors: dict[str, Tensor]
    state: dict[str, Any]

    def shard_snapshots(self) -> list[dict[str, Any]]:
        """Per-shard snapshots in the form :meth:`downpour.ps.shard.Shard.restore` takes."""
        snapshots = []
        for index, info in enumerate(self.state["shards"]):
            prefix = f"shard{index}."
            state = {
                k[len(prefix) + len("state.") :]: v for k, v in self.tensors.items() if k.startswith(prefix + "state.")
            }
            snapshots.append(
                {
                    "values": self.tensors[prefix + "values"],
                    "state": state,
                    "version": info["version"],
                    "rejected": info["rejected"],
                    "dropped": info.get("dropped", 0),  # late pushes of a sync shard (absent before sync ran locally)
                    **({"applied": info["applied"]} if "applied" in info else {}),  # a sync shard's applied pushes
                }
            )
        return snapshots


def save(directory: Path, snapshots: list[dict[str, Any]], state: dict[str, Any]) -> Path:
    """Write shard snapshots and ``state`` (JSON-serialisable) as a new checkpoint in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    shard_info = []
    for index, snap in enumerate(snapshots):
        tensors[f"shard{index}.values"] = snap["values"].contiguous()
        for name, tensor in snap["state"].items():
            tensors[f"shard{index}.state.{name}"] = tensor.contiguous()
        info = {"version": snap["version"], "rejected": snap["rejected"], "size": snap["values"].numel()}
        for key in ("dropped", "applied"):  # a sync shard's late pushes and applied pushes
            if key in snap:
                info[key] = snap[key]
        shard_info.append(info)
    serial = _next_serial(directory)
    params_name = f"params-{serial:08d}.safetensors"
    save_tensors(tensors, directory / params_name)
    full_state = {"format": FORMAT, **state, "shards": shard_info, "params_file": params_name,
                  "params_sha256": file_sha256(directory / params_name)}  # fmt: skip
    atomic_write_text(directory / STATE_FILE, json.dumps(full_state, indent=1))
    for stale in [*directory.glob("params-*.safetensors"), *directory.glob(".*.tmp-*"),
                  *directory.glob(SAFETENSORS_TEMPORARY)]:  # fmt: skip
        if stale.name != params_name:  # older parameters, and temporary files of an interrupted save (safetensors')
            stale.unlink(missing_ok=True)
    return directory / STATE_FILE


def file_sha256(path: Path) -> str:
    """The SHA-256 of the file at ``path``, in hex: recorded with each parameters file, checked when it is loaded (a
    flipped bit inside the tensors' data passes every other check)."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _next_serial(directory: Path) -> int:
    """One more than the largest ``params-N`` file present, so a new save never reuses a live name."""
    serials = []
    for path in directory.glob("params-*.safetensors"):
        try:
            serials.append(int(path.stem.rsplit("-", 1)[-1]))
        except ValueError:
            continue
    return max(serials, default=-1) + 1


_READS = 5  # how many times load reads a checkpoint that a running driver keeps replacing as it is read


def load(directory: Path) -> Checkpoint:
    """Read a checkpoint; a missing or corrupt one raises :class:`CheckpointError` naming the file (and the field).

    Checked here, so that nothing acts on a bad checkpoint: the JSON's structure and every shard's counters
    (non-negative integers), each shard's tensors (present, of its size) and that every tensor is finite.

    A run still training saves a new checkpoint every ``train.checkpoint_every`` seconds and deletes the parameters
    file that the previous ``state.json`` named: a read that loses its parameters file to such a save (``eval`` of
    a running run) reads the new checkpoint instead, where it was a "missing" error or an OSError before.
    """
    for _ in range(_READS - 1):
        before = _state_bytes(directory)
        try:
            return _load_once(directory)
        except (CheckpointError, OSError):
            if before is None or _state_bytes(directory) == before:
                raise  # no save committed meanwhile: the error is the checkpoint's own
    return _load_once(directory)


def _state_bytes(directory: Path) -> bytes | None:
    """The bytes of ``directory/state.json`` now (None where it cannot be read): what tells :func:`load` that a
    save committed a new checkpoint while it read."""
    try:
        return (directory / STATE_FILE).read_bytes()
    except OSError:
        return None


def _load_once(directory: Path) -> Checkpoint:
    """:func:`load`'s one read of the checkpoint in ``directory``."""
    state_path = directory / STATE_FILE
    if (problem := state_file_problem(directory)) is not None:
        raise CheckpointError(f"cannot read the checkpoint at {directory}: {problem}")
    if not state_path.exists():
        raise CheckpointError(f"no checkpoint at {directory} (missing {STATE_FILE})")
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint file {state_path}: {exc}") from None
    except RecursionError:
        raise CheckpointError(f"corrupt checkpoint file {state_path}: it {NESTS_TOO_DEEPLY}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT or "params_file" not in state:
        raise CheckpointError(f"{state_path} is not a downpour checkpoint (format {FORMAT})")
    require_objects(state, state_path, required=())
    count(state.get("step", 0), "step", state_path)
    params_name = state["params_file"]
    if not isinstance(params_name, str) or not params_name or Path(params_name).name != params_name:
        raise CheckpointError(f"corrupt checkpoint {state_path}: params_file must name a file, got {params_name!r}")
    shards = state.get("shards")
    if not isinstance(shards, list):
        raise CheckpointError(f"corrupt checkpoint {state_path}: shards must be a list, got {shards!r}")
    for index, info in enumerate(shards):
        if not isinstance(info, dict):
            raise CheckpointError(f"corrupt checkpoint {state_path}: shards[{index}] must be an object, got {info!r}")
        for key in ("version", "rejected", "size", *(key for key in ("dropped", "applied") if key in info)):
            count(info.get(key), f"shards[{index}].{key}", state_path)
    params_path = directory / params_name
    try:
        tensors = load_file(str(params_path))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint parameters missing: {params_path}") from None
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"corrupt checkpoint parameters {params_path}: {exc}") from None
    except RuntimeError as exc:  # torch's "unable to open file": removed as its tensors were mapped
        if not params_path.exists():
            raise CheckpointError(f"checkpoint parameters missing: {params_path}") from None
        raise CheckpointError(f"corrupt checkpoint parameters {params_path}: {exc}") from None
    for index, info in enumerate(shards):
        values = tensors.get(f"shard{index}.values")
        if values is None or values.numel() != info["size"]:
            raise CheckpointError(f"corrupt checkpoint {params_path}: shard {index} values missing or wrong size")
        for name, tensor in tensors.items():
            if name.startswith(f"shard{index}.state.") and tensor.shape != values.shape:
                raise CheckpointError(f"corrupt checkpoint {params_path}: {name} has shape {tuple(tensor.shape)}")
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise CheckpointError(f"corrupt checkpoint {params_path}: {name} holds {tensor.dtype}, not floats")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"checkpoint {params_path} holds NaN or Inf parameters ({name})")
    recorded = state.get("params_sha256")  # absent in checkpoints saved before 2026-11-28
    try:
        digest = file_sha256(params_path) if recorded is not None else None
    except FileNotFoundError:  # removed since its tensors were read (a running driver's next save)
        raise CheckpointError(f"checkpoint parameters missing: {params_path}") from None
    if recorded is not None and recorded != digest:
        raise CheckpointError(f"corrupt checkpoint parameters {params_path}: its contents are not those saved (their "
                              f"SHA-256 in {STATE_FILE} differs): changed or damaged since")  # fmt: skip
    return Checkpoint(tensors, state)


def state_file_problem(directory: Path) -> str | None:
    """What stands at ``directory/state.json`` in place of the file that commits a checkpoint, in a few words naming
    it (a directory, a link in a loop, a link to nothing), or None where a file or nothing is there: a checkpoint
    that is there but cannot be read is not reported as deleted or moved."""
    path = directory / STATE_FILE
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{path} is a link in a loop that never reaches a file"
        if os.path.islink(path):
            return f"{path} is a link to {os.readlink(path)}, which does not exist"
        return None  # nothing there (or its directory cannot be searched: the reader says so)
    if stat.S_ISDIR(mode):
        return f"{path} is a directory, not a file"
    return None if stat.S_ISREG(mode) else f"{path} is not a regular file"


OBJECTS = ("model", "config", "rng")  # the objects of state.json whose fields readers take


def require_objects(state: dict[str, Any], where: Path, *, required: tuple[str, ...] = OBJECTS) -> None:
    """The objects of ``state`` that readers take fields of are objects (those in ``required`` must be there;
    the others may be missing), and so are the config's sections that readers take fields of (``data``, ``train``,
    ``model``, ``ps``, ``cluster``; required when ``config`` is): else a :class:`CheckpointError`."""
    for name in OBJECTS:
        if (name in required or name in state) and not isinstance(state.get(name), dict):
            raise CheckpointError(f"corrupt checkpoint {where}: {name} must be an object, got {state.get(name)!r}")
    for section in ("data", "train", "model", "ps", "cluster") if isinstance(state.get("config"), dict) else ():
        value = state["config"].get(section)
        if (section in state["config"] or "config" in required) and not isinstance(value, dict):
            raise CheckpointError(f"corrupt checkpoint {where}: config.{section} must be an object, got {value!r}")


def _peek(directory: Path) -> dict[str, Any]:
    """The checkpoint's state as JSON, unchecked ({} when it cannot be read: :func:`load` reports that)."""
    return read_json_object(directory / STATE_FILE) or {}


def saved_diverged(directory: Path) -> dict[str, Any] | None:
    """The state of the checkpoint in ``directory`` when it says it was saved after training diverged (a first
    session's, with no earlier one to keep), else None; read before :func:`load`, whose checks (its NaN values)
    would otherwise speak first. A state that cannot be read is :func:`load`'s to report."""
    state = _peek(directory)
    return state if state.get("diverged") is True else None


def saved_backend(directory: Path) -> str | None:
    """The backend that wrote the checkpoint in ``directory``: a simulated one says so, others by their config
    (None when unreadable or not recorded)."""
    state = _peek(directory)
    cluster = state.get("config", {}).get("cluster") if isinstance(state.get("config"), dict) else None
    backend = state.get("backend") or (cluster.get("backend") if isinstance(cluster, dict) else None)
    return backend if isinstance(backend, str) else None


def count(value: Any, name: str, where: Path) -> int:
    """``value`` when it is an integer in ``[0, MAX_COUNT]`` (a version, step or counter); else a
    :class:`CheckpointError` naming ``name`` in the checkpoint file ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise CheckpointError(f"corrupt checkpoint {where}: {name} must be an integer from 0 to 2**53, got {value!r}")
    return value


def non_negative_float(value: Any, name: str, where: Path) -> float:
    """``value`` when it is a finite number >= 0 (seconds); else a :class:`CheckpointError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise CheckpointError(f"corrupt checkpoint {where}: {name} must be a finite number >= 0, got {value!r}")
    return float(value)
