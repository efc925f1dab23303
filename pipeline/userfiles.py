"""Every read of a file the user named, and every check of a place the user asked us to write.

A user's file can be missing, a folder, unreadable, binary, not UTF-8, not
YAML, or YAML of the wrong shape; a place to write can be a file, sit inside a
file or a bundle, or be read-only. Each of those is the user's to fix, so each
becomes one InputError naming the file, never a traceback or an "internal
error". Part of the core: imports nothing of the project but the errors.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from edge_deploy.pipeline.errors import InputError

MANIFEST = "manifest.json"


def shown(path) -> str:
    """A path as it may appear in a one-line message: control characters (a newline in a name) escaped."""
    text = str(path)
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        return repr(text)
    return text


def read_bytes(path, what: str) -> bytes:
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} not found: {shown(path)}") from None
    except IsADirectoryError:
        raise InputError(f"{what} {shown(path)} is a folder, not a file") from None
    except PermissionError:
        raise InputError(f"{what} {shown(path)} cannot be read (permission denied)") from None
    except OSError as exc:
        raise InputError(f"{what} {shown(path)} cannot be read ({exc.strerror or type(exc).__name__})") from None


def read_text(path, what: str) -> str:
    data = read_bytes(path, what)
    if b"\0" in data:
        raise InputError(f"{what} {shown(path)} is a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {shown(path)} is not UTF-8 text (byte {exc.start})") from None


def read_yaml(path, what: str, expect: type | None = dict) -> Any:
    """Parses a user's YAML file; `expect` is the type the top level must have (None: anything, empty -> None)."""
    import yaml

    text = read_text(path, what)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or type(exc).__name__
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InputError(f"{what} {shown(path)} is not valid YAML: {problem}{where}") from None
    if expect is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise InputError(f"{what} {shown(path)} must be a mapping of keys to values, not a "
                             f"{_kind(value)}")
    elif expect is not None and not isinstance(value, expect):
        raise InputError(f"{what} {shown(path)} must hold a {expect.__name__}, not a {_kind(value)}")
    return value


def read_json(path, what: str, expect: type | None = dict) -> Any:
    text = read_text(path, what)
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{what} {shown(path)} is not valid JSON ({str(exc).splitlines()[0]})") from None
    if expect is not None and not isinstance(value, expect):
        raise InputError(f"{what} {shown(path)} must hold a JSON {'object' if expect is dict else expect.__name__}, "
                         f"not a {_kind(value)}")
    return value


def _kind(value) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def is_bundle(folder: Path) -> bool:
    """Whether `folder` is a bundle we published: its manifest.json is ours (another tool's manifest.json, a web
    app's say, is not)."""
    manifest = Path(folder) / MANIFEST
    if not manifest.is_file():
        return False
    try:
        data = json.loads(manifest.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "bundle" in data and isinstance(data.get("files"), dict)


def enclosing_bundle(path: Path) -> Path | None:
    """The published bundle that `path` is inside of, if any."""
    for folder in [Path(path), *Path(path).parents]:
        if is_bundle(folder):
            return folder
    return None


def check_writable_folder(path, what: str, may_be_bundle_parent: bool = True) -> Path:
    """Raises unless `path` is (or can be made) a folder this process can write in. Creates nothing.

    Run before any stage, so that minutes of work never end in "cannot write the output".
    """
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {shown(path)} is a file, not a folder")
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{what} {shown(path)} cannot be created: {shown(existing)} is a file")
    bundle = enclosing_bundle(existing)
    if bundle is not None:
        raise InputError(f"{what} {shown(path)} is inside the published bundle {shown(bundle)}; writing there would "
                         "damage it: choose a folder outside it")
    try:
        # Proves write permission, and that the file system is not read-only, with the process's real rights.
        probe = tempfile.TemporaryFile(dir=existing)
        probe.close()
    except OSError as exc:
        reason = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or type(exc).__name__)
        raise InputError(f"{what} {shown(path)} is not writable ({reason})") from None
    return path


# Write failures a user can fix (a full disk, a read-only mount), in their words.
WRITE_FAILURES = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "permission denied"}


def write_failure(exc: OSError, where) -> InputError:
    """An OSError while writing our output, as the user sees it (a full disk above all)."""
    reason = WRITE_FAILURES.get(exc.errno, exc.strerror or type(exc).__name__)
    return InputError(f"cannot write {shown(where)}: {reason}; nothing was published and earlier bundles are intact")
