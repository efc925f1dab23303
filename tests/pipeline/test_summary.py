"""The printed summary shows every drop with its interval, and a cached verify's flags."""

from types import SimpleNamespace

import pytest

from edge_deploy.pipeline.results import Accuracy, AccuracyReport, ImageSplit
from edge_deploy.pipeline.summary import render_summary

FLAG = {"flag": "interval-wider-than-budget", "message": "INT8 on cpu's mAP50-95 drop's 95% interval 3.87..17.88 "
        "points is wider than 2x the 0.10 point budget: the evaluation set is too small or unrepresentative"}


def build_result(cache_hit: bool):
    split = ImageSplit("report", "val", 6, "f" * 64)
    report = AccuracyReport(
        "INT8 on cpu", Accuracy(0.88, 0.7061, 6, 20, map50_95_interval=[0.6845, 0.731]),
        Accuracy(0.80, 0.6, 6, 20, map50_95_interval=[0.55, 0.66]), 10.61, 0.1, False, split,
        drop_interval=[3.87, 17.88], flags=[FLAG], threads=1)
    records = [SimpleNamespace(name="verify", seconds=0.5, cache_hit=cache_hit, metrics=report.to_json())]
    return SimpleNamespace(records=records, metrics=lambda name: report.to_json(), speed=None, bundle_changed=False,
                           bundle="dist/x", record_path="dist/x.build.json")


@pytest.mark.parametrize("cache_hit", [True, False])
def test_drop_interval_is_shown_and_a_cached_verify_repeats_its_flags(cache_hit, capsys):
    render_summary(build_result(cache_hit), None)
    out = capsys.readouterr().out
    assert "drop 10.61 pts (95% 3.87..17.88)" in out
    assert "10.61 mAP50-95 points, 95% interval 3.87..17.88 (paired bootstrap over the 6 report images)" in out
    assert "mAP50-95 0.7061 (95% 0.6845..0.7310)" in out
    # A verify that ran warned on stderr as it ran (tests/pipeline/stages/test_verify.py); only a cached one repeats.
    assert ("warning: verify: INT8 on cpu's mAP50-95 drop's 95% interval" in out) == cache_hit
