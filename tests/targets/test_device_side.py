"""The files a device job carries stand alone on the device: Python 3.8 (JetPack 5, older boards), the standard
library, the runtime the runner drives, and each other; the package only behind a fallback to the copy beside it.

Read with `ast`, nothing imported. Only syntax is checked against 3.8 by the parser, so the names of the
standard library's later additions that a device-side file could reach for are refused here too.
"""

from __future__ import annotations

import ast
import sys

import pytest

from edge_deploy.targets.transports import SHARED
RUNTIMES = {"numpy", "onnxruntime", "ncnn"}
# Standard-library modules and methods newer than Python 3.8.
NEWER_MODULES = {"graphlib", "zoneinfo", "tomllib"}
NEWER_METHODS = {"removeprefix", "removesuffix", "is_relative_to", "with_stem", "readlink", "hardlink_to",
                 "bit_count", "cache"}


def device_files() -> dict:
    """Every file that travels to a device, with the module names that travel beside it in the same job."""
    from edge_deploy.targets import TARGETS as REGISTRY
    from edge_deploy.targets import load_target

    files = {}
    for name in REGISTRY:
        target = load_target(name)
        shipped = [target.runner, *SHARED, *getattr(target, "runner_support", ())]
        siblings = {path.stem for path in shipped}
        for path in shipped:
            files.setdefault(path.resolve(), set()).update(siblings)
    return files


DEVICE_FILES = device_files()


def imported_modules(tree: ast.AST) -> set:
    names = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}
    return names | {node.module.split(".")[0] for node in ast.walk(tree)
                    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0}


def package_imports_with_fallback(tree: ast.AST) -> tuple:
    """(names imported from edge_deploy under `try`, names the `except ImportError` imports instead)."""
    from_package, fallback = set(), set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        catches_import_error = any(isinstance(h.type, ast.Name) and h.type.id == "ImportError" for h in node.handlers)
        for statement in node.body:
            if isinstance(statement, ast.ImportFrom) and (statement.module or "").startswith("edge_deploy"):
                assert catches_import_error, f"line {statement.lineno}: edge_deploy imported without a fallback"
                from_package |= {alias.name for alias in statement.names}
        if catches_import_error:
            for handler in node.handlers:
                fallback |= {alias.name for s in handler.body if isinstance(s, ast.Import) for alias in s.names}
    return from_package, fallback


def test_every_target_ships_the_shared_modules():
    names = {path.name for path in DEVICE_FILES}
    assert {"launch.py", "measure.py", "power.py", "tegrastats.py", "trtexec.py"} <= names
    # One flat folder on the device: two different files of one name would overwrite each other.
    stems = [path.stem for path in DEVICE_FILES if path.name != "runner.py"]
    assert len(stems) == len(set(stems)), sorted(stems)


@pytest.mark.parametrize("path", sorted(DEVICE_FILES), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_device_side_file_stands_alone_on_python_3_8(path):
    source = path.read_text()
    tree = ast.parse(source, feature_version=(3, 8))
    siblings = DEVICE_FILES[path] - {path.stem}
    allowed = (set(sys.stdlib_module_names) - NEWER_MODULES) | {"__future__", "edge_deploy"} | siblings | RUNTIMES
    imported = imported_modules(tree)
    assert imported <= allowed, imported - allowed
    from_package, fallback = package_imports_with_fallback(tree)
    # What comes from the package here comes from the copy beside the script there, and is shipped with it.
    assert from_package == fallback and fallback <= siblings, (from_package, fallback, siblings)
    newer = {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)} & NEWER_METHODS
    assert not newer, f"newer than Python 3.8: {newer}"
    # Annotations such as `str | None` and `list[str]` are only text under this import on 3.8.
    assert "from __future__ import annotations" in source
