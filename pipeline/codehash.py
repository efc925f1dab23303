"""The source a stage runs, as one hash, so that a change of behaviour anywhere in it misses the cache.

A stage names the modules it runs (its own, its target's, its device runner);
their project-internal imports are followed transitively, including imports
inside functions, which is where this project keeps its heavy ones. The hash
covers each module's name and bytes, so editing a helper two imports away from
a stage changes that stage's key.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
from functools import lru_cache
from pathlib import Path

PACKAGE = "edge_deploy"


@lru_cache(maxsize=None)
def module_file(name: str) -> Path | None:
    """The source file of a project module, without importing it (None for a name that is not a module)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    return Path(spec.origin)


def _import_nodes(tree: ast.Module, module_level: bool):
    if not module_level:
        yield from ast.walk(tree)
        return
    # What runs when the module is imported: everything but function bodies (a class body runs at import, and so
    # do conditionals, try blocks and their except handlers).
    todo = list(tree.body)
    while todo:
        node = todo.pop()
        yield node
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))


def imported_modules(name: str, path: Path, package_name: str = PACKAGE, module_level: bool = False) -> set[str]:
    """Project modules `name` imports anywhere in its body, or only at import time (relative imports resolved)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _import_nodes(tree, module_level):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from package import module` names a module, not an attribute, as often as not.
            found.update(f"{module}.{alias.name}" for alias in node.names)
    # A package's `from . import submodule` names the package itself: that is not a call into its own functions.
    found.discard(name)
    return {m for m in found if m == package_name or m.startswith(package_name + ".")}


@lru_cache(maxsize=None)
def closure(roots: tuple[str, ...], package_name: str = PACKAGE) -> tuple[str, ...]:
    """Every project module reachable from `roots` through imports, sorted.

    A module a stage imports counts whole, functions included. A package that is only the parent of such a
    module counts with what runs when it is imported: the package `edge_deploy` imports the whole pipeline
    inside its `build()` function, and following that would make every stage's key change with any edit
    anywhere (the report's layout would re-run a fine-tune).
    """
    whole: set[str] = set()
    parents_only: set[str] = set()
    todo = [(name, False) for name in roots]
    while todo:
        name, as_parent = todo.pop()
        if name in whole or (as_parent and name in parents_only):
            continue
        path = module_file(name)
        if path is None:
            continue
        (parents_only if as_parent else whole).add(name)
        parts = name.split(".")
        todo.extend((".".join(parts[:i]), True) for i in range(1, len(parts)))
        todo.extend((m, False) for m in imported_modules(name, path, package_name, module_level=as_parent))
    return tuple(sorted(whole | parents_only))


@lru_cache(maxsize=None)
def source_hash(roots: tuple[str, ...], package_name: str = PACKAGE) -> str:
    digest = hashlib.sha256()
    for name in closure(tuple(sorted(set(roots))), package_name):
        digest.update(name.encode() + b"\0" + module_file(name).read_bytes() + b"\0")
    return digest.hexdigest()
