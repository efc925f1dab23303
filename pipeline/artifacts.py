"""Artifacts on disk, identified by content hash, and atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

# Temporary names carry the writer's pid, so that what a killed process left behind can be told from what a
# running one is still writing.
_TEMPORARY = re.compile(r"^\..+\.(?:tmp|old)-(\d+)-")


def temp_prefix(name: str, kind: str = "tmp") -> str:
    return f".{name}.{kind}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: Path, depth: int = 2) -> int:
    """Removes temporary files and folders under `folder` (to `depth` levels) whose writer is no longer running.

    A build killed mid-stage (SIGKILL, power loss) cannot clean up after itself; the next one does.
    Returns how many entries were removed.
    """
    folder = Path(folder)
    removed = 0
    if depth < 1 or not folder.is_dir():
        return 0
    try:
        entries = list(folder.iterdir())
    except OSError:
        return 0
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match and not _alive(int(match.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed += 1
        elif entry.is_dir() and not entry.is_symlink() and not entry.name.startswith("."):
            removed += sweep_stale(entry, depth - 1)
    return removed


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_tree(path: Path) -> str:
    """Content hash of a file, or of a folder's relative paths and file contents."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0" + sha256_file(file).encode())
    return digest.hexdigest()


def hash_json(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Artifact:
    path: Path
    sha256: str

    @classmethod
    def of(cls, path: Path) -> "Artifact":
        return cls(Path(path), sha256_tree(path))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """The file appears whole under its name or not at all (a temporary beside it, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path, replace: bool = True) -> Iterator[Path]:
    """Yields an empty temporary folder beside `final`; on success it replaces `final`.

    On failure the temporary folder is removed and `final`, if it existed, is untouched. With `replace=False`,
    for a folder named after its content, a `final` that another process finished meanwhile is kept and this
    copy dropped: swapping it would pull the files from under a reader of the same content.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name), dir=final.parent))
    try:
        yield tmp
        if not replace:
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.exists():
                    raise
        elif final.exists():
            old = Path(tempfile.mkdtemp(prefix=temp_prefix(final.name, "old"), dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
