"""Config loading: presets, overrides, and clear errors naming the field."""

import json

import pytest

from m6.config import PRESETS, Config, ConfigError, load, preset


def test_every_preset_builds_and_validates():
    for name in PRESETS:
        c = preset(name)
        assert isinstance(c, Config) and c.preset == name


def test_file_overrides_a_preset(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"preset": "demo", "train": {"lr": 1, "steps": 7}, "data": {"min_cjk_ratio": 0.5}}))
    c = load(p)
    assert c.preset == "demo" and c.train.lr == 1.0 and c.train.steps == 7
    assert c.model.d_model == preset("demo").model.d_model  # untouched fields keep the preset's value


@pytest.mark.parametrize(
    "data, match",
    [
        ({"train": {"lr": "fast"}}, r"train\.lr: expected float, got str 'fast'"),
        ({"train": {"steps": 1.5}}, r"train\.steps: expected int"),
        ({"trian": {}}, r"unknown config key trian"),
        ({"data": {"bogus": 1}}, r"unknown config key data\.bogus"),
        ({"train": {"zero_stage": 5}}, r"train\.zero_stage"),
        ({"model": {"num_experts": 6, "num_prototypes": 4}}, r"num_experts \(6\) must divide"),
        ({"data": {"blocklist": "spam"}}, r"data\.blocklist: expected a list"),
    ],
)
def test_bad_config_names_the_field(tmp_path, data, match):
    p = tmp_path / "c.yaml"
    import yaml

    p.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=match):
        load(p)


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError, match="unknown preset 'huge'.*tiny"):
        preset("huge")
