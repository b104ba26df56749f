"""A layer's geometry kept in its ``state_dict``, so that weights of another geometry are refused on load.

A locally connected layer's weight ``(locations, maps, field)`` has the same shape for many geometries: a 7×9 input
and a 9×7 one, or 48×48 at stride 1 and 88×88 at stride 2 (1,681 locations of 8×8 fields each). PyTorch checks
shapes only, so such weights would load without a word and compute nonsense. The geometry travels as the module's
extra state (``<prefix>_extra_state``): one int64 tensor, so a state dict stays all tensors and saves with
safetensors as well as ``torch.save``. A state dict without it (saved before the check existed) still loads.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

_FIELDS = ("in_channels", "out_channels", "in_size", "kernel_size", "stride")
_EXTRA_STATE = "_extra_state"  # the key suffix nn.Module gives extra state
_LENGTH = 8  # in_channels, out_channels, then (height, width) of in_size, kernel_size and stride


class GeometryState(nn.Module):
    """Mixin for a layer with ``in_channels``, ``out_channels``, ``in_size``, ``kernel_size``, ``stride`` and
    ``out_size``: its state dict carries them, and :meth:`load_state_dict` refuses weights of a layer whose
    channels, kernel, stride or output size differ (the input size matters only through the output size)."""

    in_channels: int
    out_channels: int
    in_size: tuple[int, int]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    out_size: tuple[int, ...]

    def get_extra_state(self) -> Tensor:
        """The geometry as int64 ``(8,)``: in_channels, out_channels, in_size, kernel_size, stride (on the CPU, even
        under ``with torch.device("meta")``: it must hold its numbers)."""
        numbers = [self.in_channels, self.out_channels, *self.in_size, *self.kernel_size, *self.stride]
        return torch.tensor(numbers, dtype=torch.int64, device="cpu")

    def set_extra_state(self, state: Any) -> None:
        """Check a saved geometry against this layer's (nothing to set: the geometry is the constructor's)."""
        problem = self._geometry_problem(state)
        if problem:
            raise ValueError(problem)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:  # fmt: skip
        key = prefix + _EXTRA_STATE
        if key in state_dict:
            problem = self._geometry_problem(state_dict[key], key)
            if problem:  # reported as PyTorch reports a size mismatch (even with strict=False), and nothing loads
                error_msgs.append(problem)
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)  # fmt: skip
        if key not in state_dict and key in missing_keys:  # saved before the geometry was: loads as it did then
            missing_keys.remove(key)

    def _geometry_problem(self, state: Any, key: str = _EXTRA_STATE) -> str:
        """What is wrong with a saved geometry for this layer ("" when it fits), naming its state dict ``key``."""
        name = type(self).__name__
        ok = isinstance(state, Tensor) and not state.is_meta and tuple(state.shape) == (_LENGTH,)
        # a state dict cast whole (``{k: v.half() ...}``) holds them as floats: whole numbers, exact while the dtype
        # holds them (float16 up to 2,048; bfloat16 only up to 256, beyond which a rounded geometry is refused)
        ok = ok and all(float(v).is_integer() for v in state.tolist())
        if not ok:
            got = f"{state.dtype} {tuple(state.shape)}" if isinstance(state, Tensor) else type(state).__name__
            values = f" {state.tolist()}" if isinstance(state, Tensor) and not state.is_meta and state.dim() else ""
            return f"{name}'s saved geometry ({key}) must be {_LENGTH} whole numbers, got {got}{values}"
        c, m, h, w, kh, kw, sh, sw = (int(v) for v in state.tolist())
        if min(c, m, h, w, kh, kw, sh, sw) < 1 or kh > h or kw > w:
            return f"{name}'s saved geometry ({key}) is not a valid one: {state.tolist()}"
        saved = {"in_channels": c, "out_channels": m, "in_size": (h, w), "kernel_size": (kh, kw), "stride": (sh, sw)}
        out_size = ((h - kh) // sh + 1, (w - kw) // sw + 1)
        ours = {field: getattr(self, field) for field in _FIELDS}
        if all(saved[f] == ours[f] for f in _FIELDS if f != "in_size") and out_size == tuple(self.out_size):
            return ""

        def said(geometry: dict[str, Any], out: tuple[int, ...]) -> str:
            return ", ".join(f"{f}={geometry[f]}" for f in _FIELDS) + f" (output {out[0]}×{out[1]})"

        return (f"{name} weights of another geometry ({key}): the state dict's layer has {said(saved, out_size)}, "
                f"this one has {said(ours, tuple(self.out_size))}")  # fmt: skip
