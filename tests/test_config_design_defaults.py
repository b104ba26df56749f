"""Design defaults: `--set model.name=cat|conv` alone gives a configuration that builds, and named keys win."""

from __future__ import annotations

from pathlib import Path

import pytest

from downpour import config as config_mod
from downpour.errors import ConfigError
from downpour.models import build_model


def test_cat_gets_image_crops_and_conv_a_field_that_fits_the_patches() -> None:
    cat = config_mod.load(None, ["model.name=cat"])
    assert cat.data.source == "natural-images" and cat.model.receptive_field == 18
    conv = config_mod.load(None, ["model.name=conv"])
    assert conv.model.receptive_field == 8 and conv.data.source == "natural-patches"
    rica = config_mod.load(None, [])
    assert rica.data.source == "natural-patches" and rica.model.receptive_field == 18


def test_keys_named_on_the_command_line_or_in_the_file_win(tmp_path: Path) -> None:
    assert config_mod.load(None, ["model.name=conv", "model.receptive_field=5"]).model.receptive_field == 5
    file = tmp_path / "run.toml"
    file.write_text('[model]\nname = "cat"\n[data]\nsource = "natural-patches"\npatch_size = 32\n')
    assert config_mod.load(file, []).data.source == "natural-patches"
    assert config_mod.load(None, ["model.name=cat", "data.patch_size=48"]).data.source == "natural-patches"
    file.write_text('[model]\nname = "conv"\nreceptive_field = 6\n')
    assert config_mod.load(file, []).model.receptive_field == 6


def test_the_defaults_build_and_a_too_small_example_still_names_its_keys() -> None:
    conv = config_mod.load(None, ["model.name=conv", "model.features=4"])
    side = conv.data.patch_size
    model = build_model(conv.model, side * side, seed=0, shape=(1, side, side))
    assert model.filter_shape == (1, 8, 8)
    bad = config_mod.load(None, ["model.name=cat", "data.source=natural-patches"])
    with pytest.raises(ConfigError, match=r"stage 1 sees 16x16 inputs.*data\.patch_size"):
        build_model(bad.model, 16 * 16, seed=0, shape=(1, 16, 16))


def test_the_staleness_study_applies_them_too() -> None:
    from downpour.study.staleness import STUDY_DEFAULTS, study_config

    conv = study_config(None, ["model.name=conv"])
    assert conv.model.receptive_field == 8
    assert conv.data.source == STUDY_DEFAULTS["data"]["source"]  # the study's own default counts as named
