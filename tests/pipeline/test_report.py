"""The build report (report.html, report.md) and the model card (README.md) a bundle ships.

Unit tests render the report from hand-made results (every section present, or none measured); the rest read the
cpu FP32 bundle a real build published, re-run its release stage, run the model card's code and render the page in
headless Chromium.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edge_deploy.pipeline.artifacts import Artifact
from edge_deploy.pipeline.report import (PALETTE, ReportInputs, _frontier, build_sections, render_html,
                                         render_markdown)
from edge_deploy.pipeline.results import (Accuracy, AccuracyReport, ImageSplit, ModelInfo, ProbeResult,
                                          QuantizationReport, SpeedReport)
from edge_deploy.pipeline.stages.release import ReleaseStage, model_card
from tests.conftest import EMBEDDED_MODEL, REPO, run_deploy

SECTIONS = ("Build", "Stage timeline", "Accuracy per artifact", "Latency", "Pruning history",
            "Quantization sensitivity", "Latency against mAP50-95")
# The engine's record of a build, as the release stage receives it.
TIMELINE = ({"stage": "load", "cache_hit": True, "started": 0.25, "seconds": 0.012, "work_seconds": 1.4},
            {"stage": "export", "cache_hit": False, "started": 0.3, "seconds": 9.8, "work_seconds": 9.8},
            {"stage": "quantize", "cache_hit": False, "started": 10.2, "seconds": 80.5, "work_seconds": 80.5},
            {"stage": "probe", "cache_hit": False, "started": 91.0, "seconds": 2.5, "work_seconds": None})


# --- hand-made results ------------------------------------------------------------------------------------------

def _probe(samples: list[float], p50: float, device: str | None = None) -> ProbeResult:
    transport = {"transport": "ssh" if device else "local", **({"device": device} if device else {})}
    return ProbeResult(
        runner="ort_probe", runner_version=3, runtime="onnxruntime 1.31.1",
        device={"processor": "Test CPU", "cpus": 4, "machine": "x86_64", "os": "Debian 12", "transport": transport},
        threads=None, batch=1, warmup=10, runs=len(samples) or 50, load_ms=51.5,
        latency_ms={"p50": p50, "p90": round(p50 * 1.1, 3), "p99": round(p50 * 1.3, 3), "mean": p50, "min": p50,
                    "max": round(p50 * 1.4, 3)},
        fps=round(1000 / p50, 2), memory_mb={"peak_rss": 90.5},
        power={"status": "unavailable", "reason": "no sensor"}, samples_ms=samples)


def full_inputs(samples: bool = True) -> ReportInputs:
    """Every section measured: a pruned, INT8-quantized build with a float fallback and a probe."""
    report = ImageSplit("report", "/data/val <b>https://example.invalid/x</b>", 200, "ab" * 32)
    selection = ImageSplit("selection", "/data/selection", 100, "cd" * 32)
    verify = AccuracyReport(
        artifact_label="INT8 on cpu", reference=Accuracy(0.8839, 0.7061, 200, 674),
        artifact=Accuracy(0.8818, 0.7023, 200, 674), drop_points=0.38, budget_points=0.5, within_budget=True,
        split=report, fidelity=Accuracy(0.9914, 0.9782, 200, 783, "fidelity", 0.9489),
        original=Accuracy(0.89, 0.7110, 200, 674), total_drop_points=0.87, total_budget_points=1.5)
    fp32 = [3.0 + 0.01 * (i % 17) for i in range(100)] if samples else []
    int8 = [2.0 + 0.013 * (i % 11) for i in range(100)] if samples else []
    probe = SpeedReport("INT8 on cpu", _probe(fp32, 3.069), _probe(int8, 1.981), 1.549)
    sensitivity = [{"unit": f"/model.{i}/conv/Conv", "kind": "Conv", "sqnr_db": round(9.5 + 1.25 * i, 2)}
                   for i in range(60)]
    quantization = QuantizationReport(
        precision="int8", method="minmax", choice="minmax with 2 nodes float", selection=selection,
        budget_points=0.5, drop_points=0.31, within_budget=True,
        float_units=["/model.0/conv/Conv", "/model.1/conv/Conv"], units=225, unit_kind="node",
        calibration_images=200,
        trials=[{"method": "minmax", "float_units": [], "drop_points": 0.72},
                {"method": "percentile", "float_units": [], "drop_points": 0.9},
                {"method": "minmax", "float_units": ["/model.0/conv/Conv"], "drop_points": 0.55},
                {"method": "minmax", "float_units": ["/model.0/conv/Conv", "/model.1/conv/Conv"],
                 "drop_points": 0.31}],
        sensitivity=sensitivity, ranked_by="Each node quantized alone in the float model, scored by the outputs")
    pruning = {"criterion": "bn_scale", "stop": "schedule complete", "steps": [
        {"step": 0, "params": 3011628, "macs": 254510900, "macs_ratio": 1.0, "latency_ms": 6.45, "map50_95": 0.711,
         "map50": 0.8708, "fine_tuned": False},
        {"step": 1, "params": 759044, "macs": 65389300, "macs_ratio": 3.892, "latency_ms": 1.706,
         "map50_95": 0.7006, "map50": 0.8663, "fine_tuned": True}]}
    info = ModelInfo("yolov8n-shapes.pt", "yolov8n", "detect", ["circle", "<rect>", "tri&angle"], 160, [8, 16, 32],
                     16, 759044, pruned=True)
    return ReportInputs("yolov8n-160-pruned-cpu-int8", info, {"target": "cpu", "precision": "int8", "profile": None},
                        {"images": 200, "source": "/data/train", "fingerprint": "ef" * 32},
                        {"onnxruntime": "1.31.1", "edge-deploy": "0.1.0"}, verify, probe, quantization,
                        Accuracy(0.8900, 0.7100, 100, 330), pruning, TIMELINE)


def unmeasured_inputs() -> ReportInputs:
    """Nothing optional measured: a jetson FP16 build made here (no probe, no calibration, no pruning)."""
    full = full_inputs()
    verify = AccuracyReport("FP16 on jetson", full.verify.reference, Accuracy(0.8838, 0.7060, 200, 674), 0.01, 0.5,
                            True, full.verify.split)
    return ReportInputs("yolov8n-160-jetson-fp16", full.info, {"target": "jetson", "precision": "fp16",
                                                               "profile": "jetson-xavier-nx"},
                        None, full.toolchain, verify, None)


def assert_self_contained(page: str) -> None:
    """Nothing the page would fetch: no script, no stylesheet link, no remote or protocol-relative reference."""
    lowered = page.lower()
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    assert "url(" not in lowered and "<img" not in lowered and "<iframe" not in lowered
    references = re.findall(r"""\b(?:src|href|xlink:href|action|srcset)\s*=\s*["']?([^"'\s>]*)""", page, re.I)
    assert references and all(ref.startswith("#") for ref in references), references


def md_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Every Markdown table under each `## ` heading, as rows of header -> cell."""
    tables: dict[str, list[dict[str, str]]] = {}
    section, lines = None, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("## "):
            section = line[3:]
        elif line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            headers = _cells(line)
            rows = []
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(dict(zip(headers, _cells(row))))
            tables.setdefault(section, []).extend(rows)
    return tables


def _cells(line: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]


def md_sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## ", text, flags=re.M)
    return {part.splitlines()[0]: part for part in parts[1:]}


# --- unit -------------------------------------------------------------------------------------------------------

def test_every_section_is_drawn_from_its_numbers_and_user_text_is_escaped():
    r = full_inputs()
    page, md = render_html(r), render_markdown(r)
    assert_self_contained(page)
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page and f"## {title}\n" in md
    # timeline, accuracy drops, two histograms, two pruning curves, sensitivity, Pareto
    assert page.count("<svg ") == 8
    assert "<rect>" not in page and "&lt;rect&gt;" in page and "tri&amp;angle" in page
    assert "<b>" not in page  # a path with markup in it is shown as text
    tables = md_tables(md)
    accuracy = tables["Accuracy per artifact"]
    chosen = [row for row in accuracy if "(chosen)" in row["model"]]
    assert len(chosen) == 1 and "2 nodes float" in chosen[0]["model"]
    # A candidate's mAP is the FP32 figure on the same (selection) split minus its drop, and says so.
    assert chosen[0]["mAP50-95"] == "0.7069 (FP32 minus the drop)" and chosen[0]["split"] == "selection (100 images)"
    assert chosen[0]["mAP50"] == "not recorded"
    final = next(row for row in accuracy if row["model"] == "INT8 on cpu (final)" and row["measure"] == "accuracy mAP")
    assert (final["mAP50"], final["mAP50-95"], final["drop vs FP32 (points)"]) == ("0.8818", "0.7023", "0.38")
    assert len(tables["Quantization sensitivity"]) == 60
    assert [row["kept float"] for row in tables["Quantization sensitivity"][:3]] == ["yes", "yes", "no"]
    # How the units were scored is the backend's own account of it.
    assert "Each node quantized alone in the float model, scored by the outputs: lower hurts more. 2 of 225" in md
    latency = {row["model"]: row for row in tables["Latency"]}
    assert latency["INT8 on cpu"]["p50 ms"] == "1.981" and latency["FP32 ONNX"]["runs"] == "100"
    pareto = {row["model"]: row for row in tables["Latency against mAP50-95"]}
    assert pareto["INT8 on cpu"]["on the frontier"] == "yes" and pareto["FP32 ONNX"]["mAP50-95"] == "0.7061"
    # A report of old, from before the probe said how it timed: two jobs, which is how it was timed then.
    assert "INT8 on cpu ran 1.549x as fast as FP32 ONNX at p50, timed in two jobs, one after the other; both on" in md
    assert [row["stage"] for row in tables["Stage timeline"]] == ["load", "export", "quantize", "probe"]
    assert tables["Stage timeline"][0]["cache"] == "hit" and tables["Stage timeline"][3]["work when it ran s"] == \
        "not recorded"
    # The original model has an mAP but no latency: it is named, not plotted.
    assert "the original model before pruning" in md


def test_what_was_not_measured_is_said_in_words_and_never_drawn():
    r = unmeasured_inputs()
    page, md = render_html(r), render_markdown(r)
    assert_self_contained(page)
    # The one chart is the final artifact's measured accuracy drop; no section without figures draws anything.
    sections = page.split("<section ")[1:]
    assert [s.split('"')[1] for s in sections if "<svg" in s] == ["accuracy"] and page.count("<svg ") == 1
    for text in ("Not recorded: this bundle was released outside", "Not measured: the `jetson` artifact",
                 "Not pruned", "Not quantized: FP16", "Not drawn: no latency was measured"):
        assert text in md and text.replace("`", "") in re.sub(r"</?code>", "", page), text
    assert "Latency" not in md_tables(md)


def test_a_runtime_without_per_run_samples_gets_no_histogram():
    page = render_html(full_inputs(samples=False))
    assert "the runtime reported no per-run samples" in page
    # timeline, drops, pruning x2, sensitivity, Pareto; no histogram
    assert page.count("<svg ") == 6


def test_the_pareto_frontier_keeps_what_nothing_beats_on_both():
    assert _frontier([(3.0, 0.70), (2.0, 0.69), (4.0, 0.68), (2.0, 0.70)]) == {3}
    assert _frontier([(3.0, 0.71), (2.0, 0.69)]) == {0, 1}


def test_rendering_is_a_pure_function_of_its_inputs():
    first = render_html(full_inputs()) + render_markdown(full_inputs())
    assert render_html(full_inputs()) + render_markdown(full_inputs()) == first
    # Another interpreter with another hash seed renders the same bytes.
    code = ("import hashlib; from tests.pipeline.test_report import full_inputs; "
            "from edge_deploy.pipeline.report import render_html, render_markdown; "
            "print(hashlib.sha256((render_html(full_inputs()) + render_markdown(full_inputs())).encode()).hexdigest())")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hashlib.sha256(first.encode()).hexdigest()
    assert len(build_sections(full_inputs())) == len(SECTIONS)


def test_the_model_card_loads_an_ncnn_model_and_points_a_device_build_to_its_steps():
    r = full_inputs()
    arm = {"target": "arm", "precision": "fp16", "files": {"param": "model.ncnn.param", "bin": "model.ncnn.bin"},
           "input": {"name": "in0", "layout": "NCHW", "imgsz": 160},
           "outputs": {"out0": "box_dist: (batch, 64, anchors)", "out1": "cls_logit: (batch, 3, anchors)"}}
    card = model_card("m-arm-fp16", r.info, {**r.config, "target": "arm", "precision": "fp16"}, None,
                      r.verify, r.probe, runtime=arm)
    code = card.split("```python\n")[1].split("```")[0]
    compile(code, "card", "exec")
    assert 'net.load_param("model.ncnn.param")' in code and 'extractor.extract("out1")' in code
    assert "use_fp16_arithmetic = True" in code
    jetson = {"files": {"model": "model.onnx"}, "input": {"name": "images"}, "outputs": {}}
    card = model_card("m-jetson", r.info, {**r.config, "target": "jetson"}, None, r.verify, None,
                      device_steps=["sh build_engine.sh"], runtime=jetson)
    assert "see *On the device* below" in card and "## On the device" in card
    assert "- Its speed was not measured." in card and "## Limits" in card


# --- a real bundle ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bundle(cpu_fp32_bundle) -> Path:
    return cpu_fp32_bundle


def test_the_bundle_ships_a_readme_and_a_report_that_state_its_metrics(bundle, deploy_home, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"README.md", "report.html", "report.md"} <= set(manifest["files"])
    assert not (bundle / "MODEL_CARD.md").exists()
    metrics = json.loads((bundle / "metrics.json").read_text())
    page, md = (bundle / "report.html").read_text(), (bundle / "report.md").read_text()
    assert_self_contained(page)
    for title in SECTIONS:
        assert f"<h2>{title}</h2>" in page and f"## {title}\n" in md
    tables = md_tables(md)
    reference = metrics["accuracy"]["reference"]
    fp32 = tables["Accuracy per artifact"][0]
    assert fp32["model"] == "FP32 ONNX (ONNX Runtime)" and fp32["split"] == f"report ({reference['images']} images)"
    assert (fp32["mAP50"], fp32["mAP50-95"]) == (f"{reference['map50']:.4f}", f"{reference['map50_95']:.4f}")
    low, high = reference["map50_95_interval"]
    assert fp32["mAP50-95 interval"] == f"{low:.4f}..{high:.4f}" and low <= reference["map50_95"] <= high
    speed = metrics["speed"]["reference"]
    row = tables["Latency"][0]
    assert row["model"] == "FP32 ONNX" and row["runtime"] == speed["runtime"]
    assert [row[f"{q} ms"] for q in ("p50", "p90", "p99")] == [str(speed["latency_ms"][q]) for q in ("p50", "p90",
                                                                                                     "p99")]
    assert row["runs"] == str(len(speed["samples_ms"])) and speed["device"]["processor"] in row["device"]
    pareto = tables["Latency against mAP50-95"][0]
    assert pareto["p50 ms"] == str(speed["latency_ms"]["p50"]) and pareto["mAP50-95"] == f"{reference['map50_95']:.4f}"
    for number in (f"{reference['map50_95']:.4f}", str(speed["latency_ms"]["p99"])):
        assert number in page
    # An FP32 build: nothing quantized or pruned, said in words.
    assert "Not quantized: FP32" in md and "Not pruned" in md
    # The timeline is the build's: every stage before release, in order.
    record = json.loads((bundle.parent / f"{bundle.name}.build.json").read_text())
    assert [row["stage"] for row in tables["Stage timeline"]] == [s["stage"] for s in record["stages"]
                                                                   if s["stage"] != "release"]
    card = (bundle / "README.md").read_text()
    for heading in ("## Loading it", "## Accuracy", "## Speed", "## Limits"):
        assert heading in card
    assert f"{reference['map50_95']:.4f}" in card and f"{reference['images']} images" in card
    # deploy release ships them.
    done = run_deploy(["release", str(bundle), "--version", "0.0.1", "--output", str(tmp_path)], tmp_path,
                      deploy_home)
    assert done.returncode == 0, done.stderr
    with tarfile.open(next(tmp_path.glob("*.tar.gz"))) as tar:
        names = {Path(n).name for n in tar.getnames()}
    assert {"README.md", "report.html", "report.md"} <= names


def _release_inputs(bundle: Path, tmp_path: Path, stage: ReleaseStage) -> dict[str, Artifact]:
    """The release stage's inputs as the build that made the bundle had them (its record names them)."""
    record = json.loads((bundle.parent / f"{bundle.name}.build.json").read_text())
    found = {"source": Artifact.of(EMBEDDED_MODEL)}
    for step in record["stages"]:
        for name, artifact in step["artifacts"].items():
            found[name] = Artifact(Path(artifact["path"]), artifact["sha256"])
    if not found["probe_report"].path.exists():
        # A timing taken on a busy machine is kept for its build only; the bundle's metrics hold the same report.
        speed = tmp_path / "probe_report.json"
        speed.write_text(json.dumps(json.loads((bundle / "metrics.json").read_text())["speed"]))
        found["probe_report"] = Artifact.of(speed)
    return {name: found[name] for name in stage.inputs}


def test_the_release_stage_writes_the_same_bytes_from_the_same_inputs(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    stage = ReleaseStage(manifest["bundle"], manifest["config"], manifest["calibration"], probed=True)
    stage.timeline = TIMELINE
    inputs = _release_inputs(bundle, tmp_path, stage)
    outputs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        outputs.append(stage.run(inputs, tmp_path / name).files["bundle"])
    for file in ("report.html", "report.md", "README.md", "metrics.json", "manifest.json"):
        assert (outputs[0] / file).read_bytes() == (outputs[1] / file).read_bytes(), file
    # Everything but the timeline (which is this test's) is what the published bundle carries.
    assert (outputs[0] / "README.md").read_bytes() == (bundle / "README.md").read_bytes()
    ours, published = (md_sections(p.read_text()) for p in (outputs[0] / "report.md", bundle / "report.md"))
    assert ours.keys() == published.keys()
    for title in ours:
        if title != "Stage timeline":
            assert ours[title] == published[title], title


def test_the_model_cards_code_runs_and_finds_the_objects(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    images = Path(manifest["splits"]["report"]["source"])
    image = sorted(images.iterdir())[0]
    labels = (images.parent.parent / "labels" / images.name / f"{image.stem}.txt").read_text().split()
    code = (bundle / "README.md").read_text().split("```python\n")[1].split("```")[0]
    code = code.replace('"image.jpg"', repr(str(image))) + "\nprint(json.dumps(detections.tolist()))\n"
    work = tmp_path / "user"
    shutil.copytree(bundle, work)
    done = subprocess.run([sys.executable, "-c", code], cwd=work, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    detections = json.loads(done.stdout.strip().splitlines()[-1])
    # The embedded detector finds the image's labelled shapes, with their classes.
    assert sorted(int(d[5]) for d in detections) == sorted(int(float(c)) for c in labels[::5])
    assert all(0.25 <= d[4] <= 1 for d in detections)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def screenshot(page: Path, out: Path):
    import numpy as np
    from PIL import Image

    done = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={out}",
                           "--window-size=1200,2400", f"--user-data-dir={out.parent / 'chromium-profile'}",
                           page.resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert out.exists() and out.stat().st_size > 0, done.stderr[-2000:]
    return np.asarray(Image.open(out).convert("RGB"))


def _pixels_of(image, colour: str) -> int:
    import numpy as np

    rgb = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(image.astype(int) - rgb).sum(axis=2) <= 12).sum())


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary (./run-tests installs Debian's chromium as root)")
def test_the_report_renders_in_a_headless_browser(bundle, tmp_path):
    image = screenshot(bundle / "report.html", tmp_path / "bundle.png")
    assert image.shape == (2400, 1200, 3)
    assert image.std() > 20 and len({tuple(p) for p in image.reshape(-1, 3)[::7]}) > 20
    # The timeline's bars (ran or cache hit) are drawn within the first screen.
    assert _pixels_of(image, PALETTE[0]) + _pixels_of(image, "#9ecae1") > 500
    # The hand-made report with every chart: several of the plots' colours are on screen.
    page = tmp_path / "full.html"
    page.write_text(render_html(full_inputs()))
    image = screenshot(page, tmp_path / "full.png")
    drawn = [c for c in PALETTE if _pixels_of(image, c) > 200]
    assert len(drawn) >= 3, drawn


def test_a_speed_up_timed_in_turns_names_its_reference_and_how_steady_it_was():
    from edge_deploy.pipeline.results import INTERLEAVED

    probe = SpeedReport("INT8 on arm", _probe([], 72.3), _probe([], 57.0), 1.268, reference_label="FP32 on arm",
                        timing=INTERLEAVED, speedup_rounds={"rounds": 20, "runs_per_round": 5, "median": 1.326,
                                                            "min": 0.88, "max": 1.92})
    assert probe.speedup_text() == ("INT8 on arm ran 1.268x as fast as FP32 on arm at p50, timed in one process, in "
                                    "turns; 0.88-1.92x (median 1.326x) over its 20 rounds of 5 runs each")
