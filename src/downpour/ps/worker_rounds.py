"""Worker loops for the two policies that change who waits for whom or what is exchanged: ``sync`` and ``easgd``.

Both reuse :class:`~downpour.ps.worker.DownpourWorker` (its fetch, its push, its mini-batch step) and replace only
the loop:

- :class:`SyncWorker` (synchronous SGD with backup workers, Chen et al. 2016): fetch version ``v``; compute
  ``n_push`` gradients on it; push; wait until every shard has closed round ``v``
  (:meth:`~downpour.ps.sync_shard.SyncShard.close_round`); fetch ``v + 1``. A worker whose push came late finds the
  shard already past ``v``: its push was dropped, and it fetches the new version at once.
- :class:`ElasticWorker` (elastic averaging SGD, Zhang, Choromanska & LeCun 2015): the worker's parameters are its
  own ``x_i``, started at the center; it takes ``τ`` plain SGD steps (``x_i ← x_i − lr·g``), then exchanges with
  every shard (:meth:`~downpour.ps.shard.Shard.exchange`: ``d = α(x_i − x̃); x_i ← x_i − d; x̃ ← x̃ + d``,
  ``α = lr·rho``). One exchange is one push of the step budget.
"""

from __future__ import annotations

import time
from typing import Any

from downpour.ps.policies import EASGD
from downpour.ps.shard import LOST, PushResult
from downpour.ps.worker import DownpourWorker, PushRecord, refuse_whole

_POLL_SECONDS = 0.0005


class SyncWorker(DownpourWorker):
    """A replica under ``ps.policy = "sync"``: every gradient is computed on the version all workers share.

    Its shards must be :class:`~downpour.ps.sync_shard.SyncShard` s, and ``roster`` (the shared clocks the shards
    count live workers in) is retired when the worker ends. ``ps.n_fetch`` does not apply: the worker fetches once
    per round, after it closed.
    """

    def _run(self) -> None:
        s = self.settings
        versions = [0] * len(self.shards)
        accumulated, local, updates, batches = self._buffers()
        apply_lr = s.local_lr if s.local_apply else 0.0
        self._round: list[tuple[Any, PushResult, float]] = []  # this round's pushes, recorded once it closed
        while not self.should_stop():
            self._fetch(versions, local)
            loss_sum = sum(self._step(batches, accumulated, apply_lr=apply_lr) for _ in range(s.n_push))
            if not self.budget.reserve():
                break
            refuse_whole(accumulated, self.shards)
            self._push(updates, versions, local, loss_sum / s.n_push, then_fetch=False)
            if s.n_push > 1:
                accumulated.zero_()
            going_on = self._await_rounds(versions)
            self._record_round(versions)
            if not going_on:
                break

    def _push(self, updates: list[Any], versions: list[int], local: list[Any], loss: float, *,
              then_fetch: bool) -> None:  # fmt: skip
        """Push to every shard's round; the rows are written once the rounds have closed (:meth:`_record_round`):
        only then is it known whether a round's mean was applied."""
        self._round = [
            (shard, shard.push(update, versions[shard.index], self.worker_id), loss)
            for shard, update in zip(self.shards, updates, strict=True)
        ]
        self.pushes_ += 1

    def _record_round(self, versions: list[int]) -> None:
        """The push rows of the round just closed (or closed as the run stops): a push counts as applied when it
        was accepted into its round and the round's mean was applied (:meth:`SyncShard.round_applied`)."""
        for shard, result, loss in self._round:
            outcome = shard.round_applied(versions[shard.index]) if result.applied else None
            applied = outcome is True
            # 0, or a late, refused or repeated push's own; -1: its round's mean was refused; LOST: not known
            staleness = result.staleness if applied or not result.applied else -1 if outcome is False else LOST
            self.record(PushRecord(self.clock(), self.worker_id, shard.index, result.version, staleness, loss, applied))
        self._round = []

    def _await_rounds(self, versions: list[int]) -> bool:
        """Wait until every shard has closed the round this worker pushed to; False when the run is stopping
        (the open rounds are then closed with the pushes that arrived, so none is lost)."""
        waiting: list[Any] = list(self.shards)
        while True:
            stopping = self.should_stop()
            waiting = [shard for shard in waiting if not shard.close_round(versions[shard.index], force=stopping)]
            if stopping:
                return False
            if not waiting:
                return True
            time.sleep(_POLL_SECONDS)


class ElasticWorker(DownpourWorker):
    """A replica under ``ps.policy = "easgd"``: ``policy.tau`` local SGD steps, then the elastic exchange."""

    def __init__(self, *args: Any, policy: EASGD, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.policy = policy

    def _run(self) -> None:
        policy = self.policy
        versions = [0] * len(self.shards)
        _, local, _, batches = self._buffers()
        self._fetch(versions, local)  # x_i starts at the center
        while not self.should_stop():
            loss_sum = sum(self._step(batches, None, apply_lr=policy.lr) for _ in range(policy.tau))
            if not self.budget.reserve():
                break
            refuse_whole(self.flat.values, self.shards)  # every shard resets it to the center
            self.pushes_ += 1  # before any shard takes it: a snapshot never holds an exchange the count misses
            for shard, values in zip(self.shards, local, strict=True):
                result = shard.exchange(
                    values, alpha=policy.alpha, worker=self.worker_id, last_version=versions[shard.index]
                )
                versions[shard.index] = result.version
                self.record(
                    PushRecord(self.clock(), self.worker_id, shard.index, result.version, result.staleness,
                               loss_sum / policy.tau, result.applied)
                )  # fmt: skip
