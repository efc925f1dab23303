"""The public Python API: a build scripted from Python returns the same typed results the CLI renders."""

import pytest

import edge_deploy
from edge_deploy.pipeline.errors import ConfigError


def test_build_returns_typed_reports(deploy_home, shapes_yaml, tmp_path):
    result = edge_deploy.build(target="cpu", precision="fp32", output=str(tmp_path / "dist"), home=deploy_home,
                               probe={"runs": 50, "warmup": 1})
    assert result.bundle == tmp_path / "dist" / "yolov8n-160-cpu-fp32" and (result.bundle / "manifest.json").exists()
    # At FP32 on cpu the artifact is the reference itself: measured once, reported as such.
    assert result.accuracy.artifact is None and result.accuracy.drop_points == 0.0
    assert result.accuracy.reference.map50_95 > 0.6 and result.accuracy.split.role == "report"
    assert result.speed.artifact is None and result.speed.reference.runs == 50


def test_settings_are_validated_like_the_config_file(deploy_home, tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'quantize.methd'"):
        edge_deploy.build(quantize={"methd": "minmax"}, home=deploy_home, output=str(tmp_path))
