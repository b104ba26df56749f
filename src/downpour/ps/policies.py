"""Consistency policies (``ps.policy``): how stale a push may be, and what the server does about it.

Six policies, each a small class with its math in a pure function on tensors (keyword-only hyperparameters), so
that it runs inside a shard, inside the simulator (:mod:`downpour.backends.sim`) and in a unit test alike:

- ``downpour``: apply every push as it comes, fully asynchronous (Dean et al. 2012);
- ``staleness-lr``: ``lr_eff = lr / max(1, staleness)`` (Zhang, Gupta, Lian, Liu 2016);
- ``dc-asgd``: ``g ← g + λ·g⊙g⊙(w_now − w_fetched)`` (Zheng et al. 2017);
- ``sync``: apply the mean of one push per worker once ``N − b`` have arrived (Chen et al. 2016);
- ``ssp``: a worker starts clock ``c`` only if ``c − min(clocks) ≤ s`` (Ho et al. 2013);
- ``easgd``: every τ local steps ``x_i ← x_i − α(x_i − x̃)``, ``x̃ ← x̃ + α(x_i − x̃)`` (Zhang, Choromanska,
  LeCun 2015).

The seam with the shard. A policy acts in one of two places:

* **On each push, before the server rule** (``downpour``, ``staleness-lr``, ``dc-asgd``): every policy has
  ``adjust(update, meta, *, values_now, values_fetched) -> Adjusted(update, lr_scale)``. It may replace the update
  and scale the rule's learning rate; it never writes the shard. :class:`PolicyRule` wraps any server rule
  (:class:`~downpour.ps.rules.SGD`, :class:`~downpour.ps.rules.Adagrad`) with a policy and is itself a
  :class:`~downpour.ps.rules.Rule`, so a :class:`~downpour.ps.shard.Shard` built with ``PolicyRule(rule, policy)``
  applies the policy with no other change. ``dc-asgd`` alone needs the values the worker fetched
  (``needs_fetched``): :class:`PolicyRule` takes them as the keyword ``fetched`` (the simulator, which applies
  every push through a :class:`PolicyRule`, passes its fetched copy; a real shard would receive them with the
  push or keep a per-worker backup, as in Zheng et al.).
* **Around the pushes** (``sync``, ``ssp``, ``easgd``): their ``adjust`` is the identity; what they change is who
  waits for whom (:class:`SyncAggregator`, :class:`ClockTable`) or what is exchanged (:func:`easgd_exchange`).
  A backend drives these objects; the simulator does so in simulated time, the local backend in worker processes
  (:class:`SyncAggregator` in shared memory inside each :class:`~downpour.ps.sync_shard.SyncShard`;
  :func:`easgd_exchange` inside :meth:`~downpour.ps.shard.Shard.exchange`), so both run the same arithmetic.
"""

from __future__ import annotations

import math
from typing import ClassVar, NamedTuple

import numpy as np
import torch
from torch import Tensor

from downpour.errors import ConfigError
from downpour.ps.rules import SGD, Adagrad, PushMeta, Rule, ShardState, adagrad, make_rule, sgd

POLICIES = ("downpour", "sync", "ssp", "staleness-lr", "dc-asgd", "easgd")
_AGG_VERSION, _AGG_DROPPED, _AGG_ARRIVED, _AGG_SUMMED, _AGG_CLOSED_SUMMED, _AGG_ORDER = range(6)  # its counters


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def staleness_lr(lr: float, *, staleness: int) -> float:
    """The staleness-aware learning rate ``lr / max(1, staleness)`` (Zhang, Gupta, Lian, Liu 2016)."""
    return lr / max(1, staleness)


def dc_asgd(
    update: Tensor, values_now: Tensor, values_fetched: Tensor, *, dc_lambda: float, out: Tensor | None = None
) -> Tensor:
    """Delay compensation ``g + λ·g⊙g⊙(w_now − w_fetched)`` (Zheng et al. 2017, DC-ASGD-c); written into ``out``.

    ``out`` may be ``update`` itself (in place) but not ``values_now`` or ``values_fetched``.
    """
    if out is None:
        out = torch.empty_like(update)
    if out is values_now or out is values_fetched:
        raise ValueError("dc_asgd: out must not alias values_now or values_fetched")
    if out is update:
        drift = values_now - values_fetched
        return out.addcmul_(drift.mul_(update), update, value=dc_lambda)
    torch.sub(values_now, values_fetched, out=out)  # w_now − w_fetched
    return out.mul_(update).mul_(update).mul_(dc_lambda).add_(update)


def easgd_exchange(local: Tensor, center: Tensor, *, alpha: float, scratch: Tensor | None = None) -> None:
    """The elastic exchange, in place on both: ``d = α(x_i − x̃); x_i ← x_i − d; x̃ ← x̃ + d`` (Zhang et al. 2015).

    ``alpha = lr·rho``. The worker moves toward the center and the center toward the worker by the same amount.
    """
    diff = torch.sub(local, center, out=scratch) if scratch is not None else local - center  # x_i − x̃
    local.sub_(diff, alpha=alpha)
    center.add_(diff, alpha=alpha)


def ssp_may_start(clock: int, min_clock: int, *, staleness_bound: int) -> bool:
    """Stale synchronous parallel: a worker may start clock ``c`` iff ``c − min(clocks) ≤ s`` (Ho et al. 2013)."""
    return clock - min_clock <= staleness_bound


# ---------------------------------------------------------------------------------------------------------------
# Validation helpers
# ---------------------------------------------------------------------------------------------------------------


def _finite_at_least(key: str, value: float, low: float, *, strict: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low)
    if not ok:
        raise ConfigError(f"invalid {key}: {value!r} (must be a finite number {'>' if strict else '>='} {low:g})")
    return float(value)


def _int_at_least(key: str, value: int, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"invalid {key}: {value!r} (must be an integer >= {low})")
    return value


# ---------------------------------------------------------------------------------------------------------------
# Policy objects
# ---------------------------------------------------------------------------------------------------------------


class Adjusted(NamedTuple):
    """What a policy makes of one push: the update the rule applies and a factor on the rule's learning rate."""

    update: Tensor
    lr_scale: float


class Policy:
    """Base: plain asynchronous application. ``adjust`` is the identity; subclasses override what they change."""

    name: ClassVar[str] = "downpour"
    needs_fetched: ClassVar[bool] = False  # True when ``adjust`` reads the values the worker fetched

    def adjust(
        self, update: Tensor, meta: PushMeta, *, values_now: Tensor, values_fetched: Tensor | None = None
    ) -> Adjusted:
        """The update and learning-rate factor the server rule should apply for this push."""
        return Adjusted(update, 1.0)

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.endswith("_"))
        return f"{type(self).__name__}({params})"


class Downpour(Policy):
    """Downpour SGD: every push is applied as it arrives, whatever its staleness (Dean et al., NIPS 2012)."""

    name = "downpour"


class StalenessLR(Policy):
    """Staleness-aware async SGD: ``lr_eff = lr / max(1, staleness)`` (Zhang, Gupta, Lian, Liu, IJCAI 2016)."""

    name = "staleness-lr"

    def adjust(
        self, update: Tensor, meta: PushMeta, *, values_now: Tensor, values_fetched: Tensor | None = None
    ) -> Adjusted:
        """Keep the update; divide the learning rate by the push's staleness (at least 1)."""
        return Adjusted(update, staleness_lr(1.0, staleness=meta.staleness))


class DCASGD(Policy):
    """Delay-compensated async SGD: ``g ← g + λ·g⊙g⊙(w_now − w_fetched)`` (Zheng et al., ICML 2017)."""

    name = "dc-asgd"
    needs_fetched = True

    def __init__(self, *, dc_lambda: float = 0.04) -> None:
        self.dc_lambda = _finite_at_least("ps.dc_lambda", dc_lambda, 0.0)

    def adjust(
        self, update: Tensor, meta: PushMeta, *, values_now: Tensor, values_fetched: Tensor | None = None
    ) -> Adjusted:
        """The compensated gradient (a new tensor; ``update`` is left alone)."""
        if values_fetched is None:
            raise ValueError("dc-asgd needs the values the worker fetched (values_fetched)")
        return Adjusted(dc_asgd(update, values_now, values_fetched, dc_lambda=self.dc_lambda), 1.0)


class Sync(Policy):
    """Synchronous SGD with backup workers: one push per worker per version, the mean applied once ``N − b`` have
    arrived, late pushes for an old version dropped (Chen, Pan, Monga, Bengio, Jozefowicz 2016)."""

    name = "sync"

    def __init__(self, *, workers: int, backup_workers: int = 0) -> None:
        self.workers = _int_at_least("cluster.workers", workers, 1)
        self.backup_workers = _int_at_least("ps.backup_workers", backup_workers, 0)
        if backup_workers >= workers:
            raise ConfigError(f"invalid ps.backup_workers: {backup_workers!r} (must be < cluster.workers = {workers})")

    @property
    def quorum(self) -> int:
        """Pushes that complete one version: ``N − b``."""
        return self.workers - self.backup_workers

    def aggregator(self, size: int, *, dtype: torch.dtype = torch.float32) -> SyncAggregator:
        """A fresh aggregator for ``size`` parameters."""
        return SyncAggregator(size, workers=self.workers, backup_workers=self.backup_workers, dtype=dtype)


class SSP(Policy):
    """Stale synchronous parallel: no worker more than ``staleness_bound`` clocks ahead of the slowest
    (Ho et al., NIPS 2013). Pushes are applied as they come, as in Downpour."""

    name = "ssp"

    def __init__(self, *, staleness_bound: int = 3) -> None:
        self.staleness_bound = _int_at_least("ps.staleness_bound", staleness_bound, 0)

    def clock_table(self, workers: int) -> ClockTable:
        """A fresh clock table for ``workers`` workers, all at clock 0."""
        return ClockTable(workers, staleness_bound=self.staleness_bound)


class EASGD(Policy):
    """Elastic averaging SGD: workers run local SGD and every ``tau`` steps exchange ``d = α(x_i − x̃)`` with the
    center, ``x_i ← x_i − d``, ``x̃ ← x̃ + d``, ``α = lr·rho`` (Zhang, Choromanska, LeCun, NIPS 2015)."""

    name = "easgd"

    def __init__(self, *, lr: float, rho: float = 5.0, tau: int = 4) -> None:
        self.lr = _finite_at_least("ps.lr", lr, 0.0, strict=True)
        self.rho = _finite_at_least("ps.easgd_rho", rho, 0.0, strict=True)
        self.tau = _int_at_least("ps.easgd_tau", tau, 1)
        if not self.alpha < 1.0:
            raise ConfigError(f"invalid ps.easgd_rho: {rho!r} (the moving rate α = ps.lr·ps.easgd_rho must be < 1)")

    @property
    def alpha(self) -> float:
        """The moving rate ``α = lr·rho``."""
        return self.lr * self.rho

    def exchange(self, local: Tensor, center: Tensor, *, scratch: Tensor | None = None) -> None:
        """One elastic exchange between a worker's ``local`` copy and the ``center``, both in place."""
        easgd_exchange(local, center, alpha=self.alpha, scratch=scratch)


# ---------------------------------------------------------------------------------------------------------------
# State that the coordination policies keep
# ---------------------------------------------------------------------------------------------------------------


class SyncAggregator:
    """Collects one push per worker for the current version and yields their mean once ``N − b`` have arrived.

    Holds one running sum, not one tensor per worker. A push for an older version is dropped and counted in
    ``dropped_``; a second push from the same worker for the same version is a bug and raises. All state lives in
    tensors (the sum, and the counters and arrivals in one ``int64`` tensor), so :meth:`share_memory_` lets worker
    processes share one aggregator (the local backend's :class:`~downpour.ps.sync_shard.SyncShard` does so, under
    its shard's lock); the simulator uses it in one process.
    """

    def __init__(self, size: int, *, workers: int, backup_workers: int = 0, dtype: torch.dtype = torch.float32) -> None:
        Sync(workers=workers, backup_workers=backup_workers)  # validates
        self.workers, self.backup_workers = workers, backup_workers
        self._sum = torch.zeros(size, dtype=dtype)
        # [version, dropped, arrived, summed, summed in the round closed last, arrival order (workers),
        #  arrived-this-round flag (workers)]
        self._ints = torch.zeros(_AGG_ORDER + 2 * workers, dtype=torch.int64)
        self._np: np.ndarray | None = None

    def _i(self) -> np.ndarray:
        if self._np is None:  # a NumPy view of the counters: cheap scalar reads and writes, shared when shared
            self._np = self._ints.numpy()
        return self._np

    def share_memory_(self) -> SyncAggregator:
        """Move the state into shared memory (before handing the aggregator to worker processes)."""
        self._sum.share_memory_()
        self._ints.share_memory_()
        self._np = None
        return self

    def __getstate__(self) -> dict[str, object]:
        state = self.__dict__.copy()
        state["_np"] = None  # a per-process view, rebuilt lazily
        return state

    @property
    def version_(self) -> int:
        """The version whose pushes are being collected (rounds closed so far)."""
        return int(self._i()[_AGG_VERSION])

    @property
    def dropped_(self) -> int:
        """Late pushes dropped so far."""
        return int(self._i()[_AGG_DROPPED])

    @property
    def pending(self) -> int:
        """Pushes that have arrived for the current version (rejected ones included)."""
        return int(self._i()[_AGG_ARRIVED])

    @property
    def closed_summed(self) -> int:
        """Finite pushes in the mean of the round closed last (0: every push of it was refused)."""
        return int(self._i()[_AGG_CLOSED_SUMMED])

    @property
    def arrived(self) -> tuple[int, ...]:
        """Workers whose push for the current version has arrived, in arrival order."""
        ints = self._i()
        return tuple(ints[_AGG_ORDER : _AGG_ORDER + int(ints[_AGG_ARRIVED])].tolist())

    def restore(self, *, version: int, dropped: int = 0) -> None:
        """Start collecting for ``version`` with ``dropped`` late pushes counted (on resume); no push pending."""
        ints = self._i()
        ints[:] = 0
        ints[_AGG_VERSION], ints[_AGG_DROPPED] = version, dropped

    def accepts(self, fetched_version: int) -> bool:
        """Whether a push computed on ``fetched_version`` still counts; a late one is counted as dropped."""
        ints = self._i()
        if fetched_version < ints[_AGG_VERSION]:
            ints[_AGG_DROPPED] += 1
            return False
        return True

    def add(
        self, update: Tensor | None, *, worker: int, fetched_version: int, quorum: int | None = None
    ) -> Tensor | None:
        """Add one push. Returns the mean ``(size,)`` when this push completes the quorum (the aggregator then
        collects for the next version), else None. Late pushes (``fetched_version`` older) are dropped: None.

        ``update=None`` is a push that arrived but was refused (NaN or Inf): it counts toward the quorum, so the
        round still closes, but not toward the mean. ``quorum`` (default ``N − b``) may be lowered by a backend
        whose workers have ended or died.
        """
        if not self.accepts(fetched_version):
            return None
        self.take(update, worker=worker, fetched_version=fetched_version)
        return self.close(self.workers - self.backup_workers if quorum is None else quorum)

    def take(self, update: Tensor | None, *, worker: int, fetched_version: int) -> None:
        """Add one push that :meth:`accepts` let through to the current version's sum, without closing the round
        (``update=None``: a refused push, counted toward the quorum only). The arrival is counted last, so a
        process killed before then leaves at most part of ``update`` in the sum, never a push counted twice."""
        ints = self._i()
        version = int(ints[_AGG_VERSION])
        if fetched_version > version:
            raise ValueError(f"push for version {fetched_version} while collecting version {version}")
        if not 0 <= worker < self.workers:
            raise ValueError(f"push from worker {worker}; this aggregator has workers 0..{self.workers - 1}")
        seen = _AGG_ORDER + self.workers + worker
        if ints[seen]:
            raise ValueError(f"worker {worker} pushed twice for version {version}")
        if update is not None:
            if ints[_AGG_SUMMED]:
                self._sum.add_(update)
            else:
                self._sum.copy_(update)
            ints[_AGG_SUMMED] += 1
        arrived = int(ints[_AGG_ARRIVED])
        ints[_AGG_ORDER + arrived] = worker
        ints[seen] = 1
        ints[_AGG_ARRIVED] = arrived + 1

    def close(self, quorum: int) -> Tensor | None:
        """Close the current version if at least ``max(1, quorum)`` pushes have arrived: return the mean of the
        accepted ones (zeros when every one was refused) and start the next version; else None."""
        mean = self.round_mean(quorum)
        if mean is not None:
            self.start_next()
        return mean

    def round_mean(self, quorum: int) -> Tensor | None:
        """The mean of the current version's accepted pushes (zeros when every one was refused) if at least
        ``max(1, quorum)`` have arrived, else None. Changes nothing: a shard applies the mean, commits, and only
        then calls :meth:`start_next`, so a process killed before its commit leaves the round whole."""
        ints = self._i()
        if int(ints[_AGG_ARRIVED]) < max(1, quorum):
            return None
        summed = int(ints[_AGG_SUMMED])
        return self._sum.div(summed) if summed else torch.zeros_like(self._sum)

    @property
    def summed(self) -> int:
        """Finite pushes in the current version's sum."""
        return int(self._i()[_AGG_SUMMED])

    def start_next(self) -> None:
        """End the current version's round and collect for the next one. The version is the last store, so a
        process killed before it leaves this round's version, which :meth:`catch_up` then moves past."""
        ints = self._i()
        ints[_AGG_CLOSED_SUMMED] = ints[_AGG_SUMMED]
        ints[_AGG_ORDER + self.workers :] = 0
        ints[_AGG_ARRIVED] = ints[_AGG_SUMMED] = 0
        ints[_AGG_VERSION] += 1

    def catch_up(self, version: int) -> None:
        """Collect for ``version`` if the aggregator is behind it, with no push pending: the rounds before it were
        closed and committed by a process that was killed before it could :meth:`start_next`."""
        ints = self._i()
        if int(ints[_AGG_VERSION]) < version:
            ints[_AGG_ORDER + self.workers :] = 0
            ints[_AGG_ARRIVED] = ints[_AGG_SUMMED] = 0
            ints[_AGG_VERSION] = version


class ClockTable:
    """SSP clocks: ``clocks[w]`` = iterations worker ``w`` has finished. A worker may start its next iteration
    (clock ``c = clocks[w]``) only if ``c − min(clocks) ≤ staleness_bound``; :meth:`advance` refuses to finish an
    iteration that could not have been started, so ``max − min ≤ staleness_bound + 1`` always holds."""

    def __init__(self, workers: int, *, staleness_bound: int) -> None:
        self.workers = _int_at_least("cluster.workers", workers, 1)
        self.staleness_bound = _int_at_least("ps.staleness_bound", staleness_bound, 0)
        self._clocks = [0] * workers
        self._at = {0: workers}  # how many workers sit at each clock value
        self._min = 0

    @property
    def clocks(self) -> np.ndarray:
        """A copy of every worker's clock, ``(workers,)``."""
        return np.asarray(self._clocks, dtype=np.int64)

    @property
    def min_clock(self) -> int:
        """The slowest worker's clock."""
        return self._min

    def clock(self, worker: int) -> int:
        """Worker ``worker``'s clock (iterations finished)."""
        return self._clocks[worker]

    def can_advance(self, worker: int) -> bool:
        """May ``worker`` start its next iteration now?"""
        return ssp_may_start(self._clocks[worker], self._min, staleness_bound=self.staleness_bound)

    def advance(self, worker: int) -> bool:
        """Record that ``worker`` finished its iteration; True when this raised the minimum clock.

        Raises RuntimeError when the worker was not allowed to start that iteration.
        """
        if not self.can_advance(worker):
            raise RuntimeError(
                f"SSP violation: worker {worker} at clock {self._clocks[worker]} is more than "
                f"{self.staleness_bound} ahead of the slowest (clock {self._min})"
            )
        c = self._clocks[worker]
        self._clocks[worker] = c + 1
        self._at[c + 1] = self._at.get(c + 1, 0) + 1
        left = self._at[c] - 1
        if left:
            self._at[c] = left
            return False
        del self._at[c]
        if c != self._min:
            return False
        self._min = c + 1  # nobody is left at c, and worker now sits at c + 1
        return True


# ---------------------------------------------------------------------------------------------------------------
# The seam with a shard: a server rule behind a policy
# ---------------------------------------------------------------------------------------------------------------


def apply_rule(
    rule: Rule, meta: PushMeta, update: Tensor, current: ShardState, out: ShardState, *, lr_scale: float = 1.0
) -> None:
    """Apply ``rule`` with its learning rate multiplied by ``lr_scale``.

    SGD and Adagrad get the exact scaled rate through their pure functions; any other rule gets ``lr_scale·update``
    (the same thing for a rule linear in the update).
    """
    if lr_scale == 1.0:
        rule(meta, update, current, out)
    elif isinstance(rule, SGD):
        sgd(current.values, update, lr=rule.lr * lr_scale, out=out.values)
    elif isinstance(rule, Adagrad):
        adagrad(
            current.values,
            current.state["sum_sq"],
            update,
            lr=rule.lr * lr_scale,
            eps=rule.eps,
            out=out.values,
            out_sum_sq=out.state["sum_sq"],
        )
    else:
        rule(meta, update * lr_scale, current, out)


class PolicyRule:
    """A server rule behind a push policy; a :class:`~downpour.ps.rules.Rule` that a shard can hold unchanged."""

    def __init__(self, rule: Rule, policy: Policy) -> None:
        self.rule, self.policy = rule, policy
        self.name = rule.name
        self.state_names = rule.state_names
        self.needs_fetched = policy.needs_fetched

    def __call__(
        self, meta: PushMeta, update: Tensor, current: ShardState, out: ShardState, *, fetched: Tensor | None = None
    ) -> None:
        """Let the policy adjust the push, then apply the rule (``fetched``: the worker's fetched values)."""
        adjusted = self.policy.adjust(update, meta, values_now=current.values, values_fetched=fetched)
        apply_rule(self.rule, meta, adjusted.update, current, out, lr_scale=adjusted.lr_scale)


def make_policy(
    name: str,
    *,
    workers: int = 1,
    lr: float = 0.02,
    staleness_bound: int = 3,
    backup_workers: int = 0,
    dc_lambda: float = 0.04,
    easgd_rho: float = 5.0,
    easgd_tau: int = 4,
) -> Policy:
    """The policy named by ``ps.policy``, built from the ``ps.*`` keys (and ``cluster.workers`` for ``sync``).

    ``name`` may carry its main parameter after a colon: ``ssp:4``, ``sync:1`` (backup workers),
    ``dc-asgd:0.1``, ``easgd:8`` (tau).
    """
    base, _, arg = name.partition(":")
    try:
        if base == "ssp" and arg:
            staleness_bound = int(arg)
        elif base == "sync" and arg:
            backup_workers = int(arg)
        elif base == "dc-asgd" and arg:
            dc_lambda = float(arg)
        elif base == "easgd" and arg:
            easgd_tau = int(arg)
        elif arg:
            raise ValueError(arg)
    except ValueError:
        raise ConfigError(f"invalid ps.policy: {name!r} (bad parameter after ':')") from None
    if base == "downpour":
        return Downpour()
    if base == "staleness-lr":
        return StalenessLR()
    if base == "dc-asgd":
        return DCASGD(dc_lambda=dc_lambda)
    if base == "sync":
        return Sync(workers=workers, backup_workers=backup_workers)
    if base == "ssp":
        return SSP(staleness_bound=staleness_bound)
    if base == "easgd":
        return EASGD(lr=lr, rho=easgd_rho, tau=easgd_tau)
    raise ConfigError(f"invalid ps.policy: {name!r} (choose one of {', '.join(POLICIES)})")


def config_policy(config: object, name: str | None = None) -> Policy:
    """The policy ``name`` (default ``ps.policy``) with the ``ps.*`` hyperparameters of a ``Config``."""
    ps, cluster = config.ps, config.cluster  # type: ignore[attr-defined]
    return make_policy(
        name or ps.policy, workers=cluster.workers, lr=ps.lr, staleness_bound=ps.staleness_bound,
        backup_workers=ps.backup_workers, dc_lambda=ps.dc_lambda, easgd_rho=ps.easgd_rho, easgd_tau=ps.easgd_tau,
    )  # fmt: skip


def policy_rule(config: object) -> Rule:
    """The server rule of a ``Config`` (``ps.rule``, ``ps.lr``) behind its push policy (``ps.policy``); the bare
    rule for ``downpour``."""
    ps = config.ps  # type: ignore[attr-defined]
    rule = make_rule(ps.rule, lr=ps.lr, adagrad_eps=ps.adagrad_eps)
    return rule if ps.policy == "downpour" else PolicyRule(rule, config_policy(config))
