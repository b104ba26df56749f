"""LocallyConnected2d's state dict carries its geometry: weights of the same shape from another geometry are refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from downpour.nn import LocallyConnected2d


def _weights(layer: LocallyConnected2d) -> torch.Tensor:
    return layer.weight.detach().clone()


@pytest.mark.parametrize(
    ("saved", "loading", "differs"),
    [
        ((1, 4, 88, 8, 2), (1, 4, 48, 8, 1), "stride=(2, 2)"),  # 41×41 locations of 8×8 fields, both
        ((1, 4, (7, 9), 3, 1), (1, 4, (9, 7), 3, 1), "in_size=(7, 9)"),  # 5×7 and 7×5: 35 locations
        ((2, 4, 10, 4, 2), (1, 4, (10, 14), (4, 8), 2), "in_channels=2"),  # 4×4 of 2·4·4 = 1·4·8 values
        ((1, 4, (4, 12), 4, 4), (1, 4, (12, 4), 4, 4), "output 1×3"),  # 3 locations, one row or one column
    ],
)
def test_weights_of_another_geometry_with_the_same_shape_are_refused(saved, loading, differs) -> None:
    """PyTorch checks shapes only; these pairs have equal weight shapes and loaded silently before. Now the load
    fails, as a size mismatch does (strict or not), names both geometries, and changes nothing."""
    source, target = LocallyConnected2d(*saved), LocallyConnected2d(*loading)
    assert source.weight.shape == target.weight.shape
    before = _weights(target)
    for strict in (True, False):
        with pytest.raises(RuntimeError, match="weights of another geometry") as caught:
            target.load_state_dict(source.state_dict(), strict=strict)
        assert differs in str(caught.value) and "this one has" in str(caught.value)
    assert torch.equal(target.weight, before)


def test_inside_a_model_the_refusal_names_the_layer(tmp_path: Path) -> None:
    """Nested layers, through a safetensors file (the geometry is an int64 tensor, so the file holds it)."""
    source = torch.nn.Sequential(torch.nn.Identity(), LocallyConnected2d(1, 2, 88, 8, stride=2))
    target = torch.nn.Sequential(torch.nn.Identity(), LocallyConnected2d(1, 2, 48, 8, stride=1))
    path = tmp_path / "model.safetensors"
    save_file(source.state_dict(), path)
    loaded = load_file(path)
    assert loaded["1._extra_state"].tolist() == [1, 2, 88, 88, 8, 8, 2, 2]
    with pytest.raises(RuntimeError, match=r"for Sequential:\s+LocallyConnected2d weights of another geometry"):
        target.load_state_dict(loaded)


def test_the_refusal_names_which_of_several_layers_it_is() -> None:
    """Stages of one class: the message named the class only, not which layer's weights were refused (PyTorch's size
    mismatch names the key)."""
    source = torch.nn.Sequential(LocallyConnected2d(1, 2, 48, 8), LocallyConnected2d(2, 2, 88, 8, stride=2))
    target = torch.nn.Sequential(LocallyConnected2d(1, 2, 48, 8), LocallyConnected2d(2, 2, 48, 8))
    refused = re.escape("LocallyConnected2d weights of another geometry (1._extra_state)")
    with pytest.raises(RuntimeError, match=refused):
        target.load_state_dict(source.state_dict())


def test_the_same_geometry_round_trips_and_assign_keeps_the_check(tmp_path: Path) -> None:
    geometry = (2, 3, (9, 13), (3, 5), (2, 3))
    source, target = LocallyConnected2d(*geometry, bias=True), LocallyConnected2d(*geometry, bias=True)
    path = tmp_path / "layer.safetensors"
    save_file(source.state_dict(), path)
    target.load_state_dict(load_file(path))
    assert torch.equal(target.weight, source.weight) and torch.equal(target.bias, source.bias)
    assigned = LocallyConnected2d(*geometry, bias=True)
    assigned.load_state_dict(source.state_dict(), assign=True)
    assert torch.equal(assigned.weight, source.weight)
    other = LocallyConnected2d(2, 3, (9, 13), (3, 5), (1, 3), bias=True)
    with pytest.raises(RuntimeError, match=re.escape("stride=(2, 3)")):
        other.load_state_dict({**source.state_dict(), "weight": torch.zeros_like(other.weight),
                               "bias": torch.zeros_like(other.bias)}, assign=True)  # fmt: skip


def test_an_input_size_that_only_leaves_more_uncovered_pixels_loads() -> None:
    """49 and 48 at kernel 8, stride 2 both give 21 locations per row with the same fields: the weights mean the
    same thing, so they load."""
    source, target = LocallyConnected2d(1, 2, 49, 8, 2), LocallyConnected2d(1, 2, 48, 8, 2)
    target.load_state_dict(source.state_dict())
    assert torch.equal(target.weight, source.weight)


def test_a_state_dict_saved_without_a_geometry_still_loads_strictly() -> None:
    source, target = LocallyConnected2d(1, 2, 12, 4), LocallyConnected2d(1, 2, 12, 4)
    older = {k: v for k, v in source.state_dict().items() if not k.endswith("_extra_state")}
    assert list(older) == ["weight"]
    result = target.load_state_dict(older, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(target.weight, source.weight)


@pytest.mark.parametrize(
    ("state", "message"),
    [
        (torch.tensor([1.5, 2, 12, 12, 4, 4, 1, 1]), r"must be 8 whole numbers, got torch.float32 \(8,\) \[1.5, "),
        (torch.tensor([1, 2, 12, 12, 4, 4, 1]), r"must be 8 whole numbers, got torch.int64 \(7,\)"),
        ("1,2,12,12,4,4,1,1", "must be 8 whole numbers, got str"),
        (torch.zeros(8, dtype=torch.int64, device="meta"), r"must be 8 whole numbers, got torch.int64 \(8,\)$"),
        (torch.tensor([1, 2, 12, 12, 4, 4, 0, 1]), "not a valid one"),
        (torch.tensor([1, 2, 3, 12, 4, 4, 1, 1]), "not a valid one"),
    ],
)
def test_a_malformed_saved_geometry_is_named(state: object, message: str) -> None:
    layer = LocallyConnected2d(1, 2, 12, 4)
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict({"weight": torch.zeros_like(layer.weight), "_extra_state": state})
    with pytest.raises(ValueError, match=message):
        layer.set_extra_state(state)


def test_a_state_dict_cast_whole_to_half_precision_still_loads() -> None:
    """``{k: v.half() for ...}`` (a common way to save half-size weights) turns the geometry into floats too; its
    numbers are still whole, so it loads, and a geometry that differs is still refused."""
    source = LocallyConnected2d(1, 2, 12, 4)
    halved = {k: v.half() for k, v in source.state_dict().items()}
    target = LocallyConnected2d(1, 2, 12, 4).half()
    target.load_state_dict(halved)
    assert torch.equal(target.weight, source.weight.half())
    with pytest.raises(RuntimeError, match=re.escape("stride=(1, 1)")):
        LocallyConnected2d(1, 2, 22, 4, stride=2).half().load_state_dict(halved)


def test_a_layer_made_on_the_meta_device_saves_a_geometry_that_loads() -> None:
    """Under ``with torch.device("meta")`` the geometry was made on the meta device, without numbers to check."""
    with torch.device("meta"):
        planned = LocallyConnected2d(1, 2, 12, 4)
    geometry = planned.state_dict()["_extra_state"]
    assert geometry.device.type == "cpu" and geometry.dtype == torch.int64
    real = LocallyConnected2d(1, 2, 12, 4)
    real.load_state_dict({"weight": torch.ones_like(real.weight), "_extra_state": geometry})
    assert bool((real.weight == 1).all())
