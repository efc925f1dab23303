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


def test_search_returns_its_front_and_refuses_a_budget_nobody_meets(deploy_home, small_shapes_yaml, tmp_path):
    from edge_deploy.pipeline.errors import AccuracyGateError

    # The smallest space the search tests use: unpruned FP32 at the baseline's 96 px and at 64 px.
    settings = dict(target="cpu", data=str(small_shapes_yaml), imgsz=96, output=str(tmp_path / "dist"),
                    home=deploy_home, probe={"runs": 50})
    space = {"precisions": ["fp32"], "prune_ratios": [0.0], "max_trials": 2, "workers": 1}
    found = edge_deploy.search(**settings, search={**space, "imgsz": [64, 96]})
    assert isinstance(found, edge_deploy.SearchResult) and len(found.trials) == 2 and found.executed == 2
    assert all(t.status == "done" and t.p50_ms > 0 for t in found.trials)
    # Within 1 point: only the baseline itself (64 px loses more on this data), which is on the front.
    assert found.best.spec.imgsz == 96 and found.best.drop_points == 0 and found.best in found.front
    assert found.picked is None
    assert found.record_path.is_file() and found.plot_path.is_file()

    # Without the baseline's size, no trial is within 0.01 points: a typed error, unless the drop is accepted.
    impossible = {**space, "imgsz": [64], "max_map_drop": 0.01}
    with pytest.raises(AccuracyGateError, match="no trial is within 0.01 mAP50-95 points.*64px fp32"):
        edge_deploy.search(**settings, search=impossible)
    accepted = edge_deploy.search(**settings, search={**impossible, "accept_drop": True})
    assert accepted.best is None and accepted.best_found.spec.imgsz == 64 and accepted.best_found.drop_points > 0.01
    # Every trial was on record from the first search: nothing ran again.
    assert accepted.executed == 0 and accepted.reused == 2
