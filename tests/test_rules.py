"""Server-side update rules: SGD and Adagrad against hand-computed values, and their config checks."""

from __future__ import annotations

import math

import pytest
import torch

from downpour.errors import ConfigError
from downpour.ps import rules
from downpour.ps.rules import SGD, Adagrad, PushMeta, ShardState, adagrad, make_rule, sgd

META = PushMeta(worker=0, fetched_version=0, version=0)


def _state(values: list[float], sum_sq: list[float] | None = None, dtype: torch.dtype = torch.float32) -> ShardState:
    state = {} if sum_sq is None else {"sum_sq": torch.tensor(sum_sq, dtype=dtype)}
    return ShardState(torch.tensor(values, dtype=dtype), state)


def _empty_like(state: ShardState) -> ShardState:
    return ShardState(
        torch.full_like(state.values, 123.0), {k: torch.full_like(v, 456.0) for k, v in state.state.items()}
    )


# SGD with lr = 0.1, w = [1, 2, 3], g = [0.5, -1, 2]:
#   w' = w - 0.1 g = [1 - 0.05, 2 + 0.1, 3 - 0.2] = [0.95, 2.1, 2.8]
SGD_W = [1.0, 2.0, 3.0]
SGD_G = [0.5, -1.0, 2.0]
SGD_EXPECTED = [0.95, 2.1, 2.8]

# Adagrad with lr = 0.1, eps = 1e-8, w = [1, 2, 3], G = [0, 1, 0], g = [1, -2, 0]:
#   G' = G + g²              = [1, 5, 0]
#   w' = w - 0.1 g / (√G' + eps)
#      = [1 - 0.1/1,  2 + 0.2/√5,  3 - 0/(0 + eps)]
#      = [0.9, 2.0894427191, 3.0]          (√5 = 2.2360679775; a zero gradient with G = 0 leaves w alone, no NaN)
# A second identical push: G'' = [2, 9, 0]
#   w'' = [0.9 - 0.1/√2, 2.0894427191 + 0.2/3, 3.0] = [0.8292893219, 2.1561093858, 3.0]
ADA_W = [1.0, 2.0, 3.0]
ADA_G0 = [0.0, 1.0, 0.0]
ADA_GRAD = [1.0, -2.0, 0.0]
ADA_STEP1 = ([0.9, 2.0894427191, 3.0], [1.0, 5.0, 0.0])
ADA_STEP2 = ([0.8292893219, 2.1561093858, 3.0], [2.0, 9.0, 0.0])


def _close(actual: torch.Tensor, expected: list[float], tol: float = 1e-6) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=tol, rtol=0)


def test_sgd_function_hand_values() -> None:
    """``sgd`` writes w - lr·g into ``out`` and leaves its inputs alone."""
    values, update, out = torch.tensor(SGD_W), torch.tensor(SGD_G), torch.zeros(3)
    sgd(values, update, lr=0.1, out=out)
    _close(out, SGD_EXPECTED)
    _close(values, SGD_W, tol=0)
    _close(update, SGD_G, tol=0)


def test_sgd_function_in_place() -> None:
    """``out`` may be the values tensor itself."""
    values = torch.tensor(SGD_W)
    sgd(values, torch.tensor(SGD_G), lr=0.1, out=values)
    _close(values, SGD_EXPECTED)


def test_sgd_rule_hand_values() -> None:
    """The ``SGD`` class applies the same update from the current buffer into the other one."""
    current = _state(SGD_W)
    out = _empty_like(current)
    rule = SGD(lr=0.1)
    rule(META, torch.tensor(SGD_G), current, out)
    _close(out.values, SGD_EXPECTED)
    _close(current.values, SGD_W, tol=0)
    assert rule.name == "sgd"
    assert rule.state_names == ()


def test_adagrad_function_hand_values_two_steps() -> None:
    """``adagrad`` accumulates g² and divides by √G + eps; zero gradient on zero history stays finite."""
    current = _state(ADA_W, ADA_G0)
    update = torch.tensor(ADA_GRAD)
    for expected_w, expected_g in (ADA_STEP1, ADA_STEP2):
        out_w, out_g = torch.zeros(3), torch.zeros(3)
        adagrad(current.values, current.state["sum_sq"], update, lr=0.1, eps=1e-8, out=out_w, out_sum_sq=out_g)
        _close(out_w, expected_w)
        _close(out_g, expected_g)
        current = ShardState(out_w, {"sum_sq": out_g})


def test_adagrad_function_leaves_inputs_alone() -> None:
    """The pure function only writes the ``out`` tensors."""
    values, sum_sq, update = torch.tensor(ADA_W), torch.tensor(ADA_G0), torch.tensor(ADA_GRAD)
    adagrad(values, sum_sq, update, lr=0.1, eps=1e-8, out=torch.zeros(3), out_sum_sq=torch.zeros(3))
    _close(values, ADA_W, tol=0)
    _close(sum_sq, ADA_G0, tol=0)


def test_adagrad_eps_is_added_to_the_root() -> None:
    """w' = w - lr·g/(√G' + eps): with g = 1, G = 0 and eps = 1 the step is lr/2, not lr/√(1 + 1)."""
    out_w, out_g = torch.zeros(1), torch.zeros(1)
    adagrad(torch.zeros(1), torch.zeros(1), torch.ones(1), lr=1.0, eps=1.0, out=out_w, out_sum_sq=out_g)
    _close(out_w, [-0.5])
    _close(out_g, [1.0])


def test_adagrad_rule_adds_its_own_eps_on_every_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Adagrad class uses ps.adagrad_eps, not the 1e-8 default, on the fused float32 path and the reference one:
    lr = 1, eps = 1, w = 0, G = 0, g = 1 → G' = 1, w' = 0 − 1·1/(√1 + 1) = −0.5 (eps 1e-8 would give −1). The
    buffers are separate, as a shard's are (the fused path then copies the live buffer into the spare one)."""
    for fused in (rules._FUSED_ADAGRAD, None):
        monkeypatch.setattr(rules, "_FUSED_ADAGRAD", fused)
        current = _state([0.0], [0.0])
        out = _empty_like(current)
        Adagrad(lr=1.0, eps=1.0)(META, torch.ones(1), current, out)
        _close(out.values, [-0.5])
        _close(out.state["sum_sq"], [1.0])
        _close(current.values, [0.0], tol=0)  # the live buffer is not written


@pytest.mark.parametrize("in_place", [False, True])
def test_adagrad_rule_hand_values_two_steps(in_place: bool) -> None:
    """The ``Adagrad`` class (fused kernel for float32 when PyTorch has it) matches the hand values."""
    rule = Adagrad(lr=0.1, eps=1e-8)
    current = _state(ADA_W, ADA_G0)
    update = torch.tensor(ADA_GRAD)
    for expected_w, expected_g in (ADA_STEP1, ADA_STEP2):
        out = current if in_place else _empty_like(current)
        before = current.values.clone()
        rule(META, update, current, out)
        _close(out.values, expected_w)
        _close(out.state["sum_sq"], expected_g)
        if not in_place:
            _close(current.values, before.tolist(), tol=0)  # the live buffer is never written
        current = out
    assert rule.name == "adagrad"
    assert rule.state_names == ("sum_sq",)


def test_adagrad_rule_float64_uses_reference_path() -> None:
    """Non-float32 updates take the pure-function path and give the same hand values."""
    rule = Adagrad(lr=0.1, eps=1e-8)
    current = _state(ADA_W, ADA_G0, dtype=torch.float64)
    out = _empty_like(current)
    rule(META, torch.tensor(ADA_GRAD, dtype=torch.float64), current, out)
    _close(out.values, ADA_STEP1[0], tol=1e-9)
    _close(out.state["sum_sq"], ADA_STEP1[1], tol=1e-9)


def test_adagrad_rule_agrees_with_pure_function_on_random_data() -> None:
    """Twenty random pushes: the class (fused or not) and the pure function stay within 1e-6 of each other."""
    generator = torch.Generator().manual_seed(0)
    size = 1000
    rule = Adagrad(lr=0.02, eps=1e-8)
    initial = torch.randn(size, generator=generator)
    ours = ShardState(initial.clone(), {"sum_sq": torch.zeros(size)})
    ref_w, ref_g = initial.clone(), torch.zeros(size)
    for _ in range(20):
        update = torch.randn(size, generator=generator) * 3
        out = _empty_like(ours)
        rule(META, update, ours, out)
        new_w, new_g = torch.empty(size), torch.empty(size)
        adagrad(ref_w, ref_g, update, lr=0.02, eps=1e-8, out=new_w, out_sum_sq=new_g)
        ours, ref_w, ref_g = out, new_w, new_g
    torch.testing.assert_close(ours.values, ref_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours.state["sum_sq"], ref_g, atol=1e-6, rtol=1e-6)
    assert (ours.values - initial).abs().mean() > 1e-2  # the parameters really moved


@pytest.mark.skipif(rules._FUSED_ADAGRAD is None, reason="this PyTorch has no torch._fused_adagrad_")
def test_fused_kernel_is_used_for_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    """float32 updates go through the fused kernel when it exists (the fast path is really taken)."""
    calls = []
    real = rules._FUSED_ADAGRAD

    def spy(*args: object, **kwargs: object) -> None:
        calls.append(kwargs)
        real(*args, **kwargs)

    monkeypatch.setattr(rules, "_FUSED_ADAGRAD", spy)
    current = _state(ADA_W, ADA_G0)
    out = _empty_like(current)
    Adagrad(lr=0.1)(META, torch.tensor(ADA_GRAD), current, out)
    assert len(calls) == 1
    assert calls[0]["lr"] == 0.1 and calls[0]["lr_decay"] == 0.0 and calls[0]["weight_decay"] == 0.0
    _close(out.values, ADA_STEP1[0])


def test_adagrad_without_fused_kernel_matches_hand_values(monkeypatch: pytest.MonkeyPatch) -> None:
    """With no fused kernel (older PyTorch) the class falls back to the pure function."""
    monkeypatch.setattr(rules, "_FUSED_ADAGRAD", None)
    current = _state(ADA_W, ADA_G0)
    out = _empty_like(current)
    Adagrad(lr=0.1)(META, torch.tensor(ADA_GRAD), current, out)
    _close(out.values, ADA_STEP1[0])
    _close(out.state["sum_sq"], ADA_STEP1[1])


@pytest.mark.parametrize("cls", [SGD, Adagrad])
@pytest.mark.parametrize("lr", [0.0, -1.0, math.nan])
def test_invalid_lr_raises_config_error(cls: type, lr: float) -> None:
    """lr must be > 0; the error names ``ps.lr`` and echoes the value."""
    with pytest.raises(ConfigError, match=r"ps\.lr") as info:
        cls(lr=lr)
    assert repr(lr) in str(info.value)


@pytest.mark.parametrize("eps", [0.0, -1e-8, math.inf, math.nan])
def test_invalid_adagrad_eps_raises_config_error(eps: float) -> None:
    """eps must be a finite number > 0 (an infinite eps makes every step lr·g/∞ = 0: a run that trains nothing);
    the error names ``ps.adagrad_eps``."""
    with pytest.raises(ConfigError, match=r"ps\.adagrad_eps") as info:
        Adagrad(lr=0.1, eps=eps)
    assert repr(eps) in str(info.value)


def test_config_error_is_a_value_error() -> None:
    """Callers catching ValueError also catch a bad rule setting."""
    with pytest.raises(ValueError):
        SGD(lr=-1.0)


def test_make_rule_builds_each_rule() -> None:
    """``make_rule`` passes lr and eps through to the named rule."""
    rule = make_rule("sgd", lr=0.5)
    assert isinstance(rule, SGD) and rule.lr == 0.5
    rule = make_rule("adagrad", lr=0.25, adagrad_eps=1e-4)
    assert isinstance(rule, Adagrad) and rule.lr == 0.25 and rule.eps == 1e-4


@pytest.mark.parametrize("name", ["nope", "SGD", "", "adam"])
def test_make_rule_unknown_name(name: str) -> None:
    """An unknown rule name raises ConfigError naming ``ps.rule`` and the value."""
    with pytest.raises(ConfigError, match=r"ps\.rule") as info:
        make_rule(name, lr=0.1)
    assert repr(name) in str(info.value)


def test_make_rule_checks_lr() -> None:
    """``make_rule`` validates lr too."""
    with pytest.raises(ConfigError, match=r"ps\.lr"):
        make_rule("adagrad", lr=-1.0)


def test_push_meta_staleness() -> None:
    """Staleness is the version at apply minus the version fetched."""
    assert PushMeta(worker=3, fetched_version=4, version=9).staleness == 5
    assert PushMeta(worker=0, fetched_version=7, version=7).staleness == 0
