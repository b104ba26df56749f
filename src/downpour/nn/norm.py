"""Local contrast normalization (Jarrett, Kavukcuoglu, Ranzato & LeCun, "What is the best multi-stage architecture for
object recognition?", ICCV 2009): a subtractive then a divisive normalization over a Gaussian window spanning every
channel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downpour.nn import arguments as check
from downpour.nn.pooling import _sqrt_zero_grad_at_zero, widened

__all__ = ["LocalContrastNorm2d"]


class LocalContrastNorm2d(nn.Module):
    """Jarrett et al. (2009) local contrast normalization of a ``(B, C, H, W)`` input; same-size output.

    With ``w_pq`` a ``kernel_size × kernel_size`` Gaussian window normalized so that ``Σ_{c,p,q} w_pq = 1`` (the 2-D
    Gaussian summing to 1 over space, divided by the number of channels ``C``):

    * subtractive: ``v[c,i,j] = x[c,i,j] − Σ_{c',p,q} w_pq · x[c', i+p, j+q]`` (one local mean, shared by all channels);
    * divisive: ``σ[i,j] = sqrt(Σ_{c,p,q} w_pq · v[c, i+p, j+q]²)`` and ``y = v / max(mean_ij σ, σ[i,j], ε)``, where the
      mean of ``σ`` is taken over the spatial positions of each example separately.

    ``p, q`` run over ``−(kernel_size // 2) … kernel_size // 2`` (the window is centred).

    Choices (not fixed by the paper):

    * ``sigma`` (in pixels) defaults to ``kernel_size / 4``, the default of Torch7's ``image.gaussian`` used by
      ``nn.SpatialContrastiveNormalization`` (Jarrett et al. give only the 9×9 window size).
    * Borders: the input is **reflect**-padded (``x[-1] = x[1]``) by ``kernel_size // 2``, so every output position
      sees a full window whose weights sum to 1; Jarrett et al. zero-pad and divide by the window mass that falls
      inside the image instead. Reflect padding needs ``H, W > kernel_size // 2``.
    * ``epsilon`` is a **floor** on the divisor (as Torch7's ``SpatialDivisiveNormalization`` threshold, default 1e-4),
      not an additive term: the output stays finite on flat inputs (``v = 0``, ``σ = 0``), and wherever
      ``max(mean σ, σ) >= ε`` the output is exactly the paper's rule, hence exactly invariant to a positive rescaling
      of the input. The floor is in the units of the input.
    * Each example's mean level is subtracted before the windows are summed. That leaves ``v`` unchanged (every
      window sums to 1) but keeps float32's precision for pixel values far from 0: a flat input gives 0 up to the
      rounding of its mean (exactly 0 for whole pixel values such as 255; a flat 0.1 gave 4e-11 in float32).
    * Gradients: ``σ`` is computed with a square root whose gradient is 0 (instead of ``0 · ∞ = NaN``) where the local
      sum of squares is exactly 0, so flat regions and flat inputs back-propagate finite gradients.

    float16 and bfloat16 inputs are normalized in float32 and the result returned in their dtype.

    Both window sums are one single-channel ``conv2d`` each: by linearity, ``Σ_{c,p,q} (g_pq / C) · x[c, …]`` is the
    2-D Gaussian ``g`` convolved with the channel mean of ``x`` (and padding commutes with the channel mean).
    """

    window: Tensor

    def __init__(self, kernel_size: int = 9, *, sigma: float | None = None, epsilon: float = 1e-4) -> None:
        super().__init__()
        owner = type(self).__name__
        kernel_size = check.integer(owner, "kernel_size", kernel_size)
        check.require(kernel_size % 2 == 1, owner, "kernel_size", kernel_size, "an odd integer >= 1 (a centred window)")
        self.kernel_size = kernel_size
        self.sigma = kernel_size / 4 if sigma is None else check.number(owner, "sigma", sigma, positive=True)
        self.epsilon = check.number(owner, "epsilon", epsilon, positive=True)
        self.register_buffer("window", self._gaussian(None), persistent=False)

    def _gaussian(self, device: torch.device | None) -> Tensor:
        """The window ``(1, 1, k, k)``, summing to 1, in float64 so that float64 inputs get full-precision weights
        (it is cast to the computation's dtype in forward; in float32 on Apple's MPS, which has no float64)."""
        k = self.kernel_size
        dtype = torch.float32 if torch.device(device or "cpu").type == "mps" else torch.float64
        offsets = torch.arange(k, dtype=dtype, device=device) - k // 2
        gauss = torch.exp(-(offsets**2) / (2 * self.sigma**2))
        window = torch.outer(gauss, gauss)
        return (window / window.sum()).view(1, 1, k, k)

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]  # nn.Module's own signature
        """Moves follow the module as usual, but the window is a constant, not a state: it is rebuilt in float64 on
        the device it moved to, so that ``.half()`` does not round it (in bfloat16 it summed to 1.0003) and a module
        built on the ``meta`` device and materialised with ``to_empty`` gets real values, not uninitialised memory."""
        module = super()._apply(fn, recurse)
        shared = self.window.is_shared()
        self.window = self._gaussian(self.window.device)
        if shared:  # share_memory(): as every other buffer
            self.window.share_memory_()
        return module

    def _local_sum(self, x: Tensor, weight: Tensor) -> Tensor:
        """``Σ_{c,p,q} (g_pq / C) · x[:, c, i+p, j+q]`` for every ``(i, j)``: shape ``(B, 1, H, W)``."""
        m = x.mean(dim=1, keepdim=True)
        pad = self.kernel_size // 2
        if pad:
            m = F.pad(m, (pad, pad, pad, pad), mode="reflect")
        return F.conv2d(m, weight)

    def forward(self, x: Tensor) -> Tensor:
        check.floating_tensor(type(self).__name__, x)
        if x.dim() != 4:
            raise ValueError(
                f"LocalContrastNorm2d expects input of shape (B, C, H, W) (4-D), got shape {tuple(x.shape)}"
            )
        pad = self.kernel_size // 2
        if x.shape[-2] <= pad or x.shape[-1] <= pad:
            raise ValueError(
                f"LocalContrastNorm2d: reflect padding by kernel_size // 2 = {pad} needs H and W > {pad}, "
                f"got input shape {tuple(x.shape)}"
            )
        wide = widened(x)  # float16 squares overflow (σ = inf turned every output into 0)
        weight = self.window.to(dtype=wide.dtype, device=x.device)
        # Every window sums to 1, so v does not change when each example's mean level is taken out first; in float32
        # that keeps the local differences' precision (a flat 255 gave |y| up to 0.76, a faint texture on a level of
        # 200 was off by 0.45).
        wide = wide - wide.mean(dim=(1, 2, 3), keepdim=True)  # (B, C, H, W) minus (B, 1, 1, 1)
        v = wide - self._local_sum(wide, weight)
        sigma = _sqrt_zero_grad_at_zero(self._local_sum(v * v, weight))
        mean_sigma = sigma.mean(dim=(-2, -1), keepdim=True)
        divisor = torch.maximum(sigma, mean_sigma).clamp_min(self.epsilon)
        return (v / divisor).to(x.dtype)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, sigma={self.sigma}, epsilon={self.epsilon}"
