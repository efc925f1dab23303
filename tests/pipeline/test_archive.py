"""`deploy release` and `deploy verify`: reproducible archives, tampering, traversal and signatures."""

from __future__ import annotations

import gzip
import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest

from tests.conftest import run_deploy, tree_state


@pytest.fixture(scope="module")
def bundle(cpu_fp32_bundle) -> Path:
    return cpu_fp32_bundle


def release(bundle: Path, cwd: Path, home: Path, *extra: str):
    return run_deploy(["release", str(bundle), "--version", "1.2.0", "--output", str(cwd / "releases"), *extra],
                      cwd, home)


def test_a_release_is_named_by_version_and_the_same_bundle_gives_the_same_bytes(bundle, tmp_path, deploy_home):
    done = release(bundle, tmp_path, deploy_home)
    assert done.returncode == 0, done.stderr
    archive = tmp_path / "releases" / "yolov8n-160-1.2.0-cpu-fp32.tar.gz"
    assert done.stdout.strip() == f"released {archive}"
    first = archive.read_bytes()
    # The same release again is a no-op; a copy of the bundle elsewhere, made later, packs to the same bytes.
    assert release(bundle, tmp_path, deploy_home).returncode == 0 and archive.read_bytes() == first
    copy = tmp_path / "elsewhere" / bundle.name
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(bundle), str(copy)], check=True)
    other = tmp_path / "other"
    other.mkdir()
    assert release(copy, other, deploy_home).returncode == 0
    assert (other / "releases" / archive.name).read_bytes() == first
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        assert all(m.mtime == tar.getmembers()[0].mtime and m.uid == 0 and m.uname == "" for m in tar.getmembers())
    top = "yolov8n-160-1.2.0-cpu-fp32"
    assert names == sorted(names) and f"{top}/manifest.json" in names and f"{top}/model.onnx" in names
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(manifest["model_source_sha256"]) == 64 and manifest["toolchain"]["edge-deploy"]
    verified = run_deploy(["verify", str(archive), "--json"], tmp_path, deploy_home)
    assert verified.returncode == 0 and json.loads(verified.stdout)["signature"] == "not checked"


def test_a_rebuild_without_cache_gives_byte_identical_artifacts(bundle, tmp_path, deploy_home):
    done = run_deploy(["build", "--json", "--no-cache", "--precision", "fp32", "--runs", "50", "--output",
                       str(tmp_path)], tmp_path, deploy_home)
    assert done.returncode == 0, done.stderr
    rebuilt = Path(json.loads(done.stdout)["bundle"])
    for name in ("model.onnx", "runtime.json", "postprocess.py"):
        assert (rebuilt / name).read_bytes() == (bundle / name).read_bytes(), name


def repack(archive: Path, out: Path, change) -> Path:
    """The archive's members rewritten through `change(name, data) -> (name, data) | None`."""
    members = []
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read() if member.isfile() else None
            members.append((member, data))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for member, data in members:
            if data is None:
                tar.addfile(member)
                continue
            name, data = change(member.name, data)
            member.name, member.size = name, len(data)
            tar.addfile(member, io.BytesIO(data))
    out.write_bytes(gzip.compress(raw.getvalue()))
    return out


@pytest.fixture(scope="module")
def released(bundle, tmp_path_factory, deploy_home) -> Path:
    cwd = tmp_path_factory.mktemp("released")
    assert release(bundle, cwd, deploy_home).returncode == 0
    return next((cwd / "releases").iterdir())


def one_error(done, code: int, text: str) -> None:
    assert done.returncode == code, (done.stdout, done.stderr)
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error:") and text in done.stderr, done.stderr


def test_a_tampered_file_is_refused(released, tmp_path, deploy_home):
    def flip(name, data):
        return name, (data[:-1] + bytes([data[-1] ^ 1])) if name.endswith("model.onnx") else data

    one_error(run_deploy(["verify", str(repack(released, tmp_path / "t.tar.gz", flip))], tmp_path, deploy_home), 8,
              "sha256 differs: model.onnx")


def test_a_truncated_archive_is_refused(released, tmp_path, deploy_home):
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(released.read_bytes()[: released.stat().st_size // 2])
    one_error(run_deploy(["verify", str(cut)], tmp_path, deploy_home), 8, "truncated or damaged")


@pytest.mark.parametrize("evil, message", [
    ("../escaped.txt", "path leaving the archive's folder"),
    ("/tmp/absolute-escape.txt", "absolute path"),
])
def test_paths_leaving_the_folder_are_refused_and_nothing_lands_outside(released, tmp_path, deploy_home, evil,
                                                                        message):
    def add_evil(name, data):
        return (evil, b"x") if name.endswith("postprocess.py") else (name, data)

    archive = repack(released, tmp_path / "evil.tar.gz", add_evil)
    one_error(run_deploy(["verify", str(archive)], tmp_path, deploy_home), 8, message)
    assert not (tmp_path.parent / "escaped.txt").exists() and not Path("/tmp/absolute-escape.txt").exists()


def test_a_link_in_an_archive_is_refused(released, tmp_path, deploy_home):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        link = tarfile.TarInfo("top/passwd")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    archive = tmp_path / "link.tar.gz"
    archive.write_bytes(gzip.compress(raw.getvalue()))
    one_error(run_deploy(["verify", str(archive)], tmp_path, deploy_home), 8, "refused: link 'top/passwd'")


def test_a_bundle_changed_after_its_manifest_is_not_released(bundle, tmp_path, deploy_home):
    changed = tmp_path / bundle.name
    subprocess.run(["cp", "-r", str(bundle), str(changed)], check=True)
    (changed / "runtime.json").write_text((changed / "runtime.json").read_text() + " ")
    one_error(release(changed, tmp_path, deploy_home), 8, "sha256 differs: runtime.json")
    assert not (tmp_path / "releases").exists() or not any((tmp_path / "releases").iterdir())


def test_an_existing_different_archive_is_never_overwritten(bundle, tmp_path, deploy_home):
    target = tmp_path / "releases" / "yolov8n-160-1.2.0-cpu-fp32.tar.gz"
    target.parent.mkdir()
    target.write_bytes(b"someone else's release")
    one_error(release(bundle, tmp_path, deploy_home), 2, "is never overwritten")
    assert target.read_bytes() == b"someone else's release"
    assert tree_state(tmp_path / "releases") == {target.name: b"someone else's release"}


def test_a_signed_release_verifies_with_its_key_and_not_with_another(bundle, tmp_path, deploy_home):
    for name in ("release", "other"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / name)], check=True)
    done = release(bundle, tmp_path, deploy_home, "--sign-key", str(tmp_path / "release"))
    assert done.returncode == 0 and done.stdout.strip().endswith("(signed)"), done.stderr
    archive = next((tmp_path / "releases").iterdir())
    good = run_deploy(["verify", str(archive), "--public-key", str(tmp_path / "release.pub")], tmp_path, deploy_home)
    assert good.returncode == 0 and "signature valid" in good.stdout
    one_error(run_deploy(["verify", str(archive), "--public-key", str(tmp_path / "other.pub")], tmp_path,
                         deploy_home), 8, "signature does not match")


def test_a_key_given_for_an_unsigned_release_is_an_error(released, tmp_path, deploy_home):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "k")], check=True)
    one_error(run_deploy(["verify", str(released), "--public-key", str(tmp_path / "k.pub")], tmp_path, deploy_home),
              8, "no signature in the archive")


def test_bad_release_inputs_are_one_line(bundle, tmp_path, deploy_home):
    one_error(run_deploy(["release", str(bundle), "--version", "1 2"], tmp_path, deploy_home), 2,
              "must be letters, digits")
    one_error(run_deploy(["release", str(tmp_path), "--version", "1"], tmp_path, deploy_home), 8, "no manifest.json")
    (tmp_path / "key").write_text("not a key")
    one_error(release(bundle, tmp_path, deploy_home, "--sign-key", str(tmp_path / "key")), 2,
              "not an unencrypted Ed25519 private key")
    one_error(run_deploy(["verify", str(tmp_path / "missing.tar.gz")], tmp_path, deploy_home), 2, "not found")
