"""``model.init`` and ``model.freeze_first``: hand-made or fresh random first layers, and keeping them fixed.

A frozen first layer stays in the flat parameter vector that workers push to the parameter server (so every
backend, policy and checkpoint sees the same layout as an unfrozen run); a gradient hook replaces its gradient by
zeros, so every rule and policy moves it by exactly nothing: SGD, Adagrad (0 / (sqrt(Σg²) + ε) = 0), local apply,
staleness-lr and dc-asgd (g + λ g⊙g⊙Δ = 0). Weight decay on it is zeroed too (the hook sees the total gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from downpour.errors import ConfigError
from downpour.nn.templates import templates

_TEMPLATE_SEED_OFFSET = 7919  # "random" draws from its own stream, not the one of the design's default init

try:  # a torch.func transform running? (PyTorch 2.4-2.13, as downpour.nn.local reads it)
    from torch._C import _are_functorch_transforms_active as _transforms_active
except ImportError:  # pragma: no cover - depends on the PyTorch version
    _transforms_active = None


def template_rows(kind: str, count: int, shape: tuple[int, int, int], *, scale: float, seed: int) -> Tensor:
    """``count`` ``kind`` templates ``(count, C·f·f)`` of norm ``scale`` (the mean norm of the design's own initial
    filters, so a hand-made layer starts at the size the design's init has)."""
    generator = torch.Generator().manual_seed(seed + _TEMPLATE_SEED_OFFSET)
    try:
        bank = templates(kind, count, shape, generator=generator)  # (K, D), unit rows
    except ValueError as exc:
        raise ConfigError(f"invalid model.init: {kind!r} for {shape} fields: {exc}") from None
    return bank * scale


@torch.no_grad()
def set_first_layer(weight: Tensor, kind: str, shape: tuple[int, int, int], *, seed: int, design: str) -> None:
    """Overwrite ``weight`` with ``kind`` templates for fields of ``shape`` ``(C, f, f)``.

    ``weight`` is ``(K, C·f·f)`` (one filter per row), ``(K, C, f, f)`` (a convolution) or ``(L, K, C·f·f)`` (untied
    filters at L locations: every location gets the same K templates).
    """
    dim = shape[0] * shape[1] * shape[2]
    if weight.shape[-1] * (weight.shape[-2] * weight.shape[-3] if weight.dim() == 4 else 1) != dim:
        raise ConfigError(f"invalid model.init: {kind!r} ({design}'s first layer is not made of {shape} filters)")
    if weight.is_meta:  # templates are values, scaled to the design's own init: a meta tensor holds neither
        raise ConfigError(f"invalid model.init: {kind!r} on the meta device ({design}'s first layer would get its "
                          "templates' values, which a meta tensor cannot hold; build it on a real device, or with "
                          "model.init = 'learned' to count its parameters)")  # fmt: skip
    scale = float(weight.reshape(-1, dim).norm(dim=1).mean())  # rows (…, C·f·f)
    count = weight.shape[1] if weight.dim() == 3 else weight.shape[0]  # untied (L, K, P): K at every location
    rows = template_rows(kind, count, shape, scale=scale, seed=seed)  # (K, C·f·f)
    weight.copy_(rows.expand_as(weight) if weight.dim() == 3 else rows.reshape(weight.shape))


def _zero(grad: Tensor) -> Tensor:
    return torch.zeros_like(grad)


class FrozenParameter(nn.Parameter):
    """A parameter whose gradient is always zeros: a hook registered as it is made, so that a copy
    (``copy.deepcopy`` makes a new parameter, without the hooks of the old one) is frozen too. An optimizer with
    decoupled weight decay (AdamW) still shrinks it: give one :func:`trainable_parameters`."""

    def __new__(cls, data: Tensor | None = None, requires_grad: bool = True) -> FrozenParameter:
        parameter = super().__new__(cls, data, True)  # a hook needs a tensor that requires grad
        parameter.register_hook(_zero)
        return parameter.requires_grad_(requires_grad)  # a loaded run's parameters do not (it keeps the hook)

    def __reduce_ex__(self, protocol: object) -> tuple:  # pickled as itself (nn.Parameter's rebuilds a plain one)
        return (FrozenParameter, (self.data, self.requires_grad))


class _KeepFrozen:
    """A hook on the module that holds a frozen parameter, run before its ``forward`` and after it loads a state
    dict: where the parameter was replaced by a plain one (``load_state_dict(assign=True)``, ``to_empty`` from the
    ``meta`` device, a conversion under ``torch.__future__.set_swap_module_params_on_conversion``), it is made a
    :class:`FrozenParameter` again, on the same storage (not inside a ``torch.func`` transform, which refuses that: at
    the next call outside one). A class rather than a closure, so a module pickles."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def __call__(self, owner: nn.Module, *_: object) -> None:
        if not torch.compiler.is_compiling() and _transforms_active is not None and _transforms_active():
            return  # a torch.func transform refuses the requires_grad_ freezing needs: done at the next call outside
        parameter = getattr(owner, self.attribute)
        if isinstance(parameter, nn.Parameter) and not isinstance(parameter, FrozenParameter):
            setattr(owner, self.attribute, FrozenParameter(parameter.data, parameter.requires_grad))


def freeze(module: nn.Module, parameter: nn.Parameter, *, design: str) -> None:
    """Keep ``parameter`` fixed: it becomes a :class:`FrozenParameter` (its gradient zeros; it stays in the flat
    vector), and stays one where the module's parameters are replaced (:class:`_KeepFrozen`); the names of frozen
    parameters are listed in ``module.frozen``. Refused when nothing else of ``module`` would train."""
    others = [p for p in module.parameters() if p is not parameter and p.requires_grad]
    if not others:
        raise ConfigError(
            f"invalid model.freeze_first: true ({design} has nothing but its first layer to train; "
            "use model.name = sparse-ae, rbm or cat)"
        )
    names = [name for name, p in module.named_parameters() if p is parameter]
    for name in names:
        path, _, attribute = name.rpartition(".")
        owner = module.get_submodule(path) if path else module
        setattr(owner, attribute, FrozenParameter(parameter.data, parameter.requires_grad))
        keep = _KeepFrozen(attribute)
        owner.register_forward_pre_hook(keep)
        owner.register_load_state_dict_post_hook(keep)
    module.frozen = [*getattr(module, "frozen", []), *names]


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """``module``'s parameters but its frozen ones (named in ``module.frozen``, or :class:`FrozenParameter`s of a model
    inside yours): what to give a ``torch.optim`` optimizer, whose weight decay would otherwise move a frozen layer
    (downpour's own rules do not). Frozen parameters replaced since their module last ran are frozen again first."""
    for owner in module.modules():
        for hook in list(owner._forward_pre_hooks.values()):
            if isinstance(hook, _KeepFrozen):
                hook(owner)
    frozen = set(getattr(module, "frozen", ()))
    return [p for name, p in module.named_parameters() if name not in frozen and not isinstance(p, FrozenParameter)]


def apply_first_layer(module: nn.Module, weight: nn.Parameter, config: object, shape: tuple[int, int, int], *,
                      seed: int, design: str) -> None:  # fmt: skip
    """``model.init`` (templates unless ``learned``) and ``model.freeze_first`` on the first layer ``weight``."""
    kind = config.init  # type: ignore[attr-defined]
    if kind != "learned":
        set_first_layer(weight, kind, shape, seed=seed, design=design)
    if config.freeze_first:  # type: ignore[attr-defined]
        freeze(module, weight, design=design)
