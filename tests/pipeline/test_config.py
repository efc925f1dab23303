import pytest

from edge_deploy.pipeline.config import dump_config, load_config, validate
from edge_deploy.pipeline.errors import ConfigError


def test_unknown_keys_are_named_with_a_suggestion(tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text("target: cpu\nquantise:\n  method: minmax\n")
    with pytest.raises(ConfigError, match=r"unknown key 'quantise' \(did you mean 'quantize'\?\)"):
        load_config(config, {})
    config.write_text("quantize:\n  methd: minmax\n")
    with pytest.raises(ConfigError, match=r"unknown key 'quantize.methd' \(did you mean 'method'\?\)"):
        load_config(config, {})


def test_flags_override_the_file(tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text("precision: fp32\nprobe:\n  runs: 60\n")
    resolved = load_config(config, {"precision": "int8", "probe.threads": 1, "probe.runs": None})
    assert resolved.precision == "int8" and resolved.probe.runs == 60 and resolved.probe.threads == 1


def test_printed_config_round_trips(tmp_path):
    resolved = load_config(None, {"calibration.size": 64})
    config = tmp_path / "printed.yaml"
    config.write_text(dump_config(resolved))
    assert load_config(config, {}) == resolved


@pytest.mark.parametrize("raw, message", [
    ({"probe": {"runs": 10}}, "probe.runs"),
    ({"precision": "int3"}, "precision"),
    ({"quantize": {"method": "magic"}}, "quantize.method"),
])
def test_bad_values_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        validate(raw, "deploy.yaml")


def test_not_a_mapping(tmp_path):
    config = tmp_path / "deploy.yaml"
    config.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(config, {})
