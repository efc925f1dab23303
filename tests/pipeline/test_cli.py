"""The `deploy` command as a user runs it: a real subprocess, real stages, real files."""

import json
import shutil

import pytest

from tests.conftest import build_json, run_deploy, tree_state


@pytest.fixture(scope="module")
def built(deploy_home, tmp_path_factory):
    """A user's folder after `deploy build --target cpu` on the embedded defaults."""
    cwd = tmp_path_factory.mktemp("user")
    done = run_deploy(["build", "--target", "cpu"], cwd, deploy_home)
    assert done.returncode == 0, done.stderr
    return cwd, done


def test_default_build_reports_accuracy_and_latency_and_a_bundle_that_checks_out(built, deploy_home):
    cwd, done = built
    for stage in ("load", "export", "reference", "quantize", "compile", "verify", "probe", "release"):
        assert stage in done.stdout
    assert "FP32 ONNX: mAP50" in done.stdout and "INT8 on cpu: mAP50" in done.stdout
    assert "accuracy on the report split: 200 images" in done.stdout
    assert "latency p50/p90/p99" in done.stdout
    bundle = cwd / "dist" / "yolov8n-160-cpu-int8"
    manifest = json.loads((bundle / "manifest.json").read_text())
    power = manifest["metrics"]["speed"]["artifact"]["power"]
    assert ("power unavailable" in done.stdout) == (power["status"] == "unavailable")
    # The FP32 ONNX and the INT8 model were timed in one job, in turns, and the summary and model card say so.
    speed = manifest["metrics"]["speed"]
    assert speed["timing"] == "in one process, in turns" and speed["reference_label"] == "FP32 ONNX"
    assert speed["artifact"]["started_at"] == speed["reference"]["started_at"]
    told = f"INT8 on cpu ran {speed['speedup_p50']}x as fast as FP32 ONNX at p50, timed in one process, in turns; "
    card = (bundle / "README.md").read_text()
    assert told in done.stdout.replace("\n", " ") and told in card
    # The graph's rewrites for speed are named, with how each computes the same values.
    assert ("Rewritten for speed, with the same values: /inner/model.10/Resize, /inner/model.13/Resize; each a "
            "quantized nearest upsampling, written as channels-last copies") in card.replace("\n", " ")
    rounds = speed["speedup_rounds"]
    assert rounds["rounds"] * rounds["runs_per_round"] == speed["artifact"]["runs"]
    assert rounds["min"] <= rounds["median"] <= rounds["max"]
    assert set(manifest["files"]) == {"model.onnx", "runtime.json", "postprocess.py", "metrics.json",
                                      "README.md", "report.html", "report.md"}
    assert manifest["calibration"]["images"] == 200 and len(manifest["calibration"]["fingerprint"]) == 64
    assert manifest["toolchain"]["onnxruntime"] == "1.31.1"
    assert manifest["config"]["precision"] == "int8"
    accuracy = manifest["metrics"]["accuracy"]
    # The embedded model is trained to well above chance; INT8 stays within the default budget.
    assert accuracy["reference"]["map50_95"] > 0.6 and accuracy["split"]["role"] == "report"
    assert accuracy["drop_points"] <= 1.0
    # Choices were made on other images than the ones reported, and the bundle says which.
    assert manifest["splits"]["selection"]["fingerprint"] != manifest["splits"]["report"]["fingerprint"]
    assert manifest["splits"]["selection"]["source"].endswith("images/selection")
    check = run_deploy(["check", str(bundle)], cwd, deploy_home)
    assert check.returncode == 0 and check.stdout.startswith("ok: 7 files")
    record = json.loads((cwd / "dist" / "yolov8n-160-cpu-int8.build.json").read_text())
    assert [s["stage"] for s in record["stages"]] == ["load", "export", "reference", "quantize", "compile", "verify",
                                                      "probe", "release"]


def test_second_build_is_all_cache_hits(built, deploy_home):
    cwd, _ = built
    before = tree_state(cwd / "dist" / "yolov8n-160-cpu-int8")
    summary = build_json(["--target", "cpu"], cwd, deploy_home)
    stages = {stage["stage"]: stage for stage in summary["stages"]}
    assert all(stage["cache_hit"] for name, stage in stages.items() if name not in ("probe", "release"))
    if stages["probe"]["cache_hit"]:
        assert stages["release"]["cache_hit"] and summary["bundle_updated"] is False
        assert tree_state(cwd / "dist" / "yolov8n-160-cpu-int8") == before
    else:
        # The first build's timing said the machine was busy, so it was never cached: this build measured
        # again and published the new measurement.
        assert "the machine was busy" in built[1].stderr
        assert stages["probe"]["metrics"]["reference"]["latency_ms"]["p50"] > 0


def test_tampered_bundle_fails_its_check(built, deploy_home, tmp_path):
    cwd, _ = built
    copy = tmp_path / "bundle"
    shutil.copytree(cwd / "dist" / "yolov8n-160-cpu-int8", copy)
    with open(copy / "model.onnx", "ab") as f:
        f.write(b"\0")
    (copy / "extra.txt").write_text("x")
    done = run_deploy(["check", str(copy)], cwd, deploy_home)
    assert done.returncode != 0
    assert "sha256 differs: model.onnx" in done.stderr and "not in manifest: extra.txt" in done.stderr


def test_print_config_is_a_reusable_config(built, deploy_home, tmp_path):
    cwd, _ = built
    done = run_deploy(["build", "--print-config", "--precision", "fp32", "--runs", "64"], cwd, deploy_home)
    assert done.returncode == 0
    (tmp_path / "deploy.yaml").write_text(done.stdout)
    again = run_deploy(["build", "--print-config"], tmp_path, deploy_home)
    assert again.stdout == done.stdout


def test_missed_accuracy_budget_fails_and_keeps_the_fp32_model(built, deploy_home, tmp_path):
    cwd, _ = built
    before = tree_state(cwd)
    # INT4 weights lose beyond noise on the embedded model (INT8 of any method may now land either side of 0).
    done = run_deploy(["build", "--precision", "w4a8", "--max-map-drop", "0"], cwd, deploy_home)
    assert done.returncode == 4 and "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "over the 0.00 point budget" in lines[0]
    assert "the FP32 model is kept at dist/yolov8n-160.fp32.onnx" in lines[0]
    assert "what quantize measured at dist/yolov8n-160-cpu-w4a8.rejected.json" in lines[0]
    after = tree_state(cwd)
    kept = after.pop("dist/yolov8n-160.fp32.onnx")
    after.pop("dist/yolov8n-160-cpu-w4a8.rejected.json")
    assert after == before and len(kept) > 1_000_000
    rejected = json.loads((cwd / "dist" / "yolov8n-160-cpu-w4a8.rejected.json").read_text())
    assert rejected["rejected_by"] == "quantize" and rejected["report"]["within_budget"] is False
    assert rejected["report"]["trials"] and rejected["fp32_model"] == "dist/yolov8n-160.fp32.onnx"
    assert [s["stage"] for s in rejected["stages"]][-1] == "reference"
    # A build of the same name that publishes supersedes the record of the one that did not.
    assert run_deploy(["build", "--precision", "w4a8", "--max-map-drop", "0", "--accept-drop"], cwd,
                      deploy_home).returncode == 0
    assert not (cwd / "dist" / "yolov8n-160-cpu-w4a8.rejected.json").exists()


def test_accept_drop_ships_the_best_quantized_model(built, deploy_home, tmp_path):
    summary = build_json(["--precision", "w4a8", "--max-map-drop", "0", "--accept-drop",
                          "--output", str(tmp_path / "out")], built[0], deploy_home)
    quantize = next(s for s in summary["stages"] if s["stage"] == "quantize")
    # Missed on the selection split, where the budget is judged; the report split may land either side of 0.
    assert quantize["metrics"]["drop_points"] > 0 and quantize["metrics"]["within_budget"] is False
    bundle = tmp_path / "out" / "yolov8n-160-cpu-w4a8"
    assert (bundle / "manifest.json").exists()
    assert "No quantization candidate met the budget on the selection split" in (bundle / "README.md").read_text()


def test_yolo11n_from_yaml_prunes_and_ships(deploy_home, small_shapes_yaml, tmp_path):
    import ultralytics

    source = next((tmp_path.__class__(ultralytics.__file__).parent / "cfg" / "models").rglob("yolo11.yaml"))
    (tmp_path / "yolo11n.yaml").write_text(source.read_text())
    summary = build_json(["--model", "yolo11n.yaml", "--data", str(small_shapes_yaml), "--imgsz", "96",
                          "--prune", "0.5", "--prune-epochs", "0", "--precision", "fp32"], tmp_path, deploy_home)
    prune = next(s for s in summary["stages"] if s["stage"] == "prune")
    assert prune["metrics"]["macs_ratio"] > 2.5
    bundle = tmp_path / "dist" / "yolo11n-96-pruned-cpu-fp32"
    assert (bundle / "prune_history.png").exists()
    assert "## Pruning" in (bundle / "README.md").read_text()
    assert run_deploy(["check", str(bundle)], tmp_path, deploy_home).returncode == 0


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_arm_target_ships_an_ncnn_model_verified_in_ncnn(built, deploy_home, precision):
    cwd, _ = built
    summary = build_json(["--target", "arm", "--precision", precision], cwd, deploy_home)
    verify = next(s for s in summary["stages"] if s["stage"] == "verify")["metrics"]
    assert verify["artifact"]["map50_95"] > 0.6 and verify["within_budget"]
    probe = next(s for s in summary["stages"] if s["stage"] == "probe")["metrics"]
    # Against ncnn's own FP32 build, timed in the same process: the speed-up is the precision's, not the runtime's.
    assert probe["artifact"]["runtime"].startswith("ncnn") and probe["reference"]["runtime"].startswith("ncnn")
    assert probe["reference_label"] == "FP32 on arm" and probe["timing"] == "in one process, in turns"
    assert probe["reference"]["extra"]["precision"] == "fp32" and probe["artifact"]["extra"]["precision"] == precision
    # INT8 goes through the same quantize stage as every target, with the target's own backend.
    stages = {s["stage"]: s["metrics"] for s in summary["stages"]}
    assert ("quantize" in stages) == (precision == "int8")
    if precision == "int8":
        assert stages["quantize"]["unit_kind"] == "layer" and stages["quantize"]["method"] in ("minmax", "entropy")
    bundle = cwd / "dist" / f"yolov8n-160-arm-{precision}"
    assert {"model.ncnn.param", "model.ncnn.bin", "runtime.json"} <= {p.name for p in bundle.iterdir()}
    assert run_deploy(["check", str(bundle)], cwd, deploy_home).returncode == 0


def test_profile_sets_the_probe_threads(built, deploy_home, tmp_path):
    summary = build_json(["--profile", "host-1-thread", "--output", str(tmp_path / "out")], built[0], deploy_home)
    probe = next(s for s in summary["stages"] if s["stage"] == "probe")["metrics"]
    assert probe["artifact"]["threads"] == 1 and probe["reference"]["threads"] == 1
    manifest = json.loads((tmp_path / "out" / "yolov8n-160-cpu-int8" / "manifest.json").read_text())
    assert manifest["config"]["profile"] == "host-1-thread"


def test_pruning_that_destroys_the_model_is_gated_against_the_original(built, deploy_home, tmp_path):
    """One-shot pruning without fine-tuning wrecks the detector; verify compares with the unpruned model too."""
    cwd, _ = built
    out = tmp_path / "out"
    args = ["build", "--prune", "0.3", "--prune-epochs", "0", "--precision", "fp32", "--output", str(out)]
    done = run_deploy(args, cwd, deploy_home)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 4 and "Traceback" not in done.stderr
    assert "pruning and FP32 together lose" in lines[-1] and "against the original model" in lines[-1]
    assert not (out / "yolov8n-160-pruned-cpu-fp32").exists()
    summary = build_json([*args[1:], "--accept-drop"], cwd, deploy_home)
    verify = next(s for s in summary["stages"] if s["stage"] == "verify")["metrics"]
    assert verify["within_budget"] is False and verify["total_drop_points"] > verify["total_budget_points"] == 1.0
    assert verify["original"]["map50_95"] > 0.6
    assert [s["stage"] for s in summary["stages"]][:4] == ["load", "export-original", "reference-original", "prune"]


def test_a_long_quantize_says_how_far_it_is_in_a_log(built, deploy_home, tmp_path):
    """Output to a pipe (a log): the quantize stage's progress lines come on stdout, between its running and done
    lines, prefixed with the stage; none bypasses the CLI on stderr."""
    done = run_deploy(["build", "--target", "arm", "--calib-size", "24"], tmp_path, deploy_home)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    running = next(i for i, line in enumerate(lines) if line.endswith("quantize: running"))
    finished = next(i for i, line in enumerate(lines) if line.endswith("quantize: done"))
    progress = [line for line in lines[running + 1:finished] if "quantize: calibrating: image" in line]
    assert progress and progress[-1].split("quantize: ")[1].startswith("calibrating: image 24/24 (")
    assert "quantize[arm]" not in done.stdout + done.stderr
