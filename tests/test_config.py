"""Typed settings: recipes, dotted overrides, presets, and messages that name the bad key."""

import pytest

from murmur.config import load_settings
from murmur.errors import SettingsError
from murmur.model import count_params
from murmur.settings.model import MODEL_PRESETS, ModelSettings


def test_recipe_and_overrides(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[run]\nname = "x"\n[model]\npreset = "tiny-cpu"\ndim = 128\n[train]\nlr = 1e-3\n')
    s = load_settings(recipe, ["train.lr=3e-4", "train.parallel.tp=2", 'data.sources=["text:a.txt"]'])
    assert s.run.name == "x"
    assert s.model.dim == 128 and s.model.n_layers == MODEL_PRESETS["tiny-cpu"]["n_layers"]  # explicit key wins
    assert s.train.lr == 3e-4 and s.train.parallel.tp == 2
    assert s.data.sources == ["text:a.txt"]


def test_unknown_key_names_it_and_suggests(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train]\nlrr = 1\n")
    with pytest.raises(SettingsError, match=r"unknown setting 'train.lrr' \(did you mean 'train.lr'\?\)"):
        load_settings(recipe)


def test_wrong_type_names_key_and_value():
    with pytest.raises(SettingsError, match=r"setting 'train.steps'.*valid integer.*'many'"):
        load_settings(None, ["train.steps=many"])


def test_bad_choice_lists_allowed_values():
    with pytest.raises(SettingsError, match=r"'cosine', 'wsd' or 'constant'"):
        load_settings(None, ["train.schedule=linear"])


def test_unknown_preset_lists_known_ones():
    with pytest.raises(SettingsError, match="known presets: tiny-cpu, 124m, 1b, 8b, 70b, 405b"):
        load_settings(None, ['model.preset="13b"'])


def test_malformed_override_and_recipe(tmp_path):
    with pytest.raises(SettingsError, match="section.key=value"):
        load_settings(None, ["train.lr"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr=1")
    with pytest.raises(SettingsError, match="not valid TOML"):
        load_settings(bad)
    with pytest.raises(SettingsError, match="not found"):
        load_settings(tmp_path / "missing.toml")


def test_inconsistent_shape_is_refused():
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        ModelSettings(dim=64, n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("name,expected,tolerance", [
    # Published sizes: Llama 3.2 1B 1.24B, Llama 3.1 8B 8.03B, 70B 70.6B, 405B 405.9B parameters.
    ("1b", 1.236e9, 0.01), ("8b", 8.030e9, 0.001), ("70b", 70.55e9, 0.005), ("405b", 405.85e9, 0.005),
    ("124m", 124e6, 0.03)])
def test_presets_match_published_sizes(name, expected, tolerance):
    assert abs(count_params(ModelSettings(preset=name)) / expected - 1) < tolerance


def test_tiny_cpu_is_a_few_million_parameters():
    assert 2e6 < count_params(ModelSettings(preset="tiny-cpu")) < 10e6
