"""A Gaussian–Bernoulli restricted Boltzmann machine trained by contrastive divergence.

Unit-variance Gaussian visible units v (the data are whitened), binary hidden units h (Hinton, *A practical guide
to training restricted Boltzmann machines*, 2010, §13.2)::

    E(v, h) = ½‖v − c‖² − bᵀh − hᵀWv,    p(hⱼ = 1 | v) = σ(Wⱼv + bⱼ),    p(v | h) = N(Wᵀh + c, I)
    F(v)    = ½‖v − c‖² − Σⱼ softplus(Wⱼv + bⱼ)                       (the free energy, p(v) ∝ exp(−F(v)))

The log-likelihood gradient is ``−∂F(v_data)/∂θ + E_model[∂F(v)/∂θ]``. CD-k (Hinton 2002) estimates the model
expectation with k Gibbs steps started at the data; PCD (Tieleman 2008) continues persistent chains across updates.

How the update travels through the parameter server: :meth:`GaussianBernoulliRBM.loss` returns a scalar whose
autograd gradient is the *negative* CD update, ``∂/∂θ [mean F(v_data) − mean F(v_k)]`` with the chain's end v_k
held constant, so a server rule that steps against the gradient applies the CD update like any other gradient
(under every backend and policy). The scalar's *value* is the mean-field reconstruction error
``mean ‖Wᵀσ(Wv + b) + c − v‖²`` (plus any penalty), which is what the run logs as its loss: the surrogate's own
value is meaningless. With autograd off (held-out evaluation) no chain is run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downpour.models.shapes import as_flat, require_examples
from downpour.nn import arguments as check
from downpour.objectives import decay_term, penalty, regularised, squared_reconstruction
from downpour.penalty_spec import PenaltySpec


class GaussianBernoulliRBM(nn.Module):
    """``features`` binary hidden units over ``input_dim`` Gaussian visible units.

    ``cd_k``: Gibbs steps per update; ``pcd``: persistent chains (one per example of the batch, restarted when the
    batch size changes). Sampling draws from the model's own generator (seeded with ``seed``), so a simulated run
    is reproducible. In CD the visible units take their mean (a noise-free reconstruction, which lowers the
    variance of the update); persistent chains sample them, since a persistent chain must be a real Markov chain.
    """

    def __init__(self, input_dim: int, features: int = 256, *, cd_k: int = 1, pcd: bool = False,
                 penalty: PenaltySpec | None = None, epsilon: float = 0.01, weight_decay: float = 0.0,
                 seed: int = 0) -> None:  # fmt: skip
        super().__init__()
        owner = type(self).__name__
        self.input_dim = input_dim = check.integer(owner, "input_dim", input_dim)
        self.features = features = check.integer(owner, "features", features)
        self.cd_k = check.integer(owner, "cd_k", cd_k)
        self.pcd = check.flag(owner, "pcd", pcd)
        self.penalty = penalty if penalty is not None else PenaltySpec("none")
        check.penalty(owner, self.penalty, sigmoid=True)
        self.epsilon = check.number(owner, "epsilon", epsilon, positive=True)
        self.weight_decay = check.number(owner, "weight_decay", weight_decay)
        seed = check.integer(owner, "seed", seed, minimum=0, maximum=2**64 - 2)  # seed + 1 seeds the sampler
        self.sampler = torch.Generator().manual_seed(seed + 1)
        init = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(0.01 * torch.randn(features, input_dim, generator=init))  # W (K, D), Hinton §8
        self.hidden_bias = nn.Parameter(torch.zeros(features))  # b
        self.visible_bias = nn.Parameter(torch.zeros(input_dim))  # c
        self.chain: Tensor | None = None  # PCD's fantasy particles (B, D)

    def forward(self, x: Tensor) -> Tensor:
        """Hidden probabilities ``p(h = 1 | v)``: ``(B, D) -> (B, K)``."""
        x = as_flat(x, self.input_dim, type(self).__name__, like=self.weight)  # (B, D)
        return torch.sigmoid(x @ self.weight.t() + self.hidden_bias)

    def free_energy(self, v: Tensor) -> Tensor:
        """``F(v)`` per example ``(B,)``."""
        return 0.5 * (v - self.visible_bias).pow(2).sum(1) - F.softplus(v @ self.weight.t() + self.hidden_bias).sum(1)

    @torch.no_grad()
    def gibbs(self, v: Tensor, steps: int, *, sample_visible: bool) -> Tensor:
        """``steps`` rounds of h ~ p(h | v), v ~ p(v | h) (or v = E[v | h]) from ``v`` ``(B, D)``."""
        for _ in range(steps):
            p = self(v)
            # the sampler is a CPU generator (one stream on every device): its draws move to the model's device
            noise = torch.rand(p.shape, generator=self.sampler).to(p.device)  # (B, K)
            h = (noise < p).to(v.dtype)  # (B, K) binary
            v = h @ self.weight + self.visible_bias  # (B, D): the mean of p(v | h)
            if sample_visible:
                v = v + torch.randn(v.shape, generator=self.sampler).to(v)
        return v

    def reconstruction_error(self, v: Tensor) -> Tensor:
        """Mean over examples of ``‖Wᵀσ(Wv + b) + c − v‖²`` (mean field, no sampling)."""
        return squared_reconstruction(self(v) @ self.weight + self.visible_bias, v)

    def loss(self, x: Tensor) -> Tensor:
        """Value: the reconstruction error (+ penalty and weight decay); gradient: the negative CD-k (or PCD)
        update (+ the penalty's and decay's gradients)."""
        require_examples(x, type(self).__name__)
        v = as_flat(x, self.input_dim, type(self).__name__, like=self.weight)  # (B, D)
        extra = regularised(torch.zeros((), dtype=v.dtype, device=v.device),
                            penalty(self.penalty, self(v), epsilon=self.epsilon),
                            decay_term(self.weight_decay, [self.weight]))  # fmt: skip
        if not torch.is_grad_enabled():
            return self.reconstruction_error(v) + extra
        if self.pcd:
            if self.chain is None or self.chain.shape != v.shape:
                self.chain = v.detach().clone()
            elif self.chain.dtype != v.dtype or self.chain.device != v.device:  # the model moved: its chain too
                self.chain = self.chain.to(v)
            negative = self.gibbs(self.chain, self.cd_k, sample_visible=True)
            self.chain = negative
        else:
            negative = self.gibbs(v.detach(), self.cd_k, sample_visible=False)
        surrogate = self.free_energy(v).mean() - self.free_energy(negative).mean()
        with torch.no_grad():
            error = self.reconstruction_error(v)
        return (surrogate - surrogate.detach()) + error + extra  # value: error + extra; gradient: −CD + extra's

    def filters(self) -> Tensor:
        """First-layer filters (the weights into each hidden unit), one per row: ``(K, D)``."""
        return self.weight.detach()
