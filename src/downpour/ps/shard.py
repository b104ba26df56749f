"""A parameter-server shard: a contiguous slice of the flat parameters, its version and its rule state.

The shard keeps two buffers of (values, rule state, version) and an index naming the live one. A push is computed
from the live buffer into the other one and then published by flipping the index, so no fetch ever sees half of an
update, and a process killed in the middle of a push leaves the shard exactly as it was. Pushes holding NaN or
Inf, or whose application would make a parameter NaN or Inf, are rejected, counted, and never applied.

The same class serves every backend: in one process it takes a ``threading.Lock``; the local backend gives it
shared-memory tensors and a :class:`~downpour.ps.locks.FileLock` so that worker processes push to it directly.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from downpour.errors import DownpourError
from downpour.ps.policies import easgd_exchange
from downpour.ps.rules import PushMeta, Rule, ShardState

_ACTIVE, _VERSION0, _VERSION1, _REJECTED = range(4)


def _call(hook: Callable[[], None] | None) -> None:
    """Run a push's ``on_commit`` hook, if it has one."""
    if hook is not None:
        hook()


LOST = -2  # the staleness of a push that reached no live shard (one that died or was restored from its checkpoint)


class PushResult(NamedTuple):
    """What happened to one push on one shard."""

    applied: bool
    staleness: int  # version at apply − version fetched (-1 when rejected; LOST when it reached no live shard)
    version: int  # the shard's version after this push


def all_finite(tensor: Tensor) -> bool:
    """Whether every value is finite. A NaN or Inf anywhere makes the float32 sum non-finite; so can an overflow
    of huge finite values, which the exact (slow) check then tells apart."""
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())


class ShardBusy(DownpourError):
    """A shard's lock stayed held longer than a reader would wait (:meth:`Shard.snapshot`)."""


class Shard:
    """Slice ``[start, stop)`` of the flat parameters with a version counter and a server-side update rule."""

    def __init__(
        self,
        index: int,
        start: int,
        initial: Tensor,
        rule: Rule,
        *,
        lock: AbstractContextManager[Any] | None = None,
        shared: bool = False,
    ) -> None:
        if initial.dim() != 1:
            raise ValueError(f"shard values must be 1-D, got shape {tuple(initial.shape)}")
        self.index, self.start, self.rule = index, start, rule
        self.size = initial.numel()
        self.lock = lock if lock is not None else threading.Lock()
        self._values = torch.zeros(2, self.size, dtype=torch.float32)  # (2 buffers, size)
        self._values[0].copy_(initial)
        self._state = {name: torch.zeros(2, self.size, dtype=torch.float32) for name in rule.state_names}
        self._meta = torch.zeros(4, dtype=torch.int64)  # active buffer, version of each buffer, rejected count
        if shared:
            self._values.share_memory_()
            for tensor in self._state.values():
                tensor.share_memory_()
            self._meta.share_memory_()
        self._meta_np: np.ndarray | None = None
        self._buffers: tuple[ShardState, ShardState] | None = None

    @classmethod
    def over(cls, index: int, start: int, rule: Rule, *, values: Tensor, state: dict[str, Tensor], meta: Tensor,
             lock: AbstractContextManager[Any]) -> Shard:  # fmt: skip
        """A shard over tensors that hold one already (e.g. a file that processes of one machine map): ``values``
        and each of ``rule.state_names`` in ``state`` ``(2, size)`` float32, ``meta`` ``(4,)`` int64; nothing is
        written, so a second process sees what the first one holds."""
        if values.dim() != 2 or values.shape[0] != 2 or values.dtype != torch.float32:
            raise ValueError(f"shard values must be (2, size) float32, got {tuple(values.shape)} {values.dtype}")
        if set(state) != set(rule.state_names) or meta.shape != (4,) or meta.dtype != torch.int64:
            raise ValueError(f"shard {index} needs state {rule.state_names} and a (4,) int64 meta")
        shard = cls.__new__(cls)
        shard.index, shard.start, shard.rule, shard.lock = index, start, rule, lock
        shard.size = values.shape[1]
        shard._values, shard._state, shard._meta = values, dict(state), meta
        shard._meta_np, shard._buffers = None, None
        return shard

    @property
    def stop(self) -> int:
        """End (exclusive) of this shard's slice of the flat parameters."""
        return self.start + self.size

    def _m(self) -> np.ndarray:
        if self._meta_np is None:  # a NumPy view of the shared counters: cheap scalar reads and writes
            self._meta_np = self._meta.numpy()
        return self._meta_np

    def _buffer(self, which: int) -> ShardState:
        if self._buffers is None:  # built once per process: views of the two halves
            self._buffers = tuple(  # type: ignore[assignment]
                ShardState(self._values[i], {name: t[i] for name, t in self._state.items()}) for i in (0, 1)
            )
        return self._buffers[which]  # type: ignore[index]

    @property
    def version(self) -> int:
        """Pushes applied so far."""
        with self.lock:
            meta = self._m()
            return int(meta[_VERSION0 + meta[_ACTIVE]])

    @property
    def rejected(self) -> int:
        """Pushes refused because they held NaN or Inf."""
        return int(self._m()[_REJECTED])

    @property
    def needs_fetched(self) -> bool:
        """Whether pushes must bring the values the worker computed at (``ps.policy = "dc-asgd"``)."""
        return bool(getattr(self.rule, "needs_fetched", False))

    def fetch_into(self, out: Tensor) -> int:
        """Copy the current values into ``out`` (shape ``(size,)``) and return their version."""
        with self.lock:
            meta = self._m()
            live = int(meta[_ACTIVE])
            out.copy_(self._buffer(live).values)
            return int(meta[_VERSION0 + live])

    def _finite_slice(self, tensor: Tensor, what: str) -> bool:
        """Check that ``tensor`` is ``(size,)`` (ValueError naming ``what`` otherwise); whether it is all finite."""
        if tensor.shape != (self.size,):
            raise ValueError(f"shard {self.index} expects {what} of shape ({self.size},), got {tuple(tensor.shape)}")
        return all_finite(tensor)

    def _check_had(self, version: int, seen: int, what: str) -> None:
        """ValueError unless ``seen`` is a version this shard has had, ``0 <= seen <= version`` (``version``: its
        current one): a version from the future or a negative one would fake the staleness. ``what`` names it."""
        if not 0 <= seen <= version:
            raise ValueError(
                f"shard {self.index}: {what} {seen}, but the shard is at version {version} (must be 0 to {version})"
            )

    def push(
        self,
        update: Tensor,
        fetched_version: int,
        worker: int = -1,
        *,
        fetch_into: Tensor | None = None,
        fetched_values: Tensor | None = None,
        on_commit: Callable[[], None] | None = None,
    ) -> PushResult:
        """Apply ``update`` (this shard's slice of a worker's accumulated gradient) with the shard's rule.

        With ``fetch_into``, also copy the resulting values there under the same lock (a push-pull, as in
        ps-lite and BytePS): the returned ``version`` is then the version of those values. ``fetched_values``:
        the values the worker computed its gradient at, for a rule that needs them (``ps.policy = "dc-asgd"``).
        ``fetched_version`` must be a version this shard has had, ``0 <= fetched_version <= version`` (ValueError
        otherwise, nothing applied): one from the future or a negative one would fake the staleness.
        ``on_commit``: called under the lock right before the push is committed or refused (the Ray backend's push
        stamp, :mod:`~downpour.backends.push_stamps`: a process killed before then has not counted the push).
        """
        finite = self._finite_slice(update, "an update")
        with self.lock:
            meta = self._m()
            live = int(meta[_ACTIVE])
            version = int(meta[_VERSION0 + live])
            self._check_had(version, fetched_version, "a push fetched at version")
            if not finite:
                _call(on_commit)
                meta[_REJECTED] += 1
                if fetch_into is not None:
                    fetch_into.copy_(self._buffer(live).values)
                return PushResult(False, -1, version)
            spare = 1 - live
            push_meta = PushMeta(worker=worker, fetched_version=fetched_version, version=version)
            out = self._buffer(spare)
            if getattr(self.rule, "needs_fetched", False):
                self.rule(push_meta, update, self._buffer(live), out, fetched=fetched_values)  # type: ignore[call-arg]
            else:
                self.rule(push_meta, update, self._buffer(live), out)
            if not all_finite(out.values):
                # A finite update that would overflow the parameters is refused too; the live buffer is untouched.
                _call(on_commit)
                meta[_REJECTED] += 1
                if fetch_into is not None:
                    fetch_into.copy_(self._buffer(live).values)
                return PushResult(False, -1, version)
            meta[_VERSION0 + spare] = version + 1
            _call(on_commit)
            meta[_ACTIVE] = spare  # the commit point: one aligned 8-byte store
            if fetch_into is not None:
                fetch_into.copy_(out.values)
            return PushResult(True, push_meta.staleness, version + 1)

    def exchange(self, local: Tensor, *, alpha: float, worker: int = -1, last_version: int = 0,
                 on_commit: Callable[[], None] | None = None) -> PushResult:  # fmt: skip
        """The elastic exchange of ``ps.policy = "easgd"`` with this shard's slice of a worker's own parameters
        ``local`` ``(size,)``: ``d = α(x_i − x̃); x_i ← x_i − d; x̃ ← x̃ + d`` (:func:`easgd_exchange`, Zhang,
        Choromanska & LeCun 2015), both in place; the shard holds the center ``x̃``.

        ``last_version``: the shard's version after this worker's previous exchange (the staleness counts the
        other workers' exchanges since); as :meth:`push`'s ``fetched_version``, it must be ``0 <= last_version <=
        version`` (ValueError otherwise, nothing exchanged). A ``local`` holding NaN or Inf is refused and reset to
        the center. ``on_commit`` as in :meth:`push`.
        """
        finite = self._finite_slice(local, "values")
        with self.lock:
            meta = self._m()
            live = int(meta[_ACTIVE])
            version = int(meta[_VERSION0 + live])
            self._check_had(version, last_version, "an exchange with last_version")
            current = self._buffer(live)
            if not finite:
                _call(on_commit)
                meta[_REJECTED] += 1
                local.copy_(current.values)  # a diverged worker starts again from the center
                return PushResult(False, -1, version)
            spare = 1 - live
            out = self._buffer(spare)
            out.values.copy_(current.values)
            for name, tensor in out.state.items():  # unused by easgd, kept consistent for checkpoints
                tensor.copy_(current.state[name])
            easgd_exchange(local, out.values, alpha=alpha)
            meta[_VERSION0 + spare] = version + 1
            _call(on_commit)
            meta[_ACTIVE] = spare  # the commit point
            return PushResult(True, version - last_version, version + 1)

    def snapshot(self, *, wait: float | None = None) -> dict[str, Any]:
        """A consistent copy of values, rule state, version and rejected count (for checkpoints). ``wait``: give up
        after this many seconds with :class:`ShardBusy` when a process holds the shard's lock that long (a worker
        stopped while it held it), instead of waiting forever."""
        with self._held(wait):
            return self._snapshot_locked()

    @contextlib.contextmanager
    def _held(self, wait: float | None) -> Iterator[None]:
        """The shard's lock, held; taken within ``wait`` seconds or :class:`ShardBusy` (None: however long)."""
        acquire = getattr(self.lock, "acquire_within", None)  # a FileLock; an in-process lock is never left held
        if wait is None or acquire is None:
            with self.lock:
                yield
            return
        if not acquire(wait):
            raise ShardBusy(f"shard {self.index} stayed locked for {wait:g} s: a worker holds it and does not let go "
                            "(stopped, or hung)")  # fmt: skip
        try:
            yield
        finally:
            self.lock.release()  # type: ignore[attr-defined]

    def _snapshot_locked(self) -> dict[str, Any]:
        meta = self._m()
        live = int(meta[_ACTIVE])
        return {
            "values": self._values[live].clone(),
            "state": {name: t[live].clone() for name, t in self._state.items()},
            "version": int(meta[_VERSION0 + live]),
            "rejected": int(meta[_REJECTED]),
        }

    def restore(self, snapshot: dict[str, Any]) -> None:
        """Load what :meth:`snapshot` returned (values, rule state, version, rejected count)."""
        values = snapshot["values"]
        if values.shape != (self.size,):
            raise ValueError(f"shard {self.index} holds {self.size} values, snapshot has {tuple(values.shape)}")
        with self.lock:
            meta = self._m()
            live = int(meta[_ACTIVE])
            self._values[live].copy_(values)
            for name, tensor in self._state.items():
                tensor[live].copy_(snapshot["state"][name])
            meta[_VERSION0 + live] = int(snapshot["version"])
            meta[_REJECTED] = int(snapshot["rejected"])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_meta_np"] = state["_buffers"] = None  # per-process views, rebuilt lazily
        return state
