"""The import layering of edge_deploy, read from the source with `ast` (nothing is imported).

Every import counts, including those inside functions and methods: the stages import their heavy
dependencies lazily, and a lazy import still ties the importer to the imported module.
"""

from __future__ import annotations

import ast
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = "edge_deploy"
# The folders' names before they became subpackages of edge_deploy; an import of them would only work from the
# repository root, never from an installed package.
LEGACY_TOP_LEVEL = {"pipeline", "targets", "calibration"}

CORE = {f"edge_deploy.pipeline.{name}" for name in ("errors", "artifacts", "engine", "config", "results", "codehash",
                                                           "userfiles")}
STAGES = "edge_deploy.pipeline.stages"
BUILD = "edge_deploy.pipeline.build"
CLI = "edge_deploy.pipeline.cli"
SUMMARY = "edge_deploy.pipeline.summary"
EVALUATE = "edge_deploy.pipeline.evaluate"
TARGETS = "edge_deploy.targets"
CALIBRATION = "edge_deploy.calibration"
# What any module may import from targets/ without depending on a concrete target.
TARGET_NEUTRAL = {TARGETS, f"{TARGETS}.base", f"{TARGETS}.transports"}
# The modules whose job is to pick a concrete target.
MAY_IMPORT_CONCRETE_TARGETS = {PROJECT, BUILD, CLI}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module
    file: str  # its path relative to the repository, for messages
    line: int
    target: str  # imported module (or, when not in the tree, the name as written)

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.source}) -> {self.target}"


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


@cache
def package_dirs() -> dict[str, Path]:
    # pyproject's package-dir is the one place that says which folder is which package.
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: REPO / folder for name, folder in config["package-dir"].items() if name.split(".")[0] == PROJECT}


@cache
def source_files() -> dict[str, Path]:
    """Module name -> file, for every .py file of the installed packages (data files like embedded/*.pt skip)."""
    modules: dict[str, Path] = {}
    for package, folder in package_dirs().items():
        for path in sorted(folder.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([package, *parts])] = path
    return modules


def is_project(name: str) -> bool:
    return within(name, PROJECT)


def imports_in(source: str, module: str, is_package: bool, known: set[str], file: str = "<string>") -> list[Edge]:
    """Every project import anywhere in `source` (module level, functions, classes, try/if blocks)."""
    edges: list[Edge] = []
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source, filename=file)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from X import Y` depends on X, and on X.Y as well when Y is a submodule rather than a name in X.
            names = [base] + [f"{base}.{alias.name}" for alias in node.names
                              if alias.name != "*" and f"{base}.{alias.name}" in known]
        else:
            continue
        edges.extend(Edge(module, file, node.lineno, name) for name in names
                     if is_project(name) or name.split(".")[0] in LEGACY_TOP_LEVEL)
    return edges


@cache
def all_edges() -> tuple[Edge, ...]:
    files = source_files()
    known = set(files)
    edges: list[Edge] = []
    for module, path in files.items():
        edges += imports_in(path.read_text(), module, path.name == "__init__.py", known,
                            str(path.relative_to(REPO)))
    return tuple(edges)


def project_edges() -> list[Edge]:
    return [edge for edge in all_edges() if is_project(edge.target)]


def report(rule: str, bad: list[Edge]) -> str:
    return rule + ":\n  " + "\n  ".join(sorted(map(str, bad)))


# ---- the rules, as functions of a list of edges so the self-tests can feed them synthetic imports ----

def core_violations(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges if e.source in CORE and e.target not in CORE]


def calibration_violations(edges: list[Edge]) -> list[Edge]:
    return [e for e in edges
            if within(e.source, CALIBRATION) and not (e.target in CORE or within(e.target, CALIBRATION))]


def targets_violations(edges: list[Edge]) -> list[Edge]:
    forbidden = (STAGES, BUILD, CLI, SUMMARY)
    return [e for e in edges if within(e.source, TARGETS) and any(within(e.target, f) for f in forbidden)]


def is_concrete_target(module: str) -> bool:
    """edge_deploy.targets.<name>[...] for a target's own folder; the registry, base and transports are not."""
    return (within(module, TARGETS) and module not in TARGET_NEUTRAL
            and not within(module, f"{TARGETS}.transports"))


def stage_violations(edges: list[Edge]) -> list[Edge]:
    up = [e for e in edges if within(e.source, STAGES) and (within(e.target, BUILD) or within(e.target, CLI))]
    # Targets' own folders may import each other (targets/arm imports its runner); everyone else goes through the
    # registry so that adding a target touches no stage.
    concrete = [e for e in edges if is_concrete_target(e.target) and not within(e.source, TARGETS)
                and e.source not in MAY_IMPORT_CONCRETE_TARGETS]
    return up + concrete


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """The edges inside each strongly connected component of more than one module (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        if e.source != e.target:
            graph.setdefault(e.source, set()).add(e.target)
            graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [[e for e in edges if e.source in c and e.target in c and e.source != e.target] for c in components]


# ---- the tree's own imports ----

def test_parser_sees_function_level_and_relative_imports():
    quantize = source_files()[f"{STAGES}.quantize"]
    tree = ast.parse(quantize.read_text())
    found = [e for e in all_edges() if e.source == f"{STAGES}.quantize" and e.target == f"{CALIBRATION}.search"]
    assert found, "the import of calibration.search inside QuantizeStage.run was not seen"
    # The self-test is only worth something while that import really sits inside a function.
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    assert all(any(f.lineno <= e.line <= f.end_lineno for f in functions) for e in found), found

    known = set(source_files())
    relative = imports_in("def f():\n    from ..errors import ConfigError\n    from . import export\n",
                          f"{STAGES}.quantize", False, known)
    assert {e.target for e in relative} == {"edge_deploy.pipeline.errors", STAGES, f"{STAGES}.export"}
    in_package = imports_in("from . import runner\nfrom .ncnn_int8 import write_int8\n",
                            f"{TARGETS}.arm", True, known)
    assert {e.target for e in in_package} == {f"{TARGETS}.arm", f"{TARGETS}.arm.runner", f"{TARGETS}.arm.ncnn_int8"}


def test_every_project_import_names_a_module_in_the_tree():
    # An import the map does not know (a stale name after a move, or the pre-package `pipeline.x`) would slip
    # past every rule below, and fails at run time only when that code path runs.
    known = set(source_files())
    bad = [e for e in all_edges() if e.target not in known]
    assert not bad, report("imports of modules that are not in the tree", bad)


def test_rules_name_modules_that_exist():
    # A rename would otherwise turn a rule into one about nothing.
    known = set(source_files())
    named = CORE | {STAGES, BUILD, CLI, SUMMARY, EVALUATE, TARGETS, CALIBRATION} | TARGET_NEUTRAL \
        | MAY_IMPORT_CONCRETE_TARGETS
    assert named <= known, sorted(named - known)


def test_core_imports_only_core():
    bad = core_violations(project_edges())
    assert not bad, report("core modules (pipeline.errors, artifacts, engine, config, results, codehash, userfiles) "
                           "may import only each other", bad)


def test_calibration_imports_only_core_and_calibration():
    bad = calibration_violations(project_edges())
    assert not bad, report("calibration may import only core and calibration", bad)


def test_targets_do_not_import_stages_build_cli_or_summary():
    bad = targets_violations(project_edges())
    assert not bad, report("targets may not import pipeline.stages, build, cli or summary", bad)


def test_stages_import_neither_build_nor_cli_nor_a_concrete_target():
    bad = stage_violations(project_edges())
    assert not bad, report("stages may not import build or cli, and only build, cli and edge_deploy "
                           "may import a concrete target (edge_deploy.targets.<name>)", bad)


def test_stage_rule_catches_a_concrete_target_import():
    known = set(source_files())
    source = "def run(self):\n    from edge_deploy.targets.cpu import OnnxRuntimeCpu\n"
    bad = stage_violations(imports_in(source, f"{STAGES}.quantize", False, known))
    assert [e.target for e in bad] == [f"{TARGETS}.cpu"]
    allowed = "from edge_deploy.targets import load_target\nfrom edge_deploy.targets.base import Target\n" \
              "from edge_deploy.targets.transports.local import LocalTransport\n"
    assert not stage_violations(imports_in(allowed, f"{STAGES}.quantize", False, known))
    # Every registered target's module must count as concrete, or the rule would not see it.
    registry = ast.parse(source_files()[TARGETS].read_text())
    entries = next(ast.literal_eval(node.value) for node in ast.walk(registry)
                   if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == "TARGETS")
    assert entries and all(is_concrete_target(spec.split(":")[0]) for spec in entries.values()), entries


def test_cycle_finder_reports_a_package_and_its_submodule():
    known = set(source_files())
    edges = imports_in("from . import runner\n", f"{TARGETS}.arm", True, known) + \
        imports_in("from edge_deploy.targets.arm import NAME\n", f"{TARGETS}.arm.runner", False, known)
    members = [sorted({e.source for e in c} | {e.target for e in c}) for c in cycles(edges)]
    assert members == [[f"{TARGETS}.arm", f"{TARGETS}.arm.runner"]]


def test_no_import_cycles():
    found = cycles(project_edges())
    assert not found, "import cycles (function-level imports count):\n" + "\n".join(
        report(f"cycle {i}", c) for i, c in enumerate(found, 1))
