"""L2 pooling: the square root of the sum of squares over each spatial neighbourhood of each map.

``out = sqrt(ε + Σ_{neighbourhood} x²)`` (Hyvärinen, Hurri & Hoyer 2009, *Natural Image Statistics*, topographic ICA;
Le et al. 2012, "Building high-level features using large scale unsupervised learning", L2 pooling).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downpour.nn import arguments as check

__all__ = ["L2Pool2d"]


def _sqrt_zero_grad_at_zero(s: Tensor) -> Tensor:
    """``sqrt(s)`` for ``s >= 0`` whose gradient is 0 (not ``0 · ∞ = NaN``) where ``s == 0``.

    Only the entries with ``s == 0`` are touched: elsewhere value and gradient are those of ``torch.sqrt``.
    """
    zero = s == 0  # only exact zeros: a NaN stays NaN (divergence must not be hidden)
    return torch.where(zero, torch.zeros_like(s), torch.sqrt(torch.where(zero, torch.ones_like(s), s)))


def widened(x: Tensor) -> Tensor:
    """``x`` in float32 when it is float16 or bfloat16, else ``x`` itself. Sums of squares of 16-bit values overflow
    (float16 ends at 65504: a 5×5 window of 60s does) and lose precision; so compute in float32 and return in ``x``'s
    dtype, as PyTorch's own norms do."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class L2Pool2d(nn.Module):
    """``out[b, c, i, j] = sqrt(ε + Σ_{(p, q) ∈ window(i, j)} x[b, c, p, q]²)`` (Hyvärinen et al. 2009; Le et al. 2012).

    Windows are ``kernel_size × kernel_size``, placed every ``stride`` positions (default: ``kernel_size``, i.e. not
    overlapping) on the input zero-padded by ``padding`` on every side, so ``H_out = (H + 2·padding − kernel_size) //
    stride + 1`` (likewise ``W_out``), as for convolutions. Each of the three is one integer or a pair ``(rows,
    columns)``, as for ``nn.AvgPool2d``. Input ``(B, C, H, W)``, output ``(B, C, H_out, W_out)``.

    The sum of squares is ``avg_pool2d(x², divisor_override=1)`` (one fused pooling call, no Python loops); float16
    and bfloat16 inputs are pooled in float32 and the result returned in their dtype.

    Gradient at zero windows: ``sqrt`` has an infinite slope at 0, so with ``epsilon = 0`` a naive ``torch.sqrt`` turns
    an all-zero window (e.g. zero input, or a window lying wholly in the padding) into ``0 · ∞ = NaN`` gradients. This
    module guards exactly those windows: where ``ε + Σx² == 0`` the output is 0 and the gradient is 0 (the minimum-norm
    subgradient of the Euclidean norm at 0); everywhere else value and gradient are those of the plain formula. With
    ``epsilon > 0`` the function is smooth and the guard never fires. ``epsilon`` defaults to 0 so that the output is
    exactly the L2 norm of the window.
    """

    def __init__(self, kernel_size: int | tuple[int, int], stride: int | tuple[int, int] | None = None, *,
                 padding: int | tuple[int, int] = 0, epsilon: float = 0.0) -> None:  # fmt: skip
        super().__init__()
        owner = type(self).__name__
        self.kernel_size = check.pair(owner, "kernel_size", kernel_size)
        self.stride = self.kernel_size if stride is None else check.pair(owner, "stride", stride)
        self.padding = check.pair(owner, "padding", padding, minimum=0)
        self.epsilon = check.number(owner, "epsilon", epsilon)

    def forward(self, x: Tensor) -> Tensor:
        check.floating_tensor(type(self).__name__, x)
        if x.dim() != 4:
            raise ValueError(f"L2Pool2d expects input of shape (B, C, H, W) (4-D), got shape {tuple(x.shape)}")
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        height, width = x.shape[-2] + 2 * ph, x.shape[-1] + 2 * pw
        if height < kh or width < kw:
            raise ValueError(
                f"L2Pool2d: padded input {height}×{width} (input {tuple(x.shape)}, padding={_shown(self.padding)}) "
                f"is smaller than kernel_size={_shown(self.kernel_size)}"
            )
        wide = widened(x)
        squares = wide * wide
        if ph > kh // 2 or pw > kw // 2:
            # avg_pool2d refuses padding above half the kernel; zeros add nothing to a sum of squares, so pad by hand.
            squares = F.pad(squares, (pw, pw, ph, ph))
            ph = pw = 0
        sums = F.avg_pool2d(squares, self.kernel_size, self.stride, (ph, pw), divisor_override=1)
        return _sqrt_zero_grad_at_zero(sums + self.epsilon if self.epsilon else sums).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"kernel_size={_shown(self.kernel_size)}, stride={_shown(self.stride)}, "
                f"padding={_shown(self.padding)}, epsilon={self.epsilon}")  # fmt: skip


def _shown(sizes: tuple[int, int]) -> int | tuple[int, int]:
    """A pair as it is usually written: one number when both are equal."""
    return sizes[0] if sizes[0] == sizes[1] else sizes
