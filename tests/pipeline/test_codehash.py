import sys

from edge_deploy.pipeline import codehash


def _clear():
    for cached in (codehash.module_file, codehash.closure, codehash.source_hash):
        cached.cache_clear()


def test_a_helper_two_imports_away_changes_the_hash(tmp_path, monkeypatch):
    package = tmp_path / "fakestages"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "stage.py").write_text("def run():\n    from fakestages import middle\n    return middle.go()\n")
    (package / "middle.py").write_text("from .helper import value\n\ndef go():\n    return value()\n")
    (package / "helper.py").write_text("def value():\n    return 1\n")
    (package / "unrelated.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _clear()
    assert codehash.closure(("fakestages.stage",), "fakestages") == (
        "fakestages", "fakestages.helper", "fakestages.middle", "fakestages.stage")
    before = codehash.source_hash(("fakestages.stage",), "fakestages")
    (package / "unrelated.py").write_text("X = 2\n")
    _clear()
    assert codehash.source_hash(("fakestages.stage",), "fakestages") == before
    (package / "helper.py").write_text("def value():\n    return 2\n")
    _clear()
    assert codehash.source_hash(("fakestages.stage",), "fakestages") != before
    sys.modules.pop("fakestages", None)
    _clear()


def test_stage_closures_follow_function_level_imports():
    # The quantize stage imports its quantization code inside run(): the hash must still cover it.
    modules = codehash.closure(("edge_deploy.pipeline.stages.quantize",))
    assert "edge_deploy.calibration.search" in modules and "edge_deploy.calibration.ranges" in modules
    assert "edge_deploy.pipeline.cli" not in modules
