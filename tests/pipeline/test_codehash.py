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


def test_a_parent_package_counts_with_its_import_time_code_only(tmp_path, monkeypatch):
    # A package whose function imports the whole project (as edge_deploy.build() does) must not make every
    # stage's key depend on every module; what the package runs when it is imported still counts.
    package = tmp_path / "fakeroot"
    (package / "stages").mkdir(parents=True)
    (package / "__init__.py").write_text(
        "from .settings import X\n\ntry:\n    import numpy\nexcept ImportError:\n    from . import fallback\n\n"
        "class Loaded:\n    from . import plugins\n\ndef build():\n    from fakeroot import report\n")
    (package / "settings.py").write_text("X = 1\n")
    (package / "fallback.py").write_text("Y = 1\n")
    (package / "plugins.py").write_text("Z = 1\n")
    (package / "report.py").write_text("LAYOUT = 1\n")
    (package / "stages" / "__init__.py").write_text("")
    (package / "stages" / "prune.py").write_text("def run():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    _clear()
    assert codehash.closure(("fakeroot.stages.prune",), "fakeroot") == (
        "fakeroot", "fakeroot.fallback", "fakeroot.plugins", "fakeroot.settings", "fakeroot.stages",
        "fakeroot.stages.prune")
    before = codehash.source_hash(("fakeroot.stages.prune",), "fakeroot")
    (package / "report.py").write_text("LAYOUT = 2\n")
    _clear()
    assert codehash.source_hash(("fakeroot.stages.prune",), "fakeroot") == before
    (package / "settings.py").write_text("X = 2\n")
    _clear()
    assert codehash.source_hash(("fakeroot.stages.prune",), "fakeroot") != before
    # Imported by name, the same package counts whole.
    (package / "stages" / "prune.py").write_text("def run():\n    import fakeroot\n    return fakeroot.build()\n")
    _clear()
    assert "fakeroot.report" in codehash.closure(("fakeroot.stages.prune",), "fakeroot")
    for name in [m for m in sys.modules if m.startswith("fakeroot")]:
        sys.modules.pop(name)
    _clear()


def test_the_report_and_the_cli_are_outside_the_training_stages_keys():
    for stage in ("prune", "quantize", "export"):
        modules = codehash.closure((f"edge_deploy.pipeline.stages.{stage}",))
        assert "edge_deploy.pipeline.report" not in modules and "edge_deploy.pipeline.build" not in modules, stage
