
import pytest

from edge_deploy.pipeline.artifacts import Artifact, atomic_dir
from edge_deploy.pipeline.engine import Engine, Stage, StageOutput
from edge_deploy.pipeline.errors import DeployError


class Upper(Stage):
    name = "upper"
    inputs = ("text",)
    calls = 0

    def __init__(self, suffix="", fingerprint="fp", fail=False):
        self.suffix, self.fingerprint, self.fail = suffix, fingerprint, fail

    def settings(self):
        return {"suffix": self.suffix}

    def fingerprints(self):
        return {"calibration": self.fingerprint}

    def run(self, inputs, out_dir):
        Upper.calls += 1
        out = out_dir / "upper.txt"
        out.write_text(inputs["text"].path.read_text().upper() + self.suffix)
        if self.fail:
            raise DeployError("stage failed on purpose")
        return StageOutput({"upper": out}, {"length": len(out.read_text())})


@pytest.fixture
def text(tmp_path) -> dict:
    source = tmp_path / "in.txt"
    source.write_text("hello")
    return {"text": Artifact.of(source)}


def test_second_run_is_a_hit_and_does_no_work(tmp_path, text):
    engine = Engine(tmp_path / "cache")
    Upper.calls = 0
    first = engine.run(Upper(), text)
    second = engine.run(Upper(), text)
    assert (first.cache_hit, second.cache_hit) == (False, True)
    assert Upper.calls == 1
    assert second.artifacts["upper"].path.read_text() == "HELLO"
    assert second.metrics == {"length": 5}


def test_key_follows_meaning_not_file_names(tmp_path, text):
    engine = Engine(tmp_path / "cache")
    base = engine.key(Upper(), text)
    copy = tmp_path / "other-name.txt"
    copy.write_text("hello")
    assert engine.key(Upper(), {"text": Artifact.of(copy)}) == base
    copy.write_text("hellO")
    assert engine.key(Upper(), {"text": Artifact.of(copy)}) != base
    assert engine.key(Upper(suffix="!"), text) != base
    assert engine.key(Upper(fingerprint="other"), text) != base

    class OtherCode(Upper):
        def code_modules(self):
            return ("edge_deploy.pipeline.detect",)

    assert engine.key(OtherCode(), text) != base

    class WithToolchain(Upper):
        toolchain = ("numpy",)

    assert engine.key(WithToolchain(), text) != base


def test_failed_stage_leaves_nothing_and_is_not_cached(tmp_path, text):
    engine = Engine(tmp_path / "cache")
    with pytest.raises(DeployError, match="on purpose"):
        engine.run(Upper(fail=True), text)
    leftovers = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert leftovers == []
    Upper.calls = 0
    record = engine.run(Upper(), text)
    assert not record.cache_hit and Upper.calls == 1


def test_damaged_cache_entry_is_rebuilt(tmp_path, text):
    engine = Engine(tmp_path / "cache")
    first = engine.run(Upper(), text)
    first.artifacts["upper"].path.write_text("tampered")
    again = engine.run(Upper(), text)
    assert not again.cache_hit
    assert again.artifacts["upper"].path.read_text() == "HELLO"


def test_a_valid_entry_another_build_placed_first_stays_for_its_readers(tmp_path, text):
    """Two builds computing the same stage at once (a search's workers): the second to finish keeps the first's
    entry, which a build beside it may be reading, instead of deleting it to put its own in place."""
    first = Engine(tmp_path / "cache").run(Upper(), text)
    placed = first.artifacts["upper"].path
    inode = placed.stat().st_ino
    second = Engine(tmp_path / "cache", use_cache=False).run(Upper(), text)
    assert not second.cache_hit and second.artifacts["upper"].path == placed
    assert placed.stat().st_ino == inode and placed.read_text() == "HELLO"
    assert [p.name for p in placed.parents[1].iterdir()] == [placed.parent.name]  # nothing of the second left


def test_missing_input_is_a_typed_error(tmp_path):
    with pytest.raises(DeployError, match="needs text"):
        Engine(tmp_path / "cache").run(Upper(), {})


def test_atomic_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
    final = tmp_path / "bundle"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (final / "a.txt").read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]
    with atomic_dir(final) as tmp:
        (tmp / "b.txt").write_text("new")
    assert [p.name for p in final.iterdir()] == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]


def test_atomic_dir_without_replace_keeps_what_another_writer_finished_first(tmp_path):
    final = tmp_path / "set-0123"
    with pytest.raises(RuntimeError):
        with atomic_dir(final, replace=False) as tmp:
            (tmp / "data.yaml").write_text("half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(final, replace=False) as tmp:
        (tmp / "data.yaml").write_text("mine")
        # Another process writing the same content finishes while this one is still writing.
        final.mkdir()
        (final / "data.yaml").write_text("theirs")
    assert (final / "data.yaml").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["set-0123"]
    with atomic_dir(tmp_path / "set-4567", replace=False) as tmp:
        (tmp / "data.yaml").write_text("mine")
    assert (tmp_path / "set-4567" / "data.yaml").read_text() == "mine"


def test_an_uncacheable_result_is_used_once_and_measured_again(tmp_path, text):
    class Timing(Upper):
        def run(self, inputs, out_dir):
            output = super().run(inputs, out_dir)
            return StageOutput(output.files, output.metrics, cacheable=False)

    engine = Engine(tmp_path / "cache")
    Upper.calls = 0
    first = engine.run(Timing(), text)
    second = engine.run(Timing(), text)
    assert (first.cache_hit, second.cache_hit, Upper.calls) == (False, False, 2)
    assert first.artifacts["upper"].path.read_text() == "HELLO" and first.artifacts["upper"].path.exists()


class Talkative(Upper):
    name = "talkative"

    def run(self, inputs, out_dir):
        for step in range(1, 3):
            self.progress(f"step {step}/2")
        return super().run(inputs, out_dir)


def test_a_stage_progress_lines_reach_on_event_between_running_and_done(tmp_path, text):
    events = []
    engine = Engine(tmp_path / "cache", on_event=lambda stage, event: events.append((stage, event)))
    engine.run(Talkative(), text)
    engine.run(Talkative(), text)
    assert events == [("talkative", "running"), ("talkative", "step 1/2"), ("talkative", "step 2/2"),
                      ("talkative", "done"), ("talkative", "cached")]
    Talkative().progress("outside an engine: nowhere, and no error")
