"""Triton kernels for :class:`~downpour.nn.local.LocallyConnected2d` on CUDA (float32).

They cover the layer, its transpose and both backward passes in the ordinary layouts (input ``(B, C, H, W)``,
weights ``(L, M, P)`` with ``P = C·kh·kw`` and ``L = H_out·W_out``, responses ``(B, M, H_out, W_out)``); no
patch is ever written to memory.

- Overlapping fields (the cat layer: kernel 18, stride 1) use *banded* products. A program takes ``BLOCK_L``
  neighbouring locations of one output row; per kernel row it multiplies the input row segment they read,
  ``(B, span)``, by a banded matrix ``(span, BLOCK_L·M)`` that holds each location's weights at its own offset
  and zeros elsewhere: ``out[b, (l, m)] = Σ_col x[b, col] · W[l, m, col − x_l]``. About half of the band's
  products are zeros, but they run as one large product instead of ``BLOCK_L`` tiny ones.
  The weight gradient is the same band transposed, ``∂W[l, m, j] = Σ_b g[b, (l, m)] · x[b, x_l + j]``.
  A band of ``n`` locations wastes ``(n − 1)·stride`` of every row's ``span`` columns, and chunking each row's span
  into products of ``block_k`` columns pads it further (kernel 18, 16 locations: span 33 in three chunks of 16, so
  about a third of the products are useful). The ``flat`` launch setting chunks the band's kernel rows as one
  sequence of ``C·kh·span`` columns instead, so that narrow bands (2–4 locations, span 19–21) pad almost nothing;
  which is faster on a given card is measured: on CUDA the first call for a shape times each kernel's
  :data:`_CANDIDATES` and keeps the fastest (:mod:`downpour.nn.triton_autotune`; ``DOWNPOUR_TRITON_AUTOTUNE=0``
  keeps the settings measured on an H100, ``_TUNED``).
- Fields that barely overlap (stride near the kernel size) use one program per location and kernel row.
- The input gradient (:func:`lc_transpose`) is gathered, not scattered (no atomics, deterministic): one program
  per tile of input pixels sums over every location whose field covers the tile,
  ``x̄[b, c, y, x] = Σ_{l, m} g[b, m, l] · W[l, m, (c, y − y_l, x − x_l)]`` (zero where the pixel lies outside
  field ``l``), as a dense product ``(batch, locations·maps) @ (locations·maps, pixels)``.

Precision follows PyTorch's own switch for float32 products, ``torch.set_float32_matmul_precision``: at its
default ("highest") the products are true float32 (``input_precision="ieee"``) and match the CPU path; at "high"
or "medium" they use TF32 tensor cores (about 1e-3 relative error, what cuDNN's convolutions use by default).
A launch setting ``precision="tf32x3"`` (for sweeps; no default uses it) runs each product as three TF32 products
on tensor cores. On an H100 it kept float32's accuracy, but each kernel's fastest such setting took 1.5-2.1x as
long as its fastest in float32 FMAs.
Each kernel resolves its launch once per shape and process (:func:`_launch`); later calls launch the kernel Triton
compiled directly, without its per-call binding (:mod:`downpour.nn.triton_launch`).
Without Triton (or without CUDA) :data:`AVAILABLE` is False and the layer uses its band-wise ``bmm`` kernels.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from downpour.nn import triton_autotune, triton_launch, triton_skip

if TYPE_CHECKING:
    from downpour.nn.triton_skip import TritonSkip

try:  # Triton ships with CUDA builds of PyTorch; CPU builds have none and never need it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

AVAILABLE = triton is not None


MAX_MAPS = 256  # one program holds all maps of a location; more would spill registers
SKIP_BLOCK_B = triton_skip.BLOCK  # examples per program when skipping (tuning may name another, for sweeps)


def usable(x: Tensor, maps: int) -> bool:
    """Whether the kernels apply: float32 ``x`` on a CUDA device (any device under ``TRITON_INTERPRET=1``)."""
    if not AVAILABLE or x.dtype != torch.float32 or maps > MAX_MAPS:
        return False
    return x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def _pow2(n: int, low: int, high: int) -> int:
    """The smallest power of two ≥ ``n``, clamped to ``[low, high]``."""
    return max(low, min(high, 1 << max(0, n - 1).bit_length()))


if AVAILABLE:

    @triton.jit
    def _group_examples(order_ptr, count_ptr, group, block, B, BLOCK_B: tl.constexpr, SKIP: tl.constexpr):
        # Block ``block`` of a program's examples: (indices, mask, how many the group computes). SKIP: the group's
        # compacted examples (its order, :mod:`downpour.nn.triton_skip`), of which the first ``count`` are computed.
        offs_b = block * BLOCK_B + tl.arange(0, BLOCK_B)
        if SKIP:
            count = tl.load(count_ptr + group)
            mask_b = offs_b < count
            offs_b = tl.load(order_ptr + group * B + offs_b, mask=mask_b, other=0)
        else:
            count = B
            mask_b = offs_b < B
        return offs_b, mask_b, count

    @triton.jit
    def _forward_rows_kernel(
        x_ptr, w_ptr, out_ptr, order_ptr, count_ptr, field_ptr,
        B, C, M, P, L, W, W_OUT,
        sxb, sxc, sxh, sxw,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr, PRECISION: tl.constexpr,
        SKIP: tl.constexpr,
    ):  # fmt: skip
        # One location per program, one kernel row at a time: contiguous runs of KW inputs and KW weights.
        # (W, the input's width, is unused: the banded kernel's arguments, so that both launch alike.)
        # SKIP: only the examples whose field here is active (the location's compacted examples; field_ptr unused).
        loc = tl.program_id(0)
        oy = loc // W_OUT
        ox = loc % W_OUT
        offs_b, mask_b, count = _group_examples(order_ptr, count_ptr, loc, tl.program_id(1), B, BLOCK_B, SKIP)
        if SKIP and tl.program_id(1) * BLOCK_B >= count:
            return  # none of this block's examples is active here
        offs_m = tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, BLOCK_KW)
        mask_j = offs_j < KW
        mask_x = mask_b[:, None] & mask_j[None, :]
        mask_w = mask_j[:, None] & (offs_m < M)[None, :]
        x_base = x_ptr + offs_b[:, None] * sxb + (oy * SH) * sxh + (ox * SW + offs_j)[None, :] * sxw
        w_base = w_ptr + loc * M * P + offs_m[None, :] * P + offs_j[:, None]
        acc = tl.zeros((BLOCK_B, BLOCK_M), dtype=tl.float32)
        for row in range(0, C * KH):
            c = row // KH
            i = row % KH
            xv = tl.load(x_base + c * sxc + i * sxh, mask=mask_x, other=0.0)  # (BLOCK_B, BLOCK_KW)
            wv = tl.load(w_base + row * KW, mask=mask_w, other=0.0)  # (BLOCK_KW, BLOCK_M)
            acc += tl.dot(xv, wv, input_precision=PRECISION)
        out = out_ptr + offs_b[:, None] * (M * L) + offs_m[None, :] * L + loc
        tl.store(out, acc, mask=mask_b[:, None] & (offs_m < M)[None, :])

    @triton.jit
    def _weight_grad_rows_kernel(
        x_ptr, g_ptr, gw_ptr, order_ptr, count_ptr, field_ptr,
        B, C, M, P, W, W_OUT,
        sxb, sxc, sxh, sxw, sgb, sgm, sgl,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_KW: tl.constexpr, PRECISION: tl.constexpr,
        SKIP: tl.constexpr,
    ):  # fmt: skip
        loc = tl.program_id(0)  # (W unused, as in the forward's kernel per location; SKIP: as there)
        n_b = tl.load(count_ptr + loc) if SKIP else B  # the examples summed over: the first n_b of its order
        oy = loc // W_OUT
        ox = loc % W_OUT
        offs_m = tl.arange(0, BLOCK_M)
        offs_j = tl.arange(0, BLOCK_KW)
        mask_m = offs_m < M
        mask_j = offs_j < KW
        for row in range(0, C * KH):
            c = row // KH
            i = row % KH
            acc = tl.zeros((BLOCK_M, BLOCK_KW), dtype=tl.float32)
            for b0 in range(0, n_b, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                mask_b = offs_b < n_b
                if SKIP:
                    offs_b = tl.load(order_ptr + loc * B + offs_b, mask=mask_b, other=0)
                gv = tl.load(
                    g_ptr + offs_m[:, None] * sgm + offs_b[None, :] * sgb + loc * sgl,
                    mask=mask_m[:, None] & mask_b[None, :],
                    other=0.0,
                )  # (BLOCK_M, BLOCK_B)
                x_row = x_ptr + c * sxc + (oy * SH + i) * sxh
                xv = tl.load(
                    x_row + offs_b[:, None] * sxb + (ox * SW + offs_j)[None, :] * sxw,
                    mask=mask_b[:, None] & mask_j[None, :],
                    other=0.0,
                )  # (BLOCK_B, BLOCK_KW)
                acc += tl.dot(gv, xv, input_precision=PRECISION)
            out = gw_ptr + loc * M * P + offs_m[:, None] * P + row * KW + offs_j[None, :]
            tl.store(out, acc, mask=mask_m[:, None] & mask_j[None, :])

    @triton.jit
    def _forward_band_kernel(
        x_ptr, w_ptr, out_ptr, order_ptr, count_ptr, field_ptr,
        B, C, M, P, L, W, W_OUT,
        sxb, sxc, sxh, sxw,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, LOCS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        FLAT: tl.constexpr, PRECISION: tl.constexpr, SKIP: tl.constexpr,
    ):  # fmt: skip
        # LOCS neighbouring locations of one output row as one product: the input rows they read
        # (B, span) times a banded matrix (span, LOCS·M) that holds each location's weights at its own offset.
        # SKIP: only the band's compacted examples, and only their active fields are stored (``out`` starts zeroed).
        SPAN: tl.constexpr = (LOCS - 1) * SW + KW
        blocks_x = tl.cdiv(W_OUT, LOCS)
        oy = tl.program_id(0) // blocks_x
        ox0 = (tl.program_id(0) % blocks_x) * LOCS
        offs_b, mask_b, count = _group_examples(order_ptr, count_ptr, tl.program_id(0), tl.program_id(1), B, BLOCK_B,
                                                SKIP)  # fmt: skip
        if SKIP and tl.program_id(1) * BLOCK_B >= count:
            return
        offs_n = tl.arange(0, BLOCK_L * BLOCK_M)
        n_l = offs_n // BLOCK_M
        lx = ox0 + n_l
        n_m = offs_n % BLOCK_M
        mask_n = (n_l < LOCS) & (lx < W_OUT) & (n_m < M)
        w_n = w_ptr + (oy * W_OUT + lx) * M * P + n_m * P  # (N,) each column's weights
        acc = tl.zeros((BLOCK_B, BLOCK_L * BLOCK_M), dtype=tl.float32)
        if FLAT:  # the band's rows one after another, (C·KH·span) columns in chunks: no chunk padding per row
            for k0 in range(0, C * KH * SPAN, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                row = offs_k // SPAN  # c·KH + i
                col = ox0 * SW + offs_k % SPAN
                c = row // KH
                x_off = c * sxc + (oy * SH + row - c * KH) * sxh + col * sxw
                mask_k = (offs_k < C * KH * SPAN) & (col < W)
                xv = tl.load(
                    x_ptr + offs_b[:, None] * sxb + x_off[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0
                )  # (BLOCK_B, BLOCK_K)
                j = col[None, :] - (lx * SW)[:, None]  # (N, BLOCK_K): column within each location's field
                inside = (j >= 0) & (j < KW) & mask_n[:, None] & mask_k[None, :]
                wv = tl.load(w_n[:, None] + (row * KW)[None, :] + j, mask=inside, other=0.0)  # (N, BLOCK_K), banded
                acc += tl.dot(xv, tl.trans(wv), input_precision=PRECISION)
        else:  # kernel row by kernel row, each row's span in chunks
            for row in range(0, C * KH):
                c = row // KH
                i = row % KH
                x_row = x_ptr + offs_b[:, None] * sxb + c * sxc + (oy * SH + i) * sxh
                for k0 in range(0, SPAN, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    col = ox0 * SW + offs_k
                    xv = tl.load(
                        x_row + col[None, :] * sxw,
                        mask=mask_b[:, None] & ((offs_k < SPAN) & (col < W))[None, :],
                        other=0.0,
                    )  # (BLOCK_B, BLOCK_K)
                    j = col[:, None] - (lx * SW)[None, :]  # (BLOCK_K, N): column within each location's field
                    inside = (j >= 0) & (j < KW) & mask_n[None, :]
                    wv = tl.load(w_n[None, :] + row * KW + j, mask=inside, other=0.0)  # (BLOCK_K, N), banded
                    acc += tl.dot(xv, wv, input_precision=PRECISION)
        out = out_ptr + offs_b[:, None] * (M * L) + (n_m * L + oy * W_OUT + lx)[None, :]
        keep = mask_b[:, None] & mask_n[None, :]
        if SKIP:  # fields (L, B) int8: 1 where computed
            keep = keep & (
                tl.load(field_ptr + (oy * W_OUT + lx)[None, :] * B + offs_b[:, None], mask=keep, other=0) != 0
            )
        tl.store(out, acc, mask=keep)

    @triton.jit
    def _weight_grad_band_kernel(
        x_ptr, g_ptr, gw_ptr, order_ptr, count_ptr, field_ptr,
        B, C, M, P, W, W_OUT,
        sxb, sxc, sxh, sxw, sgb, sgm, sgl,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr, LOCS: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        FLAT: tl.constexpr, PRECISION: tl.constexpr, ONE_B_BLOCK: tl.constexpr, SKIP: tl.constexpr,
    ):  # fmt: skip
        # The same band as the forward kernel: (LOCS·M, B) @ (B, span), of which each location keeps its KW columns.
        # SKIP: summed over the band's compacted examples only, their inactive fields' gradients taken as 0.
        SPAN: tl.constexpr = (LOCS - 1) * SW + KW
        ROWS = 1 if FLAT else C * KH  # FLAT: one pass over all rows' spans, (C·KH·span) columns in chunks
        CHUNKS = C * KH * SPAN if FLAT else SPAN
        blocks_x = tl.cdiv(W_OUT, LOCS)
        oy = tl.program_id(0) // blocks_x
        ox0 = (tl.program_id(0) % blocks_x) * LOCS
        offs_n = tl.arange(0, BLOCK_L * BLOCK_M)
        n_l = offs_n // BLOCK_M
        lx = ox0 + n_l
        n_m = offs_n % BLOCK_M
        mask_n = (n_l < LOCS) & (lx < W_OUT) & (n_m < M)
        g_n = g_ptr + n_m * sgm + (oy * W_OUT + lx) * sgl  # (N,)
        gw_n = gw_ptr + (oy * W_OUT + lx) * M * P + n_m * P  # (N,)
        offs_b0 = tl.arange(0, BLOCK_B)
        n_b = tl.load(count_ptr + tl.program_id(0)) if SKIP else B  # (SKIP: the first n_b of the band's order)
        if ONE_B_BLOCK:  # the whole batch fits one block: load the gradients once (not with SKIP)
            g_once = tl.load(
                g_n[:, None] + offs_b0[None, :] * sgb, mask=mask_n[:, None] & (offs_b0 < B)[None, :], other=0.0
            )  # (N, BLOCK_B)
        for kernel_row in range(0, ROWS):
            for k0 in range(0, CHUNKS, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                if FLAT:
                    row = offs_k // SPAN  # (BLOCK_K,) c·KH + i of each column
                    col = ox0 * SW + offs_k % SPAN
                    c = row // KH
                    x_off = c * sxc + (oy * SH + row - c * KH) * sxh + col * sxw  # (BLOCK_K,)
                    w_off = (row * KW)[None, :]
                else:
                    col = ox0 * SW + offs_k
                    x_off = (kernel_row // KH) * sxc + (oy * SH + kernel_row % KH) * sxh + col * sxw
                    w_off = kernel_row * KW
                mask_k = (offs_k < CHUNKS) & (col < W)
                acc = tl.zeros((BLOCK_L * BLOCK_M, BLOCK_K), dtype=tl.float32)
                for b0 in range(0, n_b, BLOCK_B):
                    offs_b = b0 + offs_b0
                    mask_b = offs_b < n_b
                    if ONE_B_BLOCK:
                        gv = g_once
                    else:
                        mask_g = mask_n[:, None] & mask_b[None, :]
                        if SKIP:
                            offs_b = tl.load(order_ptr + tl.program_id(0) * B + offs_b, mask=mask_b, other=0)
                            field = tl.load(field_ptr + (oy * W_OUT + lx)[:, None] * B + offs_b[None, :], mask=mask_g,
                                            other=0)  # (N, BLOCK_B)  # fmt: skip
                            mask_g = mask_g & (field != 0)
                        gv = tl.load(g_n[:, None] + offs_b[None, :] * sgb, mask=mask_g, other=0.0)  # (N, BLOCK_B)
                    x_b = x_ptr + offs_b[:, None] * sxb
                    xv = tl.load(x_b + x_off[None, :], mask=mask_b[:, None] & mask_k[None, :], other=0.0)  # (BB, BK)
                    acc += tl.dot(gv, xv, input_precision=PRECISION)
                j = col[None, :] - (lx * SW)[:, None]  # (N, BLOCK_K)
                inside = (j >= 0) & (j < KW) & mask_n[:, None] & mask_k[None, :]
                tl.store(gw_n[:, None] + w_off + j, acc, mask=inside)

    @triton.jit
    def _gathered_product(
        acc, g_ptr, w_ptr, field_ptr, offs_b, mask_b, loc, m, mask_k, mask_t, i_kw, j, inside, w_base, B, M, P,
        sgb, sgm, sgl, PRECISION: tl.constexpr, SKIP: tl.constexpr,
    ):  # fmt: skip
        # One chunk of the transpose: acc (BLOCK_B, T) += g[b, (loc, m)] (BLOCK_B, K) @ W[(loc, m), pixel] (K, T),
        # each pixel's weight at row offset i·KW and column j of its field (zero where it lies outside: ``inside``).
        # SKIP: g of a field not computed (fields (L, B) int8 0) counts as 0.
        mask_g = mask_b[:, None] & mask_k[None, :]
        if SKIP:
            mask_g = mask_g & (tl.load(field_ptr + loc[None, :] * B + offs_b[:, None], mask=mask_g, other=0) != 0)
        gv = tl.load(g_ptr + offs_b[:, None] * sgb + m[None, :] * sgm + loc[None, :] * sgl, mask=mask_g,
                     other=0.0)  # (BLOCK_B, K)  # fmt: skip
        wv = tl.load(
            w_ptr + (loc * M * P + m * P + w_base)[:, None] + i_kw + j,
            mask=mask_k[:, None] & mask_t[None, :] & inside,
            other=0.0,
        )  # (K, T)
        return acc + tl.dot(gv, wv, input_precision=PRECISION)

    @triton.jit
    def _transpose_kernel(
        g_ptr, w_ptr, out_ptr, order_ptr, count_ptr, field_ptr,
        B, C, H, W, M, P, H_OUT, W_OUT,
        sgb, sgm, sgl,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        TILE_H: tl.constexpr, TILE_W: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_LX: tl.constexpr, FLAT: tl.constexpr,
        PRECISION: tl.constexpr, SKIP: tl.constexpr,
    ):  # fmt: skip
        # SKIP: only the tile's compacted examples (those with an active field touching it; ``out`` starts zeroed).
        tiles_w = tl.cdiv(W, TILE_W)
        y0 = (tl.program_id(0) // tiles_w) * TILE_H
        x0 = (tl.program_id(0) % tiles_w) * TILE_W
        c = tl.program_id(1)
        offs_b, mask_b, count = _group_examples(order_ptr, count_ptr, tl.program_id(0), tl.program_id(2), B, BLOCK_B,
                                                SKIP)  # fmt: skip
        if SKIP and tl.program_id(2) * BLOCK_B >= count:
            return
        offs_t = tl.arange(0, TILE_H * TILE_W)
        py = y0 + offs_t // TILE_W
        px = x0 + offs_t % TILE_W
        mask_t = (py < H) & (px < W)
        offs_k = tl.arange(0, BLOCK_LX * BLOCK_M)
        k_lx = offs_k // BLOCK_M
        k_m = offs_k % BLOCK_M
        # Locations whose field touches the tile: y_l = ly·SH ∈ (y0 − KH, y0 + TILE_H).
        ly_lo = tl.maximum(0, (y0 - KH + SH) // SH)
        ly_hi = tl.minimum(H_OUT, (y0 + TILE_H - 1) // SH + 1)
        lx_lo = tl.maximum(0, (x0 - KW + SW) // SW)
        lx_hi = tl.minimum(W_OUT, (x0 + TILE_W - 1) // SW + 1)
        acc = tl.zeros((BLOCK_B, TILE_H * TILE_W), dtype=tl.float32)
        if FLAT:  # every (location, map) touching the tile as one sequence, in chunks: no chunk padded per row
            # NLY × NLX locations at most touch a tile (fewer at the borders): divisions by constants are cheap.
            NLY: tl.constexpr = (TILE_H + KH - 2) // SH + 1
            NLX: tl.constexpr = (TILE_W + KW - 2) // SW + 1
            for k0 in range(0, NLY * NLX * BLOCK_M, BLOCK_LX * BLOCK_M):
                kk = k0 + offs_k
                ly = ly_lo + kk // (NLX * BLOCK_M)  # (K,)
                lx = lx_lo + (kk // BLOCK_M) % NLX
                m = kk % BLOCK_M
                mask_k = (ly < ly_hi) & (lx < lx_hi) & (m < M) & (kk < NLY * NLX * BLOCK_M)
                i = py[None, :] - (ly * SH)[:, None]  # (K, T)
                j = px[None, :] - (lx * SW)[:, None]
                inside = (i >= 0) & (i < KH) & (j >= 0) & (j < KW)
                acc = _gathered_product(acc, g_ptr, w_ptr, field_ptr, offs_b, mask_b, ly * W_OUT + lx, m, mask_k,
                                        mask_t, i * KW, j, inside, c * KH * KW, B, M, P, sgb, sgm, sgl, PRECISION,
                                        SKIP)  # fmt: skip
        else:  # row of locations by row, each row's locations in chunks
            for ly in range(ly_lo, ly_hi):
                i = py - ly * SH  # (T,)
                for lx0 in range(lx_lo, lx_hi, BLOCK_LX):
                    lx = lx0 + k_lx  # (K,)
                    mask_k = (lx < lx_hi) & (k_m < M)
                    j = px[None, :] - (lx * SW)[:, None]  # (K, T)
                    inside = (i[None, :] >= 0) & (i[None, :] < KH) & (j >= 0) & (j < KW)
                    acc = _gathered_product(acc, g_ptr, w_ptr, field_ptr, offs_b, mask_b, ly * W_OUT + lx, k_m,
                                            mask_k, mask_t, (i * KW)[None, :], j, inside, c * KH * KW, B, M, P, sgb,
                                            sgm, sgl, PRECISION, SKIP)  # fmt: skip
        out = out_ptr + offs_b[:, None] * (C * H * W) + c * (H * W) + (py * W + px)[None, :]
        tl.store(out, acc, mask=mask_b[:, None] & mask_t[None, :])


def _block_m(maps: int) -> int:
    return _pow2(maps, 16, MAX_MAPS)  # tl.dot needs every side ≥ 16


def tf32_enabled() -> bool:
    """Whether float32 products may use TF32, as PyTorch's own matmuls do: ``torch.set_float32_matmul_precision``."""
    return torch.get_float32_matmul_precision() != "highest"


def _banded(kernel: tuple[int, int], stride: tuple[int, int], block_l: int) -> bool:
    """Whether the banded kernels pay: ``block_l`` neighbouring fields span at most 4 fields' width."""
    return (block_l - 1) * stride[1] + kernel[1] <= 4 * kernel[1]


# Launch settings per kernel: the fastest of two sweeps on an H100 (80GB HBM3, torch 2.11, Triton 3.6, 2026-11-27) at
# (64, 1, 96, 96), kernel 18, stride 1, 8 maps (scripts/triton_sweep.py; README). ``block_l`` is for 8 maps: with
# more maps a band holds fewer locations (:func:`_band_launch`), so that its product stays 128 columns wide.
_TUNED = {
    ("forward", False): dict(flat=True, block_l=8, block_k=32, num_warps=4),
    ("forward", True): dict(flat=True, block_l=15, block_k=64, num_warps=8),
    ("weight_grad", False): dict(flat=True, block_l=15, block_k=32, num_warps=4, num_stages=2),
    ("weight_grad", True): dict(flat=True, block_l=15, block_k=32, num_warps=4, num_stages=2),
    ("transpose", False): dict(tile=(4, 8), num_warps=4),
    ("transpose", True): dict(tile=(8, 8), num_warps=8),
}


# Candidates that the first call for a shape times on CUDA (downpour.nn.triton_autotune): the measured settings
# first, then runners-up of those sweeps, which name their band, and last the banded kernels' pipeline measured
# before them (kernel rows one at a time, shorter chunks), at the measured band width for the maps: the one
# candidate beside the measured settings that suits many maps (at 256 maps the flat weight gradient spills 272-456
# bytes per thread where that pipeline spilled 0-24; neither is timed there). Measured at 8 maps
# (triton.testing.do_bench, ms, in this order, the last candidate with its bands of 16 locations): forward fp32
# 0.213, 0.235, 0.270, 0.455; TF32 0.114, 0.115, 0.147; weight gradient fp32 0.156, 0.224, 0.247; TF32 0.091,
# 0.122, 0.178; transpose fp32 0.302, 0.393, 0.441; TF32 0.198, 0.279, 0.283.
_CANDIDATES = {
    ("forward", False): ({}, dict(flat=True, block_l=8, block_k=32, num_warps=8),
                         dict(flat=True, block_l=4, block_k=32, num_warps=4),
                         dict(flat=False, block_k=16, num_warps=4)),
    ("forward", True): ({}, dict(flat=True, block_l=15, block_k=32, num_warps=8),
                        dict(flat=False, block_k=64, num_warps=8)),
    ("weight_grad", False): ({}, dict(flat=True, block_l=15, block_k=16, num_warps=4, num_stages=3),
                             dict(flat=False, block_k=16, num_warps=4, num_stages=3)),
    ("weight_grad", True): ({}, dict(flat=True, block_l=15, block_k=32, num_warps=8, num_stages=3),
                            dict(flat=False, block_k=16, num_warps=8, num_stages=3)),
    ("transpose", False): ({}, dict(flat=True, tile=(4, 8), block_lx=2, num_warps=4), dict(block_b=32)),
    ("transpose", True): ({}, dict(flat=True, tile=(8, 8), block_lx=2, num_warps=4), dict(block_b=32)),
}  # fmt: skip


_NUM_STAGES = 3  # Triton's default software pipelining depth
_TUNING = {
    "forward": {"block_b", "block_l", "flat", "block_k", "num_warps", "num_stages", "precision"},
    "weight_grad": {"block_b", "block_l", "flat", "block_k", "num_warps", "num_stages", "precision"},
    "transpose": {"block_b", "block_lx", "tile", "flat", "num_warps", "num_stages", "precision"},
}
# tl.dot's input precisions: true float32 (FMA), TF32 tensor cores, and three TF32 products per product
# (a = a_hi + a_lo; a·b ≈ a_hi·b_hi + a_hi·b_lo + a_lo·b_hi), about float32's accuracy on tensor cores.
PRECISIONS = ("ieee", "tf32", "tf32x3")


def _check_tuning(kernel: str, tuning: dict[str, Any]) -> None:
    """Refuse launch settings a kernel does not have (a typo would otherwise time the defaults)."""
    unknown = set(tuning) - _TUNING[kernel]
    if unknown:
        raise ValueError(f"Unknown {kernel} launch settings {sorted(unknown)} (it takes {sorted(_TUNING[kernel])})")
    if tuning.get("precision", "ieee") not in PRECISIONS:
        raise ValueError(f"Unknown {kernel} precision {tuning['precision']!r} (one of {', '.join(PRECISIONS)})")


def _precision(tf32: bool | None) -> tuple[bool, str]:
    tf32 = tf32_enabled() if tf32 is None else tf32
    return tf32, "tf32" if tf32 else "ieee"


def _band_launch(kernel: str, maps: int, tf32: bool, tuning: dict[str, Any]) -> dict[str, Any]:
    """A banded kernel's compile-time shape and launch settings: ``LOCS`` locations per band (``block_l``, any
    count; the measured one shrinks with more maps, at most 128 columns in all), held in ``BLOCK_L`` (a power of
    two) columns of ``BLOCK_M`` maps each, at least 16 in all for ``tl.dot``; the products' ``PRECISION`` (``tf32``
    decides unless the settings name one)."""
    tuned = _TUNED[kernel, tf32]
    launch = {**tuned, **tuning}
    block_m = _pow2(maps, 1, MAX_MAPS)
    widest = max(1, 128 // block_m)  # locations whose maps fill a product 128 columns wide
    locs = tuning["block_l"] if "block_l" in tuning else min(tuned.get("block_l", widest), widest)
    return dict(
        LOCS=locs, BLOCK_L=max(_pow2(locs, 1, 1 << 16), 16 // block_m), BLOCK_M=block_m, BLOCK_K=launch["block_k"],
        FLAT=bool(launch.get("flat", False)), PRECISION=launch.get("precision", _precision(tf32)[1]),
        num_warps=launch["num_warps"], num_stages=launch.get("num_stages", _NUM_STAGES),
    )  # fmt: skip


def _rows_launch(setting: dict[str, Any], maps: int, kernel: tuple[int, int], precision: str,
                 block_b: int) -> dict[str, Any]:  # fmt: skip
    """The compile-time arguments and launch settings of a kernel that runs one program per location (fields that
    barely overlap): all of a location's maps, one kernel row of ``kernel`` at a time."""
    return dict(BLOCK_B=block_b, BLOCK_M=_block_m(maps), BLOCK_KW=_pow2(kernel[1], 16, 1024),
                PRECISION=setting.get("precision", precision), num_warps=setting.get("num_warps", 4),
                num_stages=setting.get("num_stages", _NUM_STAGES))  # fmt: skip


def _examples_per_block(batch: int, skip: TritonSkip | None) -> int:
    """A program's block of examples unless the launch settings name one: the batch up to 64 (16 at least, for
    ``tl.dot``), or :data:`SKIP_BLOCK_B` with a skip (the unit of what it leaves out)."""
    return _pow2(batch, 16, 64) if skip is None else SKIP_BLOCK_B


def forward_band(maps: int, kernel: tuple[int, int], stride: tuple[int, int]) -> int:
    """How many neighbouring locations of a row one program of :func:`lc_forward` computes at its measured
    settings (1: one location per program, where fields barely overlap); a skip's groups follow it."""
    band = _band_launch("forward", maps, tf32_enabled(), {})
    return band["LOCS"] if _banded(kernel, stride, band["LOCS"]) else 1


def lc_forward(x: Tensor, weight: Tensor, out_hw: tuple[int, int], kernel: tuple[int, int],
               stride: tuple[int, int], *, tf32: bool | None = None, skip: TritonSkip | None = None,
               **tuning: Any) -> Tensor:  # fmt: skip
    """Responses ``(B, M, H_out, W_out)`` of input ``x`` ``(B, C, H, W)`` (any strides) to weights ``(L, M, P)``.

    ``tf32``: None follows :func:`tf32_enabled`. ``skip``: fields not computed (0 in the output), see
    :mod:`downpour.nn.triton_skip`. ``tuning`` overrides launch settings, for benchmarks and sweeps:
    ``block_b`` (examples per program), ``block_l`` (locations per band), ``block_k`` (band columns per product),
    ``flat`` (run the band's kernel rows as one sequence of columns instead of chunking each row's span, so no
    chunk is padded per row), ``num_warps``, ``num_stages``, ``precision`` (one of :data:`PRECISIONS`, instead of
    the one ``tf32`` gives: for sweeps that try ``"tf32x3"``).
    """
    if tuning:
        _check_tuning("forward", tuning)
    batch, channels = x.shape[:2]
    locations, maps, patch = weight.shape
    weight = weight.contiguous()
    out = x.new_empty(batch, maps, *out_hw) if skip is None else x.new_zeros(batch, maps, *out_hw)
    if out.numel() == 0:
        return out
    tf32, precision = _precision(tf32)

    def prepare(setting: dict[str, Any]) -> _Launch:
        band = _band_launch("forward", maps, tf32, setting)
        block_b = setting.get("block_b", _examples_per_block(batch, skip))
        if _banded(kernel, stride, band["LOCS"]):
            grid = (out_hw[0] * triton.cdiv(out_hw[1], band["LOCS"]), triton.cdiv(batch, block_b))
            return _forward_band_kernel, grid, dict(BLOCK_B=block_b, SKIP=skip is not None, **band)
        rows = _rows_launch(setting, maps, kernel, precision, block_b)
        return _forward_rows_kernel, (locations, triton.cdiv(batch, block_b)), dict(SKIP=skip is not None, **rows)

    def arguments(groups: tuple[Tensor, ...]) -> tuple[Any, ...]:
        return (x, weight, out, *groups, batch, channels, maps, patch, locations, x.shape[3], out_hw[1], *x.stride(),
                *kernel, *stride)  # fmt: skip

    if skip is not None:
        _launch_skipping(prepare, tuning, lambda constants: arguments(skip.bands(constants.get("LOCS", 1))))
        return out
    key = (tf32, maps, tuple(x.shape), kernel, stride, out_hw, locations)
    spec = (x.stride(), *_pointers(x, weight, out))  # the rest of args is fixed by key
    _launch("forward", key, x, arguments(_no_skip(x.device)), prepare, tuning, spec,
            banded=lambda: prepare({})[0] is _forward_band_kernel)  # fmt: skip
    return out


def lc_weight_grad(g: Tensor, x: Tensor, weight_shape: torch.Size, out_hw: tuple[int, int],
                   kernel: tuple[int, int], stride: tuple[int, int], *, tf32: bool | None = None,
                   skip: TritonSkip | None = None, **tuning: Any) -> Tensor:  # fmt: skip
    """Weight gradient ``(L, M, P)`` from response gradients ``g`` ``(B, M, H_out, W_out)`` and input ``x``
    (``skip``: the gradients of fields not computed count as 0); ``tuning`` as in :func:`lc_forward`."""
    if tuning:
        _check_tuning("weight_grad", tuning)
    locations, maps, patch = weight_shape
    batch, channels = x.shape[:2]
    if batch == 0:
        return x.new_zeros(weight_shape)
    grad_w = x.new_empty(weight_shape)
    g = g.reshape(batch, maps, locations)  # (B, M, L), a view when possible
    tf32, precision = _precision(tf32)

    def prepare(setting: dict[str, Any]) -> _Launch:
        band = _band_launch("weight_grad", maps, tf32, setting)
        block_b = setting.get("block_b", _examples_per_block(batch, skip))
        if _banded(kernel, stride, band["LOCS"]):
            grid = (out_hw[0] * triton.cdiv(out_hw[1], band["LOCS"]),)
            return _weight_grad_band_kernel, grid, dict(BLOCK_B=block_b, ONE_B_BLOCK=skip is None and batch <= block_b,
                                                        SKIP=skip is not None, **band)  # fmt: skip
        rows = _rows_launch(setting, maps, kernel, precision, setting.get("block_b", 32))
        return _weight_grad_rows_kernel, (locations,), dict(SKIP=skip is not None, **rows)

    def arguments(groups: tuple[Tensor, ...]) -> tuple[Any, ...]:
        return (x, g, grad_w, *groups, batch, channels, maps, patch, x.shape[3], out_hw[1], *x.stride(), *g.stride(),
                *kernel, *stride)  # fmt: skip

    if skip is not None:
        _launch_skipping(prepare, tuning, lambda constants: arguments(skip.bands(constants.get("LOCS", 1))))
        return grad_w
    key = (tf32, maps, tuple(x.shape), kernel, stride, out_hw, tuple(weight_shape))
    spec = (x.stride(), g.stride(), *_pointers(x, g, grad_w))
    _launch("weight_grad", key, x, arguments(_no_skip(x.device)), prepare, tuning, spec,
            banded=lambda: prepare({})[0] is _weight_grad_band_kernel)  # fmt: skip
    return grad_w


def lc_transpose(g: Tensor, weight: Tensor, in_chw: tuple[int, int, int], kernel: tuple[int, int],
                 stride: tuple[int, int], *, tf32: bool | None = None, skip: TritonSkip | None = None,
                 **tuning: Any) -> Tensor:  # fmt: skip
    """``Wᵀg``: responses ``(B, M, H_out, W_out)`` back to the input space ``(B, C, H, W)`` (``skip``: responses
    of fields not computed count as 0).

    ``tuning``: ``tile`` (input pixels per program, ``(rows, columns)``), ``block_b``, ``block_lx`` (locations of
    a row per product, times the maps rounded up to a power of two), ``flat`` (chunk all the locations that touch
    the tile as one sequence instead of row by row), ``num_warps``, ``num_stages``, ``precision`` (as in
    :func:`lc_forward`).
    """
    if tuning:
        _check_tuning("transpose", tuning)
    batch, maps, out_h, out_w = g.shape
    channels, height, width = in_chw
    locations, _, patch = weight.shape
    weight = weight.contiguous()
    g = g.reshape(batch, maps, locations)  # (B, M, L)
    out = g.new_empty(batch, channels, height, width) if skip is None else g.new_zeros(batch, channels, height, width)
    if out.numel() == 0:
        return out
    tf32, precision = _precision(tf32)
    banded = _banded(kernel, stride, 16)
    block_m = _pow2(maps, 1, MAX_MAPS)

    def prepare(setting: dict[str, Any]) -> _Launch:
        launch = {**_TUNED["transpose", tf32], **setting} if banded else {"tile": (4, 4), "num_warps": 4, **setting}
        block_b = launch.get("block_b", _examples_per_block(batch, skip))
        tile_h, tile_w = launch["tile"]
        grid = (triton.cdiv(height, tile_h) * triton.cdiv(width, tile_w), channels, triton.cdiv(batch, block_b))
        return _transpose_kernel, grid, dict(
            TILE_H=tile_h, TILE_W=tile_w, BLOCK_B=block_b, BLOCK_M=block_m, BLOCK_LX=_block_lx(launch, block_m),
            FLAT=bool(launch.get("flat", False)), PRECISION=launch.get("precision", precision), SKIP=skip is not None,
            num_warps=launch["num_warps"], num_stages=launch.get("num_stages", _NUM_STAGES),
        )  # fmt: skip

    def arguments(groups: tuple[Tensor, ...]) -> tuple[Any, ...]:
        return (g, weight, out, *groups, batch, channels, height, width, maps, patch, out_h, out_w, *g.stride(),
                *kernel, *stride)  # fmt: skip

    if skip is not None:

        def tiles(constants: dict[str, Any]) -> tuple[Any, ...]:
            tile = (constants["TILE_H"], constants["TILE_W"])
            return arguments(skip.tiles((height, width), tile, kernel, stride))

        _launch_skipping(prepare, tuning, tiles)
        return out
    key = (tf32, maps, tuple(out.shape), kernel, stride, (out_h, out_w), locations)
    spec = (g.stride(), *_pointers(g, weight, out))
    _launch("transpose", key, out, arguments(_no_skip(g.device)), prepare, tuning, spec, banded=lambda: banded)
    return out


@functools.lru_cache(maxsize=8)
def _no_skip(device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """What the kernels' three skip arguments get when nothing is skipped (unread; the same dtypes as a skip's, so
    that both compile alike)."""
    order = torch.zeros(1, dtype=torch.int32, device=device)
    return order, order, torch.zeros(1, dtype=torch.int8, device=device)


def _launch_skipping(prepare: Callable[[dict[str, Any]], _Launch], tuning: dict[str, Any],
                     arguments: Callable[[dict[str, Any]], tuple[Any, ...]]) -> None:  # fmt: skip
    """Launch a kernel with a skip: the measured settings with :data:`SKIP_BLOCK_B` examples per block (or
    ``tuning``), never timed or kept as a plan (a skip's groups are made for one batch, and the block size decides
    what is left out, which timing one batch's mask would fix for every later one). Its arguments follow the
    launch's compile-time constants (the groups are those of the band or tile it computes)."""

    def run(setting: dict[str, Any]) -> None:
        fn, grid, constants = prepare(setting)
        fn[grid](*arguments(constants), **constants)

    _run_fitting(run, tuning)


_Launch = tuple[Any, tuple[int, ...], dict[str, Any]]  # a jitted kernel, its grid, its compile-time arguments
_PLANS: dict[tuple[Any, ...], triton_launch.Plan] = {}  # the launch each kernel and shape resolved to, for the process


def _pointers(*tensors: Tensor) -> tuple[tuple[torch.dtype, int], ...]:
    """What Triton specializes a pointer argument on: its dtype and its address modulo 16."""
    return tuple((tensor.dtype, tensor.data_ptr() % 16) for tensor in tensors)


def forget_plans() -> None:
    """Forget the launches resolved and the candidates chosen so far (for sweeps that change :data:`_TUNED` or
    :data:`_CANDIDATES`)."""
    _PLANS.clear()
    triton_autotune.forget()


def _launch(kernel: str, key: tuple[Any, ...], like: Tensor, args: tuple[Any, ...],
            prepare: Callable[[dict[str, Any]], _Launch], tuning: dict[str, Any], spec: tuple[Any, ...], *,
            banded: Callable[[], bool]) -> None:  # fmt: skip
    """Launch ``kernel`` on ``args`` laid out by ``prepare(setting)``: with ``tuning`` when it names settings;
    else with the setting resolved on the first call for ``key`` (``(tf32, maps, *shapes)``: everything the launch
    depends on but the tensors' addresses and strides) on ``like``'s device. That is the fastest of the candidates
    when timing is on and ``banded()`` (:func:`_autotuned`; the candidates were measured on overlapping fields:
    where fields barely overlap, a step is mostly the host's time and timing them would pick by noise), with the
    pipeline stages that fit (:func:`_run_fitting`). The resolved launch is kept, so that a later call for the
    same shape only launches: no settings are merged and no candidates are looked at again, which cost the host
    about as much as Triton's own launch. ``spec`` (the arguments' strides, dtypes and pointer alignments; with the
    current CUDA device, where Triton compiles and launches) lets the plan launch Triton's compiled kernel directly
    (:class:`~downpour.nn.triton_launch.Plan`)."""

    def run(setting: dict[str, Any]) -> None:
        fn, grid, constants = prepare(setting)
        fn[grid](*args, **constants)

    if tuning:
        _run_fitting(run, tuning)
        return
    plan_key = (kernel, like.device, triton_autotune.enabled(like.device), *key)
    plan = _PLANS.get(plan_key)
    if plan is None:
        tf32, maps, *shape = key
        chosen = _autotuned(kernel, tf32, like, maps, tuple(shape), run) if banded() else {}
        _PLANS[plan_key] = triton_launch.Plan(*prepare(_run_fitting(run, chosen)))
        return
    plan.launch(args, (*spec, torch.cuda.current_device()) if like.is_cuda else spec)  # Triton launches there


def _autotuned(kernel: str, tf32: bool, like: Tensor, maps: int, key: tuple[Any, ...],
               run: Callable[[dict[str, Any]], None]) -> dict[str, Any]:  # fmt: skip
    """The launch settings of ``kernel`` for this shape: the fastest of its :data:`_CANDIDATES` that suit ``maps``
    (:func:`_suits`) on ``like``'s device, timed by the first call (:mod:`downpour.nn.triton_autotune`), or the
    measured ones when that is off."""
    candidates = [setting for setting in _CANDIDATES[kernel, tf32] if _suits(kernel, tf32, setting, maps)]
    return triton_autotune.choose(kernel, (tf32, like.device.index, maps, *key), candidates, run, like.device)


def _block_lx(launch: dict[str, Any], block_m: int) -> int:
    """Locations of a row per transpose product: the product's inner side is ``block_lx × block_m``."""
    return launch.get("block_lx", max(1, 32 // block_m))


def _suits(kernel: str, tf32: bool, setting: dict[str, Any], maps: int) -> bool:
    """Whether a candidate's product is no wider than the measured setting's for ``maps`` maps (a band of 4
    locations of 256 maps each would need more shared memory than any card has), and, for the transpose, at least
    16 wide, as ``tl.dot`` needs. The measured setting (``{}``) always suits."""
    block_m = _pow2(maps, 1, MAX_MAPS)
    if kernel == "transpose":
        width = _block_lx(setting, block_m) * block_m
        return 16 <= width <= max(32, block_m)
    band = _band_launch(kernel, maps, tf32, setting)
    return band["BLOCK_L"] * band["BLOCK_M"] <= max(128, block_m)


def _run_fitting(run: Callable[[dict[str, Any]], None], setting: dict[str, Any]) -> dict[str, Any]:
    """``run(setting)``, with fewer pipeline stages when this card's shared memory cannot hold its three (the
    settings were measured on an H100; smaller cards, or TF32 with over 128 maps, need fewer). A setting that names
    its stages runs with them or fails. Returns the setting that ran."""
    from triton.runtime.errors import OutOfResources

    tries = [setting] if "num_stages" in setting else [setting, *({**setting, "num_stages": n} for n in (2, 1))]
    for launch in tries[:-1]:
        try:
            run(launch)
            return launch
        except OutOfResources:
            continue
    run(tries[-1])
    return tries[-1]
