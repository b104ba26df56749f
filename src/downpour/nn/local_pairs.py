"""CPU kernels of a locally connected layer that compute only chosen (location, example) products: the arithmetic
of the variance skip ("if the variance is tiny, don't compute, output 0"), one receptive field at a time.

Compiled with Numba, each kernel walks the list of active pairs, so its work is proportional to the number of
active fields. For a mask of active fields, the three products of :mod:`downpour.nn.local`:

- forward: ``out[b, :, l] = W[l] · patch(b, l)`` for each active pair, zero elsewhere;
- transpose: ``x̄[b, patch(l)] += W[l]ᵀ · h[b, :, l]``, location by location (its weights read once), each thread
  adding into its own examples only;
- weight gradient: ``W̄[l] = Σ_b h̄[b, :, l] ⊗ patch(b, l)`` over the location's active examples.

Each takes a location's active examples four at a time where it can, so that the location's weights (or weight
gradient) are read once for four fields (measured on the bench's 48×48 layer at a quarter of fields flat, one thread:
the transpose 3.26 → 2.64 ms and the weight gradient 2.71 → 2.01 ms, against 3.57 and 2.64 ms dense).

Why compiled loops: with untied weights, a location's product is shared only by the examples active there, and
they differ from location to location. Gathering them with PyTorch's indexing operators cost more than the
arithmetic it saved (measured: the gathers and scatters alone took 1.3–10× the dense layer), while these loops read
each patch in place and pay nothing for a skipped field.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from downpour.nn.local import fold_index

DTYPES = (torch.float32, torch.float64)
_FASTMATH = {"reassoc", "contract"}  # vectorised sums and FMA; NaN and inf keep their meaning


@lru_cache(maxsize=1)
def available() -> bool:
    """Whether Numba imports (a dependency of downpour; without it the skip computes every field and zeroes)."""
    try:
        import numba  # noqa: F401
    except ImportError:
        return False
    return True


class _Compiled(NamedTuple):
    numba: Any  # the module
    pairs: Any  # (B, L) bool -> loc_ptr, loc_examples, ex_ptr
    forward: tuple[Any, Any]  # (serial, parallel): see _run
    transpose: tuple[Any, Any]
    weight_grad: tuple[Any, Any]


@lru_cache(maxsize=1)
def _compiled() -> _Compiled:
    """The kernels, compiled on first use (Numba's import and compilation take a few seconds that processes which
    never skip do not pay). Not cached on disk: Numba's cache is pickled."""
    import numba

    if "NUMBA_THREADING_LAYER_PRIORITY" not in os.environ and "NUMBA_THREADING_LAYER" not in os.environ:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]  # omp: measured (see _run); tbb not
    jit = numba.njit(fastmath=_FASTMATH, nogil=True)

    @numba.njit(nogil=True)
    def pairs(active):  # (B, L) bool -> each location's active examples, and each example's count
        batch, locations = active.shape
        loc_ptr = np.zeros(locations + 1, np.int64)
        ex_ptr = np.zeros(batch + 1, np.int64)
        for b in range(batch):
            for loc in range(locations):
                if active[b, loc]:
                    loc_ptr[loc + 1] += 1
                    ex_ptr[b + 1] += 1
        for loc in range(locations):
            loc_ptr[loc + 1] += loc_ptr[loc]
        for b in range(batch):
            ex_ptr[b + 1] += ex_ptr[b]
        loc_examples = np.empty(ex_ptr[batch], np.int64)
        fill = loc_ptr[:-1].copy()
        for b in range(batch):  # in increasing order at each location
            for loc in range(locations):
                if active[b, loc]:
                    loc_examples[fill[loc]] = b
                    fill[loc] += 1
        return loc_ptr, loc_examples, ex_ptr

    @numba.njit(inline="always")
    def field_start(loc, out_w, width, sh, sw):  # where location loc's field starts in a flattened image
        y = loc // out_w
        return y * sh * width + (loc - y * out_w) * sw

    @numba.njit(inline="always")
    def read_patch(image, base, offsets, xs):  # the field at base, (P,)
        for p in range(offsets.shape[0]):
            xs[p] = image[base + offsets[p]]

    @numba.njit(inline="always")
    def read_four(x, loc_examples, t, base, offsets, xs):  # the fields of the examples at t..t+3 into xs (4, P)
        b0, b1, b2, b3 = loc_examples[t], loc_examples[t + 1], loc_examples[t + 2], loc_examples[t + 3]
        read_patch(x[b0], base, offsets, xs[0])
        read_patch(x[b1], base, offsets, xs[1])
        read_patch(x[b2], base, offsets, xs[2])
        read_patch(x[b3], base, offsets, xs[3])
        return b0, b1, b2, b3

    @numba.njit(inline="always")
    def add_patch(image, base, offsets, cols):  # the field at base += cols (P,)
        for p in range(offsets.shape[0]):
            image[base + offsets[p]] += cols[p]

    @jit
    def forward(first, stop, x, w, offsets, loc_ptr, loc_examples, out, width, sh, sw, out_w):
        # locations [first, stop); x (B, C·H·W), w (L, M, P), out (B, M·L) zeroed
        locations, maps, patch = w.shape
        xs = np.empty((4, patch), x.dtype)  # up to four active examples' patches
        zero = xs.dtype.type(0)  # (a literal 0.0 would sum in float64)
        for loc in range(first, stop):
            base = field_start(loc, out_w, width, sh, sw)
            wl = w[loc]
            t, end = loc_ptr[loc], loc_ptr[loc + 1]
            while t + 4 <= end:  # four examples at once: each weight read once for the four
                b0, b1, b2, b3 = read_four(x, loc_examples, t, base, offsets, xs)
                for m in range(maps):
                    s0, s1, s2, s3 = zero, zero, zero, zero
                    for p in range(patch):
                        wv = wl[m, p]
                        s0 += wv * xs[0, p]
                        s1 += wv * xs[1, p]
                        s2 += wv * xs[2, p]
                        s3 += wv * xs[3, p]
                    col = m * locations + loc
                    out[b0, col], out[b1, col], out[b2, col], out[b3, col] = s0, s1, s2, s3
                t += 4
            for rest in range(t, end):  # the last one to three
                b = loc_examples[rest]
                read_patch(x[b], base, offsets, xs[0])
                for m in range(maps):
                    s = zero
                    for p in range(patch):
                        s += wl[m, p] * xs[0, p]
                    out[b, m * locations + loc] = s

    @jit
    def transpose(first, stop, h, w, offsets, loc_ptr, loc_examples, out, width, sh, sw, out_w):
        # examples [first, stop) (no other call writes them); h (B, M·L), w (L, M, P), out (B, C·H·W) zeroed.
        # Location by location, so that its weights are read once for all its examples, four at a time.
        locations, maps, patch = w.shape
        cols = np.empty((4, patch), out.dtype)
        for loc in range(locations):
            base = field_start(loc, out_w, width, sh, sw)
            wl = w[loc]
            t, end = loc_ptr[loc], loc_ptr[loc + 1]
            while t < end and loc_examples[t] < first:  # a location's examples are in increasing order
                t += 1
            last = t
            while last < end and loc_examples[last] < stop:
                last += 1
            while t + 4 <= last:  # four examples at once: each weight read once for the four
                b0, b1, b2, b3 = loc_examples[t], loc_examples[t + 1], loc_examples[t + 2], loc_examples[t + 3]
                cols[:] = 0.0
                for m in range(maps):
                    col = m * locations + loc
                    h0, h1, h2, h3 = h[b0, col], h[b1, col], h[b2, col], h[b3, col]
                    for p in range(patch):
                        wv = wl[m, p]
                        cols[0, p] += wv * h0
                        cols[1, p] += wv * h1
                        cols[2, p] += wv * h2
                        cols[3, p] += wv * h3
                add_patch(out[b0], base, offsets, cols[0])
                add_patch(out[b1], base, offsets, cols[1])
                add_patch(out[b2], base, offsets, cols[2])
                add_patch(out[b3], base, offsets, cols[3])
                t += 4
            for rest in range(t, last):  # the last one to three
                b = loc_examples[rest]
                cols[0, :] = 0.0
                for m in range(maps):
                    hv = h[b, m * locations + loc]
                    for p in range(patch):
                        cols[0, p] += wl[m, p] * hv
                add_patch(out[b], base, offsets, cols[0])

    @jit
    def weight_grad(first, stop, g, x, offsets, loc_ptr, loc_examples, out, width, sh, sw, out_w):
        # locations [first, stop); g (B, M·L), x (B, C·H·W), out (L, M, P): these rows written
        locations, maps, patch = out.shape
        xs = np.empty((4, patch), x.dtype)
        for loc in range(first, stop):
            base = field_start(loc, out_w, width, sh, sw)
            gl = out[loc]
            gl[:] = 0.0
            t, end = loc_ptr[loc], loc_ptr[loc + 1]
            while t + 4 <= end:  # four examples at once: the location's gradient read and written once for the four
                b0, b1, b2, b3 = read_four(x, loc_examples, t, base, offsets, xs)
                for m in range(maps):
                    col = m * locations + loc
                    g0, g1, g2, g3 = g[b0, col], g[b1, col], g[b2, col], g[b3, col]
                    for p in range(patch):
                        gl[m, p] += g0 * xs[0, p] + g1 * xs[1, p] + g2 * xs[2, p] + g3 * xs[3, p]
                t += 4
            for rest in range(t, end):  # the last one to three
                b = loc_examples[rest]
                read_patch(x[b], base, offsets, xs[0])
                for m in range(maps):
                    gv = g[b, m * locations + loc]
                    for p in range(patch):
                        gl[m, p] += gv * xs[0, p]

    def in_parts(kernel):  # kernel over [edges[k], edges[k + 1]) for each k, one part per thread
        @numba.njit(parallel=True, nogil=True)
        def run(edges, a, b, c, d, e, f, width, sh, sw, out_w):
            for k in numba.prange(len(edges) - 1):
                kernel(edges[k], edges[k + 1], a, b, c, d, e, f, width, sh, sw, out_w)

        return run

    return _Compiled(numba, pairs, *((kernel, in_parts(kernel)) for kernel in (forward, transpose, weight_grad)))


@dataclass(frozen=True)
class FieldPairs:
    """The active (location, example) pairs of a ``(B, H_out, W_out)`` mask, listed location by location."""

    batch: int
    locations: int
    loc_ptr: np.ndarray  # (L + 1,): location l's active examples are loc_examples[loc_ptr[l]:loc_ptr[l + 1]]
    loc_examples: np.ndarray  # (n,), increasing at each location
    ex_ptr: np.ndarray  # (B + 1,): ex_ptr[b + 1] − ex_ptr[b] active fields in example b

    @classmethod
    def of(cls, active: Tensor) -> FieldPairs:
        """The pairs of a CPU bool mask ``(B, H_out, W_out)``."""
        with _plain_tensors():
            mask = active.reshape(active.shape[0], math.prod(active.shape[1:])).contiguous().numpy()  # (B, L)
        return cls(*mask.shape, *_compiled().pairs(mask))

    @property
    def count(self) -> int:
        """How many pairs are active."""
        return int(self.loc_ptr[-1])


def _run(kernels: tuple[Any, Any], ptr: np.ndarray, *args: Any) -> None:
    """``kernel(first, stop, *args)`` over the index range of ``ptr`` (locations or examples), in as many parts of
    about equal work as torch has threads (one per local-backend worker); no two parts write the same memory.

    The parts run on Numba's OpenMP threads. Measured at two threads: a Python thread pool of our own was no faster
    than one thread (a layer's forward and backward at a quarter of fields skipped: 24–28 ms against 18–19 ms here;
    with ``GOMP_SPINCOUNT`` lowered it caught up, so torch's OpenMP threads spinning after each parallel operation
    took the cores from it)."""
    serial, parallel = kernels
    items, threads = len(ptr) - 1, max(1, torch.get_num_threads())
    numba = _compiled().numba
    if threads == 1 or items < 2 or ptr[-1] < 4096 or not _may_launch_parallel(numba):
        serial(0, items, *args)
        return
    threads = min(threads, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(threads)
    edges = np.unique(np.searchsorted(ptr, np.linspace(0, ptr[-1], threads + 1)))  # equal numbers of pairs
    edges[-1] = items
    parallel(edges, *args)


def _may_launch_parallel(numba: Any) -> bool:
    """Numba's workqueue layer (its fallback without OpenMP or TBB) aborts the process when two threads launch
    parallel code at once: with it, only the main thread does."""
    if threading.current_thread() is threading.main_thread():
        return True
    try:
        return numba.threading_layer() != "workqueue"
    except ValueError:  # nothing launched yet: leave the first launch to the main thread
        return False


def _flat(t: Tensor) -> np.ndarray:
    """A tensor's memory as a ``(B, rest)`` numpy array (a copy only when it is not contiguous)."""
    return t.detach().contiguous().view(t.shape[0], math.prod(t.shape[1:])).numpy()


def _plain_tensors() -> contextlib.AbstractContextManager[None]:
    """Tensors as they are, outside ``torch.func``'s transforms (inside one, a tensor made there has no storage to
    read as a NumPy array): for the plans, which only read masks and index tables."""
    return torch._C._DisableFuncTorch()


class PairKernels:
    """The layer's three products over active pairs only (the ``_Kernels`` of :mod:`downpour.nn.local`): zero at
    inactive fields in every one of them. CPU, float32 or float64."""

    def __init__(self, pairs: FieldPairs, in_chw: tuple[int, int, int], out_hw: tuple[int, int],
                 kernel: tuple[int, int], stride: tuple[int, int]) -> None:  # fmt: skip
        self.pairs, self.in_chw, self.out_hw, self.stride = pairs, in_chw, out_hw, stride
        (_, height, width), (kh, kw), (sh, sw) = in_chw, kernel, stride
        fits = (out_hw[0] - 1) * sh + kh <= height and (out_hw[1] - 1) * sw + kw <= width
        if not fits or pairs.locations != out_hw[0] * out_hw[1]:  # the kernels do not check bounds: refuse here
            raise ValueError(f"PairKernels: {pairs.locations} locations, output {out_hw} with kernel {kernel}, "
                             f"stride {stride} do not fit an input {in_chw}")  # fmt: skip
        with _plain_tensors():  # (fold_index keeps what it makes: never a transform's wrapped tensor)
            self.offsets = fold_index((1, 1), in_chw, kernel, stride).numpy()  # (P,): the first field's, flattened

    def _geometry(self) -> tuple[int, int, int, int]:
        return self.in_chw[2], self.stride[0], self.stride[1], self.out_hw[1]

    def _check(self, t: Tensor, per_example: tuple[int, ...], weight_shape: torch.Size, dtype: torch.dtype) -> None:
        """Refuse a tensor or weights of another shape or dtype than the pairs and the geometry, or not on the CPU:
        the compiled loops do not check bounds."""
        expected = (self.pairs.batch, *per_example)
        expected_w = (self.pairs.locations, weight_shape[1], self.offsets.size)
        if (tuple(t.shape), tuple(weight_shape)) != (expected, expected_w) or not (
            t.dtype == dtype and t.dtype in DTYPES and t.device.type == "cpu"
        ):
            raise ValueError(f"PairKernels expected a CPU float32/float64 tensor {expected} and weights {expected_w} "
                             f"of its dtype; got {t.dtype} {tuple(t.shape)} on {t.device}, weights "
                             f"{dtype} {tuple(weight_shape)}")  # fmt: skip

    @torch.compiler.disable  # Numba compiling its loops inside torch.compile's tracing fails: run them as they are
    def forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """``(B, C, H, W) -> (B, M, H_out, W_out)``."""
        self._check(x, self.in_chw, weight.shape, weight.dtype)
        p = self.pairs
        out = x.new_zeros(x.shape[0], weight.shape[1], *self.out_hw)
        _run(_compiled().forward, p.loc_ptr, _flat(x), weight.detach().contiguous().numpy(), self.offsets, p.loc_ptr,
             p.loc_examples, _flat(out), *self._geometry())  # fmt: skip
        return out

    @torch.compiler.disable
    def transpose(self, h: Tensor, weight: Tensor) -> Tensor:
        """``(B, M, H_out, W_out) -> (B, C, H, W)``, ``h`` read at active fields only."""
        self._check(h, (weight.shape[1], *self.out_hw), weight.shape, weight.dtype)
        p = self.pairs
        out = h.new_zeros(h.shape[0], *self.in_chw)
        _run(_compiled().transpose, p.ex_ptr, _flat(h), weight.detach().contiguous().numpy(), self.offsets, p.loc_ptr,
             p.loc_examples, _flat(out), *self._geometry())  # fmt: skip
        return out

    @torch.compiler.disable
    def weight_grad(self, g: Tensor, x: Tensor, weight_shape: torch.Size) -> Tensor:
        """``(L, M, P)`` from response gradients ``(B, M, H_out, W_out)`` (read at active fields) and inputs."""
        self._check(g, (weight_shape[1], *self.out_hw), weight_shape, x.dtype)
        self._check(x, self.in_chw, weight_shape, g.dtype)
        p = self.pairs
        out = g.new_empty(weight_shape)
        _run(_compiled().weight_grad, p.loc_ptr, _flat(g), _flat(x), self.offsets, p.loc_ptr, p.loc_examples,
             out.numpy(), *self._geometry())  # fmt: skip
        return out
