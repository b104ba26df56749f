"""Per-example mean removal and ZCA whitening (Bell & Sejnowski 1997), as used before RICA and sparse coding."""

from __future__ import annotations

import torch
from torch import Tensor

from downpour.errors import DataError
from downpour.threads import torch_threads

# Up to this many dimensions the eigendecomposition runs on one thread: two threads save at most about 0.1 s on
# an idle machine (1024: 0.33 s against 0.2), and on busy shared cores they stalled for 0.6-8 s (256-768).
SINGLE_THREAD_EIGH_MAX_DIM = 1024
# Beyond it, on this many threads whatever the machine or OMP_NUM_THREADS: eigh's result depends on its thread
# count, and with it every value of a run (a simulated run must be bit-identical for its seed). 3072 dimensions
# (32x32 colour): 4.9 s on 2 threads against 9.0 s on one, here.
EIGH_THREADS = 2


def remove_example_mean(x: Tensor) -> Tensor:
    """Subtract each example's own mean brightness: ``(N, D) -> (N, D)``."""
    return x - x.mean(dim=1, keepdim=True)


def zca_matrix(x: Tensor, *, eps: float, what: str = "the data") -> Tensor:
    """The symmetric ZCA matrix ``U diag(1/sqrt(λ + eps·mean(λ))) Uᵀ`` of the covariance of ``x`` ``(N, D)``.

    ``eps`` is relative to the mean eigenvalue, so one default suits pixel data of any scale. Data with no variance
    (every eigenvalue 0) or a matrix with NaN or Inf in it raise :class:`DataError` naming ``what``.
    """
    x64 = x.double()
    centred = x64 - x64.mean(dim=0, keepdim=True)
    covariance = centred.t() @ centred / max(1, x.shape[0] - 1)  # (D, D)
    threads = 1 if covariance.shape[0] <= SINGLE_THREAD_EIGH_MAX_DIM else EIGH_THREADS
    with torch_threads(threads):
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues = eigenvalues.clamp_min(0)
    if not float(eigenvalues.mean()) > 0:  # 1/sqrt(0): every example is the same up to its mean
        raise DataError(f"the data has no variance after removing each example's mean: every example of {what} is "
                        "the same, so it cannot be whitened")  # fmt: skip
    scale = 1.0 / torch.sqrt(eigenvalues + eps * eigenvalues.mean())
    matrix = ((eigenvectors * scale) @ eigenvectors.t()).float()  # (D, D)
    if not torch.isfinite(matrix).all():
        raise DataError(f"the whitening matrix of {what} holds NaN or Inf values (does the data hold NaN or Inf?)")
    return matrix
