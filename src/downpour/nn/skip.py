"""Skipping flat receptive fields of a locally connected layer ("if the variance is tiny, don't compute, output 0").

A field whose input variance (over its channels and pixels) is below a threshold τ outputs zero, and on the CPU its
arithmetic is not done: the layer, its transpose and both gradients run over the list of active (location,
example) pairs (:mod:`downpour.nn.local_pairs`, compiled loops), one field at a time. With τ = 0 no field is flat
(variances are ≥ 0) and nothing changes.

On CUDA, where the layer runs Triton kernels (float32), each program leaves out the blocks of examples that have
no active field in its group of locations (:mod:`downpour.nn.triton_skip`): a band of neighbouring locations of one
row for the forward pass and the weight gradient, the locations touching a tile of input pixels for the transpose.
A block is 16 examples, so a band's flat examples save time only 16 at a time.

Where neither can run (other devices, float16/bfloat16, Numba missing on the CPU), the flat fields are zeroed but
computed: :attr:`SkipPlan.skipped_fraction` is then 0, and no time is saved.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from downpour.nn import arguments as check
from downpour.nn import local_pairs
from downpour.nn.triton_skip import TritonSkip


def field_variance(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Variance of each field of ``x`` ``(B, C, H, W)`` over its channels and pixels: ``(B, H_out, W_out)``, in
    ``x``'s dtype. Computed as E[x²] − E[x]² in float64: in float32 that difference loses the variance of fields far
    from zero (raw 0-255 pixels: 5x off at 200 ± 0.05)."""
    wide = x.to(torch.float64 if x.device.type != "mps" else torch.float32)  # (MPS has no float64)
    mean = F.avg_pool2d(wide, kernel, stride).mean(1)  # (B, H_out, W_out)
    mean_sq = F.avg_pool2d(wide * wide, kernel, stride).mean(1)
    return (mean_sq - mean * mean).clamp_min_(0.0).to(x.dtype)


def active_fields(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int], threshold: float) -> Tensor:
    """Fields whose variance is at least ``threshold`` (``(B, H_out, W_out)`` bool): the ones that are computed. A
    field holding NaN or Inf (variance NaN) is computed too, so that it shows in the output instead of a zero."""
    check.number("active_fields", "threshold", threshold)  # NaN would zero every field
    return ~(field_variance(x.detach(), kernel, stride) < threshold)


class SkipPlan:
    """Which fields of one batch a :class:`~downpour.nn.local.LocallyConnected2d` computes: a ``(B, H_out, W_out)``
    bool mask and its list of active (location, example) pairs, built once and shared by the layer, its transpose
    and their backward passes (``LocallyConnected2d.skip_plan`` makes one).

    ``zeroed_fraction``: fields that output zero; ``skipped_fraction``: (location, example) products not computed
    (the same on the CPU in float32/float64; on CUDA the forward's products in blocks of examples left out, see
    :mod:`downpour.nn.triton_skip`; 0 where the layer computes every field and zeroes). ``triton_band``: the
    layer's Triton forward computes bands of that many locations (1: one location per program); None where it does
    not run Triton. A plan that would leave no block out runs the dense kernels (:attr:`triton` is None).
    """

    @torch.compiler.disable  # planning reads the mask on the CPU (Numba loops): torch.compile runs it as it is
    def __init__(self, active: Tensor, kernel: tuple[int, int], stride: tuple[int, int], dtype: torch.dtype,
                 triton_band: int | None = None) -> None:  # fmt: skip
        check.instance("SkipPlan", "active", active, Tensor, "torch.Tensor")
        if active.dtype != torch.bool or active.dim() != 3:
            raise ValueError(f"Invalid active for SkipPlan: must be a (B, H_out, W_out) bool mask, got {active.dtype} "
                             f"of shape {tuple(active.shape)}")  # fmt: skip
        check.instance("SkipPlan", "dtype", dtype, torch.dtype, "torch.dtype")
        kernel, stride = check.pair("SkipPlan", "kernel", kernel), check.pair("SkipPlan", "stride", stride)
        self.active, self.kernel, self.stride = active.clone(), kernel, stride  # frozen: the pairs are built once
        self.triton = TritonSkip(self.active) if triton_band is not None else None
        self.skips = triton_band is None and active.device.type == "cpu" and dtype in local_pairs.DTYPES and (
            local_pairs.available())  # fmt: skip
        self.pairs = local_pairs.FieldPairs.of(active) if self.skips else None
        total = max(1, active.numel())
        computed = self.pairs.count if self.pairs is not None else int(active.sum())
        self.zeroed_fraction = 1.0 - computed / total
        self.skipped_fraction = self.zeroed_fraction if self.skips else 0.0
        if self.triton is not None:
            self.skipped_fraction = 1.0 - self.triton.computed_fraction(triton_band)
            if self.skipped_fraction <= 0.0:  # no block to leave out: the dense kernels, without the compaction
                self.triton, self.skipped_fraction = None, 0.0

    @classmethod
    def zeroing(cls, active: Tensor, kernel: tuple[int, int], stride: tuple[int, int]) -> SkipPlan:
        """A plan that computes every field and zeroes the flat ones without reading the mask's values: for a mask
        mapped by ``torch.func.vmap`` (per-example gradients), which no plan can depend on. The same outputs and
        gradients as a planned skip, but no time saved; ``zeroed_fraction`` is NaN (not known), ``skipped_fraction``
        0."""
        plan = cls.__new__(cls)
        plan.active, plan.kernel, plan.stride = active, kernel, stride
        plan.triton, plan.skips, plan.pairs = None, False, None
        plan.zeroed_fraction, plan.skipped_fraction = math.nan, 0.0
        return plan

    @torch.compiler.disable
    def kernels(self, in_chw: tuple[int, int, int], out_hw: tuple[int, int],
                dtype: torch.dtype) -> local_pairs.PairKernels | None:  # fmt: skip
        """The layer's three products over the active pairs for tensors of ``dtype``; None where they cannot run
        (see :attr:`skips`; also a plan made for a float layer used on a half-precision one)."""
        if self.pairs is None or dtype not in local_pairs.DTYPES:
            return None
        return local_pairs.PairKernels(self.pairs, in_chw, out_hw, self.kernel, self.stride)
