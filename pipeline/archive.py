"""`deploy release` and `deploy verify`: a bundle as a versioned, reproducible, optionally signed archive.

The archive is a gzipped tar whose bytes depend only on the bundle's files: entries sorted, one fixed
timestamp, owner root, modes 0644/0755, no user or group names, and a gzip header without a time or a name.
Releasing the same bundle twice gives the same bytes, so a release can be rebuilt and compared.

A signature (Ed25519, a key the user holds) covers `manifest.json`, which holds the sha256 of every other file:
checking the signature and then every hash checks the whole archive.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path

from edge_deploy.pipeline.errors import ConfigError, InputError, IntegrityError

# 2000-01-01T00:00:00Z: any fixed time would do; a real date keeps tools that distrust the epoch quiet.
FIXED_MTIME = 946684800
SIGNATURE = "manifest.sig"
VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")


def archive_name(manifest: dict, version: str) -> str:
    """name-version-target-precision: the model's part of the bundle name, then the release's version."""
    target, precision = manifest["target"], manifest["precision"]
    model = manifest["bundle"].removesuffix(f"-{target}-{precision}")
    return f"{model}-{version}-{target}-{precision}"


def release(bundle: Path, version: str, output: Path, sign_key: Path | None = None) -> Path:
    """Writes output/<archive_name>.tar.gz from a checked bundle; never replaces a different existing file."""
    from edge_deploy.pipeline.artifacts import atomic_write_bytes
    from edge_deploy.pipeline.stages.release import MANIFEST, check_bundle

    if not VERSION.match(version or ""):
        raise ConfigError(f"release version '{version}' must be letters, digits and . + _ - (e.g. 1.2.0)")
    manifest = check_bundle(bundle)  # a changed, truncated or partial bundle is refused here
    accuracy = (manifest.get("metrics") or {}).get("accuracy")
    if not accuracy:
        raise IntegrityError(f"{bundle}: the manifest records no verified accuracy; release only what a build "
                             "finished and published")
    name = archive_name(manifest, version)
    files = {Path(bundle) / rel: rel for rel in manifest["files"]}
    files[Path(bundle) / MANIFEST] = MANIFEST
    extra = {}
    if sign_key is not None:
        extra[SIGNATURE] = sign((Path(bundle) / MANIFEST).read_bytes(), sign_key)
    data = tar_gz(name, files, extra)
    final = Path(output) / f"{name}.tar.gz"
    if final.exists():
        if final.read_bytes() == data:
            return final  # the same release again: the same bytes
        raise InputError(f"{final} exists with other contents; a released version is never overwritten (choose "
                         "another --version, or move the old archive away)")
    atomic_write_bytes(final, data)
    return final


def tar_gz(top: str, files: dict[Path, str], extra: dict[str, bytes]) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(_entry(f"{top}/", tarfile.DIRTYPE, 0o755))
        entries = [(rel, source.read_bytes(), source.stat().st_mode & 0o111) for source, rel in files.items()]
        entries += [(rel, data, 0) for rel, data in extra.items()]
        for folder in sorted({p for rel, _, _ in entries for p in Path(rel).parents if str(p) != "."}):
            tar.addfile(_entry(f"{top}/{folder.as_posix()}/", tarfile.DIRTYPE, 0o755))
        for rel, data, executable in sorted(entries, key=lambda e: e[0]):
            info = _entry(f"{top}/{rel}", tarfile.REGTYPE, 0o755 if executable else 0o644)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    packed = io.BytesIO()
    # mtime=0 and no file name in the gzip header: the bytes depend on the content alone.
    with gzip.GzipFile(filename="", mode="wb", fileobj=packed, mtime=0, compresslevel=9) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue()


def _entry(name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = kind, mode, FIXED_MTIME
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sign(message: bytes, key_path: Path) -> bytes:
    private = _load_private_key(key_path)
    return private.sign(message)


def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        raise ConfigError("signing needs the `cryptography` package (pip install cryptography)") from None
    return serialization, ed25519


def _load_private_key(path: Path):
    from cryptography.exceptions import UnsupportedAlgorithm

    from edge_deploy.pipeline.userfiles import read_bytes

    serialization, ed25519 = _crypto()
    data = read_bytes(path, "signing key")
    for loader in (serialization.load_pem_private_key, serialization.load_ssh_private_key):
        try:
            key = loader(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):  # each loader rejects the other's format
            continue
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise ConfigError(f"{path}: not an Ed25519 key (make one with `ssh-keygen -t ed25519 -N ''` or "
                              "`openssl genpkey -algorithm ed25519`)")
        return key
    raise ConfigError(f"{path}: not an unencrypted Ed25519 private key (PEM or OpenSSH format)")


def _load_public_key(path: Path):
    from cryptography.exceptions import UnsupportedAlgorithm

    from edge_deploy.pipeline.userfiles import read_bytes

    serialization, ed25519 = _crypto()
    data = read_bytes(path, "public key").strip()
    key = None
    for loader in (serialization.load_pem_public_key, serialization.load_ssh_public_key):
        try:
            key = loader(data)
            break
        except (ValueError, TypeError, UnsupportedAlgorithm):
            continue
    if key is None:
        raise ConfigError(f"{path}: not a public key (PEM or OpenSSH format)")
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ConfigError(f"{path}: not an Ed25519 public key")
    return key


def safe_extract(archive: Path, into: Path) -> Path:
    """Extracts a release archive refusing anything that could land outside `into`; returns its top folder."""
    if not Path(archive).is_file():
        raise InputError(f"archive not found: {archive}" if not Path(archive).exists() else
                         f"{archive} is a folder; give the .tar.gz file")
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()
            tops = set()
            for member in members:
                name = member.name
                parts = Path(name).parts
                if name.startswith("/") or Path(name).is_absolute():
                    raise IntegrityError(f"{archive}: refused: absolute path {name!r}")
                if ".." in parts:
                    raise IntegrityError(f"{archive}: refused: path leaving the archive's folder {name!r}")
                if member.issym() or member.islnk():
                    raise IntegrityError(f"{archive}: refused: link {name!r} -> {member.linkname!r} (a release holds "
                                         "plain files only)")
                if not (member.isfile() or member.isdir()):
                    raise IntegrityError(f"{archive}: refused: {name!r} is not a plain file or folder")
                tops.add(parts[0])
            if len(tops) != 1:
                raise IntegrityError(f"{archive}: a release holds one top folder, found {len(tops)}")
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IntegrityError(f"{archive}: not a whole release archive (truncated or damaged: "
                             f"{str(exc) or type(exc).__name__})") from None
    return Path(into) / tops.pop()


def verify(archive: Path, public_key: Path | None = None) -> dict:
    """Checks a downloaded release: safe to extract, every file's sha256, and the signature when a key is given."""
    from edge_deploy.pipeline.stages.release import MANIFEST, check_bundle

    with tempfile.TemporaryDirectory(prefix="deploy-verify-") as work:
        top = safe_extract(archive, Path(work))
        signature = top / SIGNATURE
        signed = signature.is_file()
        if signed:
            signature_bytes = signature.read_bytes()
            signature.unlink()  # not a bundle file: the manifest cannot list the signature of itself
        manifest = check_bundle(top)
        result = {"archive": str(archive), "bundle": manifest["bundle"], "files": len(manifest["files"]) + 1,
                  "signed": signed, "signature": "not checked"}
        if public_key is not None:
            if not signed:
                raise IntegrityError(f"{archive}: no signature in the archive, and a public key was given")
            from cryptography.exceptions import InvalidSignature

            try:
                _load_public_key(public_key).verify(signature_bytes, (top / MANIFEST).read_bytes())
            except InvalidSignature:
                raise IntegrityError(f"{archive}: the signature does not match {public_key} (signed by another "
                                     "key, or the manifest was changed after signing)") from None
            result["signature"] = "valid"
        shutil.rmtree(top, ignore_errors=True)
    return result
