"""A deterministic discrete-event simulation of N Downpour workers (``cluster.backend = "sim"``).

Model-agnostic: it runs on one flat parameter tensor, a server rule (:func:`~downpour.ps.rules.make_rule`), a
policy (:mod:`downpour.ps.policies`) and a gradient callable ``grad(params, worker, rng) -> (loss, grad)``
(:class:`ModelGradient` makes one from any model with ``loss(batch)``). Time is simulated; only the gradients are
real.

One worker's cycle: the server hands it the current parameters (a *fetch*, at simulated time ``t``); the
message takes a network delay, the worker computes for its compute time, the push takes another network delay and
arrives at the server, which applies it and hands back the new parameters at once (a push-pull, as the real
worker does). So one event per push: ``arrival = t + delay + compute + delay``. The gradient depends only on the
fetched parameters and a mini-batch, so it is computed when the push arrives, just before it is applied: an
in-flight worker holds one fetched copy and no gradient, and workers that fetched the same version share one copy
(all of them, under ``sync``).

Events sit in a heap keyed by ``(time, sequence number)``, so ties resolve in the order they were scheduled; all
randomness comes from NumPy generators seeded from ``settings.seed``: the mini-batches from ``default_rng(seed)``,
handed to every gradient call in event order (one stream; a generator per worker costs ~30 µs to create, as much
as the simulator's own work for a push), the durations from two streams of their own. The same seed gives
bit-identical parameters and records.

Policies: ``downpour``, ``staleness-lr`` and ``dc-asgd`` apply each push on arrival through
:class:`~downpour.ps.policies.PolicyRule` (the policy, then the server rule, into a spare buffer that becomes the
live one, as on a shard); ``ssp`` does too, but a
worker more than ``staleness_bound`` clocks ahead of the slowest waits (in simulated time) until it catches up;
``sync`` applies the mean once ``N − b`` pushes for the current version have arrived, the others waiting at the
barrier, and drops late pushes (without computing their gradient); ``easgd`` runs ``tau`` local SGD steps per
cycle (``policy.lr``) and then the elastic exchange with the center (the server rule is not used). The parameters
are one shard: every shard of a real server would see the same staleness here, since a push reaches all of them
at once.

A push whose update (or, under ``easgd``, local copy) holds NaN or Inf is rejected and counted, as by a real
shard, and so is a finite update whose result would overflow the parameters (under ``sync``: the round's mean).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor, nn

from downpour.data import worker_slice
from downpour.errors import ConfigError
from downpour.ps.flat import FlatParameters
from downpour.ps.policies import EASGD, SSP, Policy, PolicyRule, Sync, SyncAggregator, apply_rule
from downpour.ps.rules import PushMeta, Rule, ShardState
from downpour.ps.shard import all_finite
from downpour.ps.staleness import StalenessHistogram

GradFn = Callable[[Tensor, int, np.random.Generator], tuple[float, Tensor]]
"""``grad(params, worker, rng) -> (loss, grad)``. ``params`` must not be modified; the returned gradient is used
before the next call, so it may be a buffer that the callable reuses."""

_BLOCK = 4096  # random durations are drawn in blocks of this many
MAX_SIGMA = 4.0
"""The largest ``compute_sigma`` / ``network_sigma``. A lognormal's mean rests on its rare long draws, and beyond
σ = 4 too few of them ever occur: a million factors ``exp(σz − σ²/2)`` average 0.99 at σ = 3, 0.85 at σ = 4, 0.49 at
σ = 5 and 0.001 at σ = 8, so a run's durations would fall far short of the mean asked for; from σ ≈ 40 nearly every
draw underflows to 0 s (simulated time stands still, and a ``train.seconds`` budget is never reached), and near
the largest floats (σ = 1e308) draws are NaN (the heap's order breaks and the run ends after a few pushes, silently)."""
RoundPushes = list[tuple[int, int, float, bool]]  # a sync round's pushes: (worker, fetched version, loss, finite)


@dataclass(frozen=True)
class SimSettings:
    """The simulated cluster (each field is ``cluster.sim_<field>``, except ``workers``, ``steps``, ``seconds``,
    ``seed``, which come from ``cluster.workers``, ``train.steps``, ``train.seconds``, ``train.seed``)."""

    workers: int = 8
    steps: int = 1000  # pushes to simulate (applied, rejected or dropped); 0 = no limit
    seconds: float = 0.0  # simulated seconds; 0 = no limit
    compute_mean: float = 1.0  # mean simulated seconds per gradient
    compute_sigma: float = 0.0  # 0: constant; > 0: lognormal with this sigma (of the log), same mean; <= MAX_SIGMA
    stragglers: float = 0.0  # fraction of workers (chosen at random) slower; rounded half up, at least 1 if > 0
    straggler_slowdown: float = 1.0  # how many times slower the stragglers compute
    network_mean: float = 0.0  # mean one-way delay of a message (fetch or push)
    network_sigma: float = 0.0  # 0: constant; > 0: lognormal; <= MAX_SIGMA
    seed: int = 0

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first bad key."""
        checks = [
            ("cluster.workers", self.workers, isinstance(self.workers, int) and self.workers >= 1, "must be >= 1"),
            ("train.steps", self.steps, isinstance(self.steps, int) and self.steps >= 0, "must be >= 0"),
            ("train.seconds", self.seconds, math.isfinite(self.seconds) and self.seconds >= 0, "must be >= 0"),
            ("train.steps", self.steps, self.steps > 0 or self.seconds > 0, "set train.steps or train.seconds"),
            ("cluster.sim_compute_mean", self.compute_mean, _positive(self.compute_mean), "must be > 0"),
            ("cluster.sim_compute_sigma", self.compute_sigma, _sigma(self.compute_sigma), _SIGMA_RANGE),
            ("cluster.sim_stragglers", self.stragglers, 0 <= self.stragglers <= 1, "must be in [0, 1]"),
            (
                "cluster.sim_straggler_slowdown",
                self.straggler_slowdown,
                math.isfinite(self.straggler_slowdown) and self.straggler_slowdown >= 1,
                "must be >= 1",
            ),
            ("cluster.sim_network_mean", self.network_mean, _nonneg(self.network_mean), "must be >= 0"),
            ("cluster.sim_network_sigma", self.network_sigma, _sigma(self.network_sigma), _SIGMA_RANGE),
            (
                "cluster.sim_compute_mean",
                self.compute_mean,
                math.isfinite(self.compute_mean * self.straggler_slowdown + 2.0 * self.network_mean),
                "the slowest worker's mean cycle, compute_mean × straggler_slowdown + 2 × network_mean, must be finite",
            ),
            ("train.seed", self.seed, isinstance(self.seed, int) and self.seed >= 0, "must be >= 0"),
        ]
        for key, value, ok, what in checks:
            if not ok:
                raise ConfigError(f"invalid {key}: {value!r} ({what})")


def _positive(x: float) -> bool:
    return math.isfinite(x) and x > 0


def _nonneg(x: float) -> bool:
    return math.isfinite(x) and x >= 0


def _sigma(x: float) -> bool:
    return _nonneg(x) and x <= MAX_SIGMA


_SIGMA_RANGE = (f"must be in [0, {MAX_SIGMA:g}]: beyond that a lognormal's mean rests on draws too rare to occur, "
                "and the simulated durations fall far short of it")  # fmt: skip


@dataclass
class SimRecords:
    """One row per push, in the order the server handled them (columns of equal length)."""

    t: np.ndarray  # float64: simulated time the server applied (or dropped/rejected) the push
    worker: np.ndarray  # int64
    version: np.ndarray  # int64: the server's version after the push
    fetched_version: np.ndarray  # int64: the version the worker computed on
    staleness: np.ndarray  # int64: version at apply − fetched_version; -1 when rejected
    loss: np.ndarray  # float64: mini-batch loss (mean over tau local steps under easgd; NaN when dropped)
    applied: np.ndarray  # bool
    fetched_t: np.ndarray  # float64: simulated time the worker fetched

    def __len__(self) -> int:
        return len(self.t)

    def equals(self, other: SimRecords) -> bool:
        """Bit-for-bit equality of every column (NaN equal to NaN)."""
        return all(
            np.array_equal(
                getattr(self, f.name), getattr(other, f.name), equal_nan=f.name in ("t", "loss", "fetched_t")
            )
            for f in fields(self)
        )


@dataclass
class SimResult:
    """What a simulated run produced."""

    params: Tensor  # (P,) the server's final parameters (the center, under easgd)
    records: SimRecords
    sim_time: float  # simulated seconds at the last push handled
    grad_evals: int  # calls of the gradient callable
    rejected: int  # pushes refused for NaN / Inf
    dropped: int  # late pushes dropped by sync with backup workers
    stragglers: np.ndarray  # indices of the slow workers
    peak_copies: int  # most fetched copies of the parameters held at once (at most one per in-flight worker)
    rule_state: dict[str, Tensor] = field(default_factory=dict)  # the server rule's state (Adagrad's sum of g²)

    def staleness_histogram(self) -> StalenessHistogram:
        """Staleness of every applied push."""
        histogram = StalenessHistogram()
        histogram.add(self.records.staleness[self.records.applied])
        return histogram


def parameter_copies(policy: Policy, settings: SimSettings) -> int:
    """The copies of the parameters a simulation of ``settings`` under ``policy`` comes to hold at once, its memory
    being this many times the parameters' size: the live and the spare buffer, and the workers' own, which grow with
    ``settings.workers``: a fetched copy per version in flight under the asynchronous policies (every push makes a
    version that only its worker fetches, so once each worker has pushed, nearly every worker holds its own; at
    most ``steps + 1`` versions in a run of ``steps`` pushes), one shared copy under ``sync``, and a local copy
    per worker under ``easgd`` (all allocated at the start)."""
    workers = settings.workers
    if isinstance(policy, Sync):
        own = 1
    elif isinstance(policy, EASGD):
        own = workers + 1  # the local copies and the exchange's scratch
    else:
        own = min(workers, settings.steps + 1) if settings.steps else workers
    return 2 + own


def _lognormal_factors(rng: np.random.Generator, sigma: float) -> Iterator[float]:
    """Endless factors of mean 1: ``exp(σz − σ²/2)``, drawn in blocks."""
    while True:
        yield from np.exp(sigma * rng.standard_normal(_BLOCK) - 0.5 * sigma * sigma).tolist()


class WorkerBatches:
    """Mini-batches for a ``grad`` callable: ``batch_size`` examples drawn with replacement from the worker's
    examples (its disjoint :func:`~downpour.data.worker_slice` when ``workers`` is given, else all of them)."""

    def __init__(self, examples: Tensor, *, batch_size: int, workers: int | None = None) -> None:
        if batch_size < 1:
            raise ConfigError(f"invalid train.batch_size: {batch_size!r} (must be at least 1)")
        self.examples, self.batch_size, self.workers = examples, batch_size, workers
        self._bounds: dict[int, tuple[int, int]] = {}

    def _range(self, worker: int) -> tuple[int, int]:
        bounds = self._bounds.get(worker)
        if bounds is None:
            count = self.examples.shape[0]
            part = worker_slice(count, self.workers, worker) if self.workers else slice(0, count)
            bounds = self._bounds[worker] = (part.start, part.stop)
        return bounds

    def draw(self, worker: int, rng: np.random.Generator) -> Tensor:
        """One mini-batch ``(B, ...)`` of ``worker``'s examples."""
        low, high = self._range(worker)
        index = torch.from_numpy(rng.integers(low, high, size=self.batch_size))
        return self.examples.index_select(0, index)


class ModelGradient:
    """``grad(params, worker, rng)`` for any model with ``loss(batch)``, through :class:`FlatParameters`.

    Each call copies ``params`` into the model, draws a mini-batch (:class:`WorkerBatches`) and returns the loss and
    the flat gradient buffer (reused by the next call).
    """

    def __init__(self, model: nn.Module, examples: Tensor, *, batch_size: int, workers: int | None = None) -> None:
        self.batches = WorkerBatches(examples, batch_size=batch_size, workers=workers)
        self.model = model
        self.flat = FlatParameters(model)

    def __call__(self, params: Tensor, worker: int, rng: np.random.Generator) -> tuple[float, Tensor]:
        """The mini-batch loss at ``params`` and its gradient ``(P,)``."""
        flat = self.flat
        flat.values.copy_(params)
        flat.zero_grad()
        loss = self.model.loss(self.batches.draw(worker, rng))  # batch (B, D)
        loss.backward()
        return float(loss.detach()), flat.grads


class _Snapshots:
    """Fetched copies of the parameters, one per version in flight, shared by the workers that fetched it."""

    def __init__(self) -> None:
        self._held: dict[int, list] = {}  # version -> [tensor, holders]
        self._pool: list[Tensor] = []
        self.peak = 0

    def take(self, version: int, params: Tensor) -> None:
        held = self._held.get(version)
        if held is not None:
            held[1] += 1
            return
        copy = self._pool.pop().copy_(params) if self._pool else params.clone()
        self._held[version] = [copy, 1]
        self.peak = max(self.peak, len(self._held))

    def get(self, version: int) -> Tensor:
        return self._held[version][0]

    def release(self, version: int) -> None:
        held = self._held[version]
        held[1] -= 1
        if not held[1]:
            del self._held[version]
            self._pool.append(held[0])


class Simulation:
    """N simulated workers training ``params`` through one server; :meth:`run` returns a :class:`SimResult`."""

    def __init__(
        self,
        params: Tensor,
        rule: Rule,
        policy: Policy,
        grad: GradFn,
        settings: SimSettings,
        *,
        observe: Callable[[float, int, Tensor], None] | None = None,
        observe_every: int = 0,
        stop: Callable[[], bool] | None = None,
    ) -> None:
        settings.validate()
        if params.dim() != 1:
            raise ValueError(f"params must be a flat (P,) tensor, got shape {tuple(params.shape)}")
        if isinstance(policy, Sync) and policy.workers != settings.workers:
            raise ConfigError(
                f"invalid cluster.workers: {settings.workers} (the sync policy was built for {policy.workers})"
            )
        self.rule, self.policy, self.grad, self.settings = rule, policy, grad, settings
        self.observe, self.observe_every, self.stop = observe, observe_every, stop
        self.params = params.detach().clone()
        self.state = ShardState(self.params, {name: torch.zeros_like(self.params) for name in rule.state_names})
        # the rule writes into a spare buffer, published only when its values are finite, as on a real shard
        self._spare = ShardState(torch.empty_like(self.params), {name: torch.empty_like(self.params)
                                                                 for name in rule.state_names})  # fmt: skip
        self.version = 0
        self.grad_evals = self.rejected = self.dropped = 0
        n, s = settings.workers, settings
        self.rng = np.random.default_rng(s.seed)  # the mini-batch stream, passed to every gradient call
        timing = np.random.default_rng(np.random.SeedSequence([s.seed, 1]))
        # rounded half up, of the fraction as written (Python's round() took 0.5 and 2.5 to the even 0 and 2, and
        # 0.58 × 25 is 14.4999… in floats), and at least one when it is above 0: 0.1 of 4 must not silently mean none
        count = max(math.floor(Fraction(repr(s.stragglers)) * n + Fraction(1, 2)), 1 if s.stragglers > 0 else 0)
        self.stragglers = np.sort(timing.choice(n, size=count, replace=False)) if count else np.zeros(0, np.int64)
        self._means = [s.compute_mean] * n
        for w in self.stragglers.tolist():
            self._means[w] = s.compute_mean * s.straggler_slowdown
        compute_rng, network_rng = timing.spawn(2)
        self._compute = _lognormal_factors(compute_rng, s.compute_sigma) if s.compute_sigma > 0 else None
        lognormal_network = s.network_sigma > 0 and s.network_mean > 0
        self._network = _lognormal_factors(network_rng, s.network_sigma) if lognormal_network else None
        self._two_delays = 2.0 * s.network_mean
        self._stop_at = s.steps or math.inf
        self._until = s.seconds or math.inf
        self._observe_every = observe_every if observe is not None else 0
        self._heap: list[tuple[float, int, int]] = []
        self._seq = 0
        self._fetched_version = [0] * n
        self._fetched_t = [0.0] * n
        self._snapshots = _Snapshots()
        self._cols: tuple[list, ...] = ([], [], [], [], [], [], [], [])  # SimRecords' columns, in field order
        self._appends = tuple(col.append for col in self._cols)

    # -- building blocks -------------------------------------------------------------------------------------

    def _cycle(self, worker: int, computes: int = 1) -> float:
        """Simulated seconds from a fetch to the arrival of the push: delay + compute(s) + delay."""
        mean, compute, network = self._means[worker], self._compute, self._network
        if compute is None:
            busy = mean * computes
        elif computes == 1:
            busy = mean * next(compute)
        else:
            busy = mean * sum(next(compute) for _ in range(computes))
        if network is None:
            return busy + self._two_delays
        return busy + self.settings.network_mean * (next(network) + next(network))

    def _schedule(self, worker: int, t: float, computes: int = 1) -> None:
        heapq.heappush(self._heap, (t + self._cycle(worker, computes), self._seq, worker))
        self._seq += 1

    def _start(self, worker: int, t: float) -> None:
        """Hand ``worker`` the current parameters at time ``t`` and schedule its push."""
        self._snapshots.take(self.version, self.params)
        self._fetched_version[worker] = self.version
        self._fetched_t[worker] = t
        self._schedule(worker, t)

    def _record(self, t: float, w: int, fetched: int, staleness: int, loss: float, applied: bool) -> bool:
        """Append one row; True when the run should stop (step budget reached)."""
        a_t, a_w, a_version, a_fetched, a_staleness, a_loss, a_applied, a_fetched_t = self._appends
        a_t(t)
        a_w(w)
        a_version(self.version)
        a_fetched(fetched)
        a_staleness(staleness)
        a_loss(loss)
        a_applied(applied)
        a_fetched_t(self._fetched_t[w])
        n = len(self._cols[0])
        if self._observe_every and n % self._observe_every == 0:
            self.observe(t, n, self.params)  # type: ignore[misc]
        return n >= self._stop_at or (self.stop is not None and self.stop())

    def _publish(self) -> bool:
        """Make the spare buffer the rule just wrote the live one, as a real shard publishes, unless a value in it
        is NaN or Inf (a finite update can overflow): then the push (or round) is refused and the values stay."""
        if not all_finite(self._spare.values):
            return False
        self.state, self._spare = self._spare, self.state
        self.params = self.state.values
        return True

    def _pop(self) -> tuple[float, int] | None:
        """The next event ``(time, worker)``, or None when the simulated-time budget is spent (a push that arrives
        at exactly ``train.seconds`` still counts: the budget is inclusive)."""
        if not self._heap:
            return None
        t, _, w = heapq.heappop(self._heap)
        return (t, w) if t <= self._until else None

    # -- the three event loops -------------------------------------------------------------------------------

    def _run_async(self) -> float:
        """downpour, staleness-lr, dc-asgd and ssp: each push applied on arrival."""
        policy, grad, rng = self.policy, self.grad, self.rng
        server_rule = PolicyRule(self.rule, policy)  # what a real shard would hold
        table = policy.clock_table(self.settings.workers) if isinstance(policy, SSP) else None
        waiting: list[int] = []
        snapshots, fetched_version = self._snapshots, self._fetched_version
        for w in range(self.settings.workers):
            self._start(w, 0.0)
        t = 0.0
        while (event := self._pop()) is not None:
            t, w = event
            fetched = fetched_version[w]
            snap = snapshots.get(fetched)
            loss, update = grad(snap, w, rng)
            self.grad_evals += 1
            meta = PushMeta(w, fetched, self.version)
            finite = all_finite(update)
            if finite:
                server_rule(meta, update, self.state, self._spare, fetched=snap)
            if finite and self._publish():
                self.version += 1
                stop = self._record(t, w, fetched, meta.staleness, loss, True)
            else:
                self.rejected += 1
                stop = self._record(t, w, fetched, -1, loss, False)
            snapshots.release(fetched)
            if stop:
                break
            if table is None:
                self._start(w, t)
                continue
            raised_min = table.advance(w)
            if table.can_advance(w):
                self._start(w, t)
            else:
                waiting.append(w)
            if raised_min and waiting:
                still = []
                for u in waiting:
                    if table.can_advance(u):
                        self._start(u, t)
                    else:
                        still.append(u)
                waiting = still
        return t

    def _run_sync(self) -> float:
        """sync: the mean of one push per worker, once N − b have arrived; late pushes dropped. As on a real shard, a
        push holding NaN or Inf is rejected but counts toward the round, and a round whose mean the rule refuses
        rejects its pushes; when ``train.steps`` (or the simulated time) runs out mid-round, the round closes with
        the pushes that arrived, so that exactly ``train.steps`` pushes are recorded."""
        policy = self.policy
        assert isinstance(policy, Sync)
        aggregator = policy.aggregator(self.params.numel(), dtype=self.params.dtype)
        rounds = [0] * self.settings.workers  # the aggregator round each worker fetched in
        pending: RoundPushes = []
        snapshots = self._snapshots
        for w in range(self.settings.workers):
            self._start(w, 0.0)
        t = 0.0
        while (event := self._pop()) is not None:
            t, w = event
            fetched = self._fetched_version[w]
            if not aggregator.accepts(rounds[w]):
                self.dropped = aggregator.dropped_
                snapshots.release(fetched)
                stop = self._record(t, w, fetched, self.version - fetched, math.nan, False)
                if stop or self._budget_reached(pending):  # the round's pushes are recorded too
                    self._close_cut_short(t, aggregator, pending)
                    break
                rounds[w] = aggregator.version_
                self._start(w, t)
                continue
            loss, update = self.grad(snapshots.get(fetched), w, self.rng)
            self.grad_evals += 1
            snapshots.release(fetched)
            finite = all_finite(update)
            self.rejected += not finite
            mean = aggregator.add(update if finite else None, worker=w, fetched_version=rounds[w])
            pending.append((w, fetched, loss, finite))
            if mean is None and self._budget_reached(pending):
                mean = aggregator.close(1)  # the step budget ends mid-round: it closes with the pushes that arrived
            if mean is None:
                continue  # waits at the barrier
            if self._close_round(t, mean, pending):
                break
            for u, *_ in pending:
                rounds[u] = aggregator.version_
                self._start(u, t)
            pending.clear()
        else:  # the time ran out mid-round
            self._close_cut_short(t, aggregator, pending)
        return t

    def _budget_reached(self, pending: RoundPushes) -> bool:
        """Whether the pushes recorded and those of the open round reach the step budget."""
        return len(self._cols[0]) + len(pending) >= self._stop_at

    def _close_cut_short(self, t: float, aggregator: SyncAggregator, pending: RoundPushes) -> None:
        """Close the open round with the pushes that arrived, when the budget or the time ends it early."""
        if pending and (mean := aggregator.close(1)) is not None:
            self._close_round(t, mean, pending)

    def _close_round(self, t: float, mean: Tensor, pending: RoundPushes) -> bool:
        """Apply a closed sync round's ``mean`` (refused when no push was finite, or when it is not) and record its
        pushes; True when the run should stop."""
        stop = False
        usable = any(finite for *_, finite in pending) and all_finite(mean)
        if usable:
            apply_rule(self.rule, PushMeta(-1, self.version, self.version), mean, self.state, self._spare)
        if usable and self._publish():
            self.version += 1
            for u, fetched_u, loss_u, finite in pending:
                staleness = self.version - 1 - fetched_u if finite else -1
                stop = self._record(t, u, fetched_u, staleness, loss_u, finite) or stop
        else:
            self.rejected += sum(finite for *_, finite in pending)  # the NaN ones were counted on arrival
            for u, fetched_u, loss_u, _ in pending:
                stop = self._record(t, u, fetched_u, -1, loss_u, False) or stop
        return stop

    def _run_easgd(self) -> float:
        """easgd: tau local SGD steps per cycle, then the elastic exchange with the center."""
        policy = self.policy
        assert isinstance(policy, EASGD)
        center, grad, tau, lr, rng = self.params, self.grad, policy.tau, policy.lr, self.rng
        local = center.expand(self.settings.workers, -1).clone()  # (N, P): each worker's own copy x_i
        scratch = torch.empty_like(center)
        last_seen = self._fetched_version
        for w in range(self.settings.workers):
            self._schedule(w, 0.0, tau)
        t = 0.0
        while (event := self._pop()) is not None:
            t, w = event
            x = local[w]
            loss_sum = 0.0
            for _ in range(tau):
                if self.stop is not None and self.stop():  # asked between local steps too: a cycle of a huge tau
                    return t  # would hold up Ctrl-C for good; its steps, never exchanged, change nothing
                loss, update = grad(x, w, rng)
                x.add_(update, alpha=-lr)
                loss_sum += loss
            self.grad_evals += tau
            fetched = last_seen[w]
            if all_finite(x):
                policy.exchange(x, center, scratch=scratch)
                self.version += 1
                stop = self._record(t, w, fetched, self.version - 1 - fetched, loss_sum / tau, True)
            else:
                self.rejected += 1
                x.copy_(center)  # a diverged worker starts again from the center
                stop = self._record(t, w, fetched, -1, loss_sum / tau, False)
            if stop:
                break
            last_seen[w] = self.version
            self._fetched_t[w] = t
            self._schedule(w, t, tau)
        return t

    def run(self) -> SimResult:
        """Simulate until ``settings.steps`` pushes or ``settings.seconds`` simulated seconds."""
        if isinstance(self.policy, Sync):
            sim_time = self._run_sync()
        elif isinstance(self.policy, EASGD):
            sim_time = self._run_easgd()
        else:
            sim_time = self._run_async()
        c = self._cols
        records = SimRecords(
            t=np.asarray(c[0], dtype=np.float64),
            worker=np.asarray(c[1], dtype=np.int64),
            version=np.asarray(c[2], dtype=np.int64),
            fetched_version=np.asarray(c[3], dtype=np.int64),
            staleness=np.asarray(c[4], dtype=np.int64),
            loss=np.asarray(c[5], dtype=np.float64),
            applied=np.asarray(c[6], dtype=bool),
            fetched_t=np.asarray(c[7], dtype=np.float64),
        )
        return SimResult(
            self.params,
            records,
            sim_time,
            self.grad_evals,
            self.rejected,
            self.dropped,
            self.stragglers,
            self._snapshots.peak,
            self.state.state,
        )


def simulate(
    params: Tensor,
    rule: Rule,
    policy: Policy,
    grad: GradFn,
    settings: SimSettings,
    *,
    observe: Callable[[float, int, Tensor], None] | None = None,
    observe_every: int = 0,
    stop: Callable[[], bool] | None = None,
) -> SimResult:
    """Run one simulation (see the module docstring); ``params`` is copied, never modified.

    ``observe(t, pushes, params)``, when given, is called every ``observe_every`` pushes (for held-out loss
    against simulated time and updates); it must not modify ``params``. ``stop()``, when given, is asked after
    every push (under sync: every round) whether to end the run there (Ctrl-C): the result holds what was simulated.
    """
    return Simulation(params, rule, policy, grad, settings, observe=observe, observe_every=observe_every,
                      stop=stop).run()  # fmt: skip


__all__ = [
    "MAX_SIGMA",
    "GradFn",
    "ModelGradient",
    "SimRecords",
    "SimResult",
    "SimSettings",
    "Simulation",
    "WorkerBatches",
    "parameter_copies",
    "simulate",
]
