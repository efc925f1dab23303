"""`deploy search`: the space's checks, the successive-halving scheduler and the Pareto front on given numbers, and
real searches on a local Ray (2 CPUs) over a tiny space of the embedded model: interrupted and resumed, a failing
trial recorded, an impossible budget, a pick published."""

from __future__ import annotations

import ast
import html
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_deploy.pipeline.config import BuildConfig, SearchConfig
from edge_deploy.pipeline.errors import ConfigError
from edge_deploy.pipeline.search import Plan, Trial, TrialSpec, _Scheduler, pareto_front, plan_search, \
    timed_here_one_at_a_time
from tests.conftest import DEPLOY, REPO, run_deploy


def cli(args: list[str], home: Path):
    """The command in this process (its imports are warm): same code path and exit codes as the installed one."""
    from click.testing import CliRunner

    from edge_deploy.pipeline.cli import main

    return CliRunner(env={"DEPLOY_HOME": str(home), "COLUMNS": "160"}).invoke(main, args)


def trial(spec: TrialSpec, p50: float, map50_95: float, status: str = "done") -> Trial:
    return Trial(spec, f"k{p50}-{map50_95}", status, p50_ms=p50, map50_95=map50_95)


def test_pareto_front_keeps_only_undominated_trials_fastest_first():
    s = [TrialSpec(64 + 32 * i, "int8") for i in range(5)]
    trials = [trial(s[0], 2.0, 0.50), trial(s[1], 3.0, 0.60), trial(s[2], 3.5, 0.55),  # s2 dominated by s1
              trial(s[3], 5.0, 0.70), trial(s[4], 5.0, 0.65)]  # s4: as fast as s3, less accurate
    assert [t.spec for t in pareto_front(trials)] == [s[0], s[1], s[3]]


TIMED_ON = "bench-host: Test CPU (2 CPUs, x86_64), via local"


def _drawn(svg: str) -> dict[str, list[tuple[str, str]]]:
    """The plot's round marks by class, each as its centre."""
    marks: dict[str, list[tuple[str, str]]] = {}
    for kind, cx, cy in re.findall(r'<circle class="([^"]+)" cx="([\d.]+)" cy="([\d.]+)"', svg):
        marks.setdefault(kind, []).append((cx, cy))
    return marks


def _point(svg: str, label: str) -> tuple[str, str]:
    """The centre of the trial point whose tooltip names `label`."""
    found = re.findall(r'<circle class="trial[^"]*" cx="([\d.]+)" cy="([\d.]+)"[^>]*><title>([^<]+):', svg)
    return next((cx, cy) for cx, cy, title in found if title == label)


def test_the_front_plot_draws_every_timed_trial_the_front_the_baseline_and_the_pick(tmp_path):
    from edge_deploy.pipeline.report import add_search_section, render_html, render_markdown
    from edge_deploy.pipeline.search import _conclude, plot_record
    from tests.pipeline.test_report import assert_self_contained, full_inputs

    base, small, small_int8 = TrialSpec(96, "fp32"), TrialSpec(64, "fp32"), TrialSpec(64, "int8")
    pruned_1, pruned_4 = (TrialSpec(64, "int8", "auto", 0.5, "bn_scale", e) for e in (1, 4))
    broken = TrialSpec(96, "int8")
    config = BuildConfig(search=SearchConfig(epochs=[1, 4], max_map_drop=4.5))
    plan = Plan(config, tmp_path, tmp_path / "search", "cpu", 32, base, [64, 96], [base, small, small_int8, broken],
                [pruned_1], [1, 4], "digest", {"images": 40, "source": "/data/val (selection)", "fingerprint": "ab"})
    scheduler = _Scheduler(plan)
    # Made-up figures: the lower rung of the pruned arm is drawn but not on the front (its higher rung replaces it).
    order = [trial(base, 10.0, 0.70), trial(small, 6.0, 0.66), trial(small_int8, 3.0, 0.65),
             trial(pruned_1, 1.9, 0.40), trial(pruned_4, 2.0, 0.60), trial(broken, 0, 0, status="failed")]
    order[-1].p50_ms = order[-1].map50_95 = None
    for t in order:
        t.timed_on = TIMED_ON if t.status == "done" else None
        scheduler.done[t.spec] = t
    result = _conclude(plan, scheduler, order, 6, 0, 12.0, None)
    assert result.best.spec == small  # 4 points down: the fastest within 4.5
    svg = (tmp_path / "search" / "front.svg").read_text()
    assert svg.startswith('<svg xmlns="http://www.w3.org/2000/svg" ') and result.plot_path.name == "front.svg"
    marks = _drawn(svg)
    assert len(marks["trial"]) + len(marks["trial front"]) == 5 and len(marks["trial front"]) == 4
    # The choice's ring is centred on its own point, the baseline's square on the baseline's.
    assert marks["picked"] == [_point(svg, "64px fp32")]
    x, y = (float(v) for v in _point(svg, "96px fp32"))
    assert f'class="baseline" x="{x - 7:.2f}" y="{y - 7:.2f}"' in svg
    assert svg.count('class="baseline"') == 1 and svg.count('class="budget"') == 1 and svg.count("<path") == 1
    for text in ("5 of 6 trials drawn (1 failed: not drawn)", TIMED_ON, "40 images from /data/val (selection)",
                 "fastest within budget (64px fp32, 4.00 points)", "4.50 points of mAP50-95 below the baseline"):
        assert text in svg, text

    # A picked bundle's report: the same plot and a table, after the build's own sections.
    plot = plot_record(result, result.best, "picked: fastest within budget")
    page, md = add_search_section(render_html(full_inputs()), render_markdown(full_inputs()), {"plot": plot})
    assert_self_contained(page)
    assert page.index('<li><a href="#search">') < page.index('<section id="search">') < page.index("</body>")
    section = page[page.index('<section id="search">'):]
    assert _drawn(section)["picked"] == marks["picked"] and "picked: fastest within budget" in section
    assert "`/data/val (selection)`" in md and md.count("| 64px fp32 | 0.6600 | 4.00 | 6.00 | yes | picked |") == 1


def _plan(pruned: list[TrialSpec], unpruned: list[TrialSpec], rungs: list[int], eta: int) -> Plan:
    config = BuildConfig(search=SearchConfig(epochs=rungs, eta=eta))
    return Plan(config, Path("."), Path("."), "cpu", 32, TrialSpec(96, "fp32"), [64, 96], unpruned, pruned, rungs,
                "digest")


def test_successive_halving_promotes_the_pareto_best_of_each_rung():
    pruned = [TrialSpec(64, "int8", "auto", ratio, "bn_scale", 1) for ratio in (0.2, 0.4, 0.6, 0.8)]
    plan = _plan(pruned, [], rungs=[1, 4, 12], eta=2)
    scheduler = _Scheduler(plan)
    # Made up for the scheduler alone: more pruning is faster; 0.4 is the most accurate, 0.8 the least.
    quality = {0.2: 0.60, 0.4: 0.65, 0.6: 0.50, 0.8: 0.10}
    started = []
    while not scheduler.finished():
        spec = scheduler.next()
        assert spec is not None
        started.append(spec)
        scheduler.running[spec] = None
        # Run one at a time, as one worker would: finish what was started at once.
        scheduler.running.pop(spec)
        scheduler.done[spec] = trial(spec, 10 * (1 - spec.prune_ratio), quality.get(spec.prune_ratio, 0.7)
                                     + spec.epochs / 100) if spec.pruned else trial(spec, 9.0, 0.7)
    by_rung = {e: sorted(s.prune_ratio for s in started if s.pruned and s.epochs == e) for e in (1, 4, 12)}
    assert by_rung[1] == [0.2, 0.4, 0.6, 0.8]
    # 4 at rung 1, eta 2: the first Pareto front is {0.8 (fastest), 0.4 (most accurate), 0.6}; the two most
    # accurate of it go on. Then one of the two.
    assert by_rung[4] == [0.4, 0.6]
    assert by_rung[12] == [0.4]
    assert started[0] == plan.baseline


def test_trials_sharing_their_first_stages_do_not_run_at_once():
    a = TrialSpec(64, "int8", "auto", 0.5, "bn_scale", 1)
    b = TrialSpec(64, "fp32", "auto", 0.5, "bn_scale", 1)
    c = TrialSpec(128, "fp32")
    scheduler = _Scheduler(_plan([a, b], [c], rungs=[1], eta=2))
    first = scheduler.next()
    scheduler.running[first] = None
    second = scheduler.next()
    scheduler.running[second] = None
    third = scheduler.next()
    assert (first, second) == (scheduler.plan.baseline, c)  # different prefixes: both start
    scheduler.running[third] = None
    assert third == a and scheduler.next() is None  # b would fine-tune a's pruned model again, at the same time


def test_only_the_search_module_imports_ray_and_only_lazily():
    importers = []
    for folder in ("pipeline", "targets", "calibration", "edge_deploy"):
        for path in (REPO / folder).rglob("*.py"):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                if any(n == "ray" or n.startswith("ray.") for n in names):
                    importers.append((path.relative_to(REPO).as_posix(), node.col_offset))
    assert importers and all(p == "pipeline/search.py" and col > 0 for p, col in importers), importers
    # `deploy targets`, and loading the search module itself, leave Ray unimported.
    code = ("import sys\nfrom edge_deploy.pipeline.cli import main\nimport edge_deploy.pipeline.search\n"
            "try:\n    main(['targets', '--json'])\nexcept SystemExit:\n    pass\n"
            "print('RAY', 'ray' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("RAY False"), done.stdout[-300:] + done.stderr[-300:]


def test_a_space_without_a_valid_input_size_is_refused_before_any_trial(deploy_home, small_shapes_yaml, tmp_path):
    config = BuildConfig(data=small_shapes_yaml, output=tmp_path,
                         search=SearchConfig(imgsz_range=(8, 24), precisions=["fp32"]))
    with pytest.raises(ConfigError, match="no multiple of the model's largest stride 32 lies in imgsz_range"):
        plan_search(config, deploy_home)
    done = cli(["search", "--data", str(small_shapes_yaml), "--sizes", "16,64", "--output", str(tmp_path)],
               deploy_home)
    assert done.exit_code == 2
    assert done.stderr.count("\n") == 1 and "input size 16" in done.stderr and "stride 32" in done.stderr
    assert not (tmp_path / "search").exists()


def test_an_unreachable_ray_address_is_one_line(deploy_home, tmp_path):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    started = time.monotonic()
    done = run_deploy(["search", "--ray-address", f"127.0.0.1:{port}", "--output", str(tmp_path)], tmp_path,
                      deploy_home)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and f"Ray is not reachable at 127.0.0.1:{port}" in done.stderr
    assert time.monotonic() - started < 60


# The real searches: 64 and 96 px, FP32 and INT8 (MinMax), unpruned, on the small shapes set. The SQNR floor is
# set out of reach so that the INT8 trials fail at compile: a failing trial must not stop the search.
SPACE = ["--sizes", "64,96", "--imgsz", "96", "--precisions", "fp32,int8", "--quant-methods", "minmax",
         "--prune-ratios", "0", "--calib-size", "16", "--runs", "50", "--min-sqnr", "200"]


def _search_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["search", "--data", str(data), "--output", str(out), *SPACE, *extra]


@pytest.fixture(scope="module")
def searched(deploy_home, small_shapes_yaml, tmp_path_factory):
    """One search interrupted after its first finished trial (1 worker), then run again to the end (2 workers)."""
    import os

    out = tmp_path_factory.mktemp("search-out")
    env = {**os.environ, "DEPLOY_HOME": str(deploy_home), "COLUMNS": "160"}
    first = subprocess.Popen([str(DEPLOY), *_search_args(small_shapes_yaml, out, "--workers", "1")], cwd=out, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trials = out / "search" / "trials"
    deadline = time.monotonic() + 300
    # The worker running the first trial dies (SIGKILL) as soon as it starts: Ray runs the trial again elsewhere.
    killed = None
    while time.monotonic() < deadline and first.poll() is None and killed is None:
        for marker in trials.glob("*.running"):
            try:
                killed = json.loads(marker.read_text())["pid"]
            except (OSError, ValueError):
                continue
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.2)
    while time.monotonic() < deadline and first.poll() is None and not list(trials.glob("*.json")):
        time.sleep(0.5)
    on_record_before = sorted(p.name for p in trials.glob("*.json"))
    first.send_signal(signal.SIGINT)
    _, first_err = first.communicate(timeout=120)
    second = run_deploy(_search_args(small_shapes_yaml, out, "--workers", "2", "--json"), out, deploy_home)
    return {"out": out, "first_code": first.returncode, "first_err": first_err, "before": on_record_before,
            "second": second, "killed": killed}


def test_a_search_finds_a_front_and_records_every_trial(searched):
    done = searched["second"]
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    trials = summary["trials"]
    assert sorted((t["spec"]["imgsz"], t["spec"]["precision"]) for t in trials) == \
        [(64, "fp32"), (64, "int8"), (96, "fp32"), (96, "int8")]
    fp32 = [t for t in trials if t["spec"]["precision"] == "fp32"]
    assert all(t["status"] == "done" and t["p50_ms"] > 0 and 0 < t["map50_95"] <= 1 and t["macs"] > 0
               and t["size_bytes"] > 0 and Path(t["build_record"]).is_file() for t in fp32)
    by_size = {t["spec"]["imgsz"]: t for t in fp32}
    assert by_size[96]["drop_points"] == 0  # the baseline itself
    assert by_size[64]["macs"] < by_size[96]["macs"]
    # The front holds only measured trials; the best under 1 point is the baseline-sized FP32 model here.
    assert set(summary["front"]) <= {t["key"] for t in fp32}
    assert summary["best_under_budget"] == by_size[96]["key"]
    front_md = (searched["out"] / "search" / "front.md").read_text()
    assert "| trial |" in front_md and "Failed trials:" in front_md


def test_a_failing_trial_is_recorded_and_the_search_goes_on(searched):
    summary = json.loads(searched["second"].stdout)
    failed = [t for t in summary["trials"] if t["status"] == "failed"]
    assert sorted(t["spec"]["imgsz"] for t in failed) == [64, 96]
    assert all(t["spec"]["precision"] == "int8" and "SQNR" in t["error"] and not t["retry"] for t in failed)
    record = json.loads((searched["out"] / "search" / "trials" / f"{failed[0]['key']}.json").read_text())
    assert record["status"] == "failed" and record["error"] == failed[0]["error"]


def test_an_interrupted_search_resumes_from_its_finished_trials(searched):
    assert searched["first_code"] == 130, searched["first_err"]
    assert searched["first_err"].count("\n") == 1 and "resumes" in searched["first_err"]
    before = searched["before"]
    assert before, "the first run was interrupted before any trial finished"
    summary = json.loads(searched["second"].stdout)
    reused = {f"{t['key']}.json" for t in summary["trials"] if t["reused"]}
    assert set(before) <= reused
    # Each trial ran once across both runs: what was on record was not run again.
    assert summary["executed"] + summary["reused"] == len(summary["trials"]) == 4
    assert summary["reused"] == len(before) and summary["executed"] == 4 - len(before)


def _impossible_budget(data: Path, out: Path) -> list[str]:
    args = _search_args(data, out, "--max-map-drop", "0.01")
    args[args.index("--sizes") + 1] = "64"
    return args


@pytest.fixture(scope="module")
def picked(searched, deploy_home, small_shapes_yaml):
    """The least lossy trial of a budget nobody meets, published with --accept-drop (every trial is on record)."""
    done = cli([*_impossible_budget(small_shapes_yaml, searched["out"]), "--accept-drop", "--pick",
                "best-under-budget", "--json"], deploy_home)
    assert done.exit_code == 0, done.stderr
    return Path(json.loads(done.stdout)["picked"])


def test_an_impossible_budget_exits_non_zero_with_the_best_found(searched, picked, deploy_home, small_shapes_yaml):
    out = searched["out"]
    # Every trial of this space is on record: no Ray starts.
    done = cli(_impossible_budget(small_shapes_yaml, out), deploy_home)
    assert done.exit_code == 4, done.stderr
    assert done.stderr.count("\n") == 1 and "no trial is within 0.01" in done.stderr
    assert "the best found is 64px fp32 at" in done.stderr and "] ray:" not in done.stdout
    manifest = json.loads((picked / "manifest.json").read_text())
    assert manifest["search"]["spec"]["imgsz"] == 64 and manifest["search"]["choice"].startswith("least lossy")
    assert Path(manifest["search"]["record"]).is_file()
    checked = run_deploy(["check", str(picked)], out, deploy_home)
    assert checked.returncode == 0, checked.stderr


def test_a_picked_bundles_report_and_the_search_folder_plot_the_search(searched, picked):
    from tests.pipeline.test_report import assert_self_contained

    page = (picked / "report.html").read_text()
    assert_self_contained(page)
    section = page[page.index('<section id="search">'):]
    # The baseline (96 px) and the 64 px FP32 trial are timed; the 64 px INT8 trial failed at compile.
    assert "2 of 3 trials drawn (1 failed: not drawn)" in section
    assert _drawn(section)["picked"] == [_point(section, "64px fp32")] and "least lossy" in section
    x, y = (float(v) for v in _point(section, "96px fp32"))
    assert f'class="baseline" x="{x - 7:.2f}" y="{y - 7:.2f}"' in section and 'class="budget"' in section
    plot = json.loads((picked / "manifest.json").read_text())["search"]["plot"]
    # The caption names where the latencies were timed (this machine, by its host name) and the split.
    assert len(plot["timed_on"]) == 1 and plot["timed_on"][0].startswith(f"{socket.gethostname()}: ")
    assert plot["timed_on"][0] in html.unescape(section)
    assert f"the selection split ({plot['selection']['images']} images from" in section
    assert "## Search: latency against mAP50-95 of every trial" in (picked / "report.md").read_text()
    # The search folder's own plot, beside front.md, marks the same pick.
    front = (searched["out"] / "search" / "front.svg").read_text()
    assert _drawn(front)["picked"] == _drawn(section)["picked"] and "least lossy" in front


@pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium binary (./run-tests installs it as root)")
def test_the_search_plot_renders_in_a_headless_browser(searched, picked, tmp_path):
    from edge_deploy.pipeline.report import GREY, PALETTE
    from tests.pipeline.test_report import _pixels_of, screenshot

    image = screenshot(searched["out"] / "search" / "front.svg", tmp_path / "front.png")
    # The front's point, the other trial's, the pick's ring and the budget line are on screen.
    for colour in (PALETTE[0], GREY, PALETTE[3], PALETTE[1]):
        assert _pixels_of(image, colour) > 30, colour


def test_a_worker_dying_mid_trial_is_retried_and_the_search_goes_on(searched):
    assert searched["killed"] is not None, "no trial was seen running"
    summary = json.loads(searched["second"].stdout)
    first = next(t for t in summary["trials"] if f"{t['key']}.json" == searched["before"][0])
    # The trial the killed worker had started finished on another worker, in the same (first) run.
    assert first["status"] == "done" and first["worker"]["pid"] != searched["killed"]


def test_each_trial_keeps_to_the_cpus_it_declares(searched):
    """One trial at a time gets every core; two at once (--workers 2) get half each, so their scoring does not run
    two images per core (each trial used to score on every core whatever ran beside it)."""
    from edge_deploy.calibration.onnxrt import usable_cores

    summary = json.loads(searched["second"].stdout)
    cpus = {f"{t['key']}.json" in searched["before"]: t["worker"]["cpus"] for t in summary["trials"]}
    assert cpus == {True: usable_cores(), False: max(1, usable_cores() // 2)}


def test_a_process_keeps_to_the_cpus_it_is_given(monkeypatch):
    from edge_deploy.calibration.onnxrt import scoring_workers, session_options, usable_cores
    from edge_deploy.pipeline.search import local_shares

    monkeypatch.delenv("DEPLOY_CPUS", raising=False)
    cores = usable_cores()
    assert session_options().intra_op_num_threads == 0  # onnxruntime's own choice
    assert local_shares(SearchConfig(workers=1)) == (1, cores)
    assert local_shares(SearchConfig(workers=2, cpus_per_trial=3)) == (2, 3)
    assert local_shares(SearchConfig()) == (cores, 1)
    monkeypatch.setenv("DEPLOY_CPUS", "1")
    assert (usable_cores(), scoring_workers(), session_options().intra_op_num_threads) == (1, 1, 1)
    assert session_options(4).intra_op_num_threads == 4  # an explicit thread count (a probe) is kept
    monkeypatch.setenv("DEPLOY_CPUS", "not a number")
    assert usable_cores() == cores


def test_counting_a_trials_macs_configures_ultralytics_first(tmp_path):
    """A Ray worker whose trial found every Ultralytics stage in the cache imports Ultralytics for the first time
    when it counts the trial's MACs; the import must be the offline one, or the worker's next trial that loads a
    model fails. Run in a fresh interpreter: this test process configured Ultralytics long ago."""
    import os

    from tests.conftest import EMBEDDED_MODEL

    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from edge_deploy.pipeline.search import _macs_params\n"
        "from edge_deploy.pipeline.ultra import ultralytics_offline\n"
        "home = Path(sys.argv[1])\n"
        "macs, params = _macs_params(home, Path(sys.argv[2]), 64)\n"
        "assert 'ultralytics' in sys.modules and macs > 0 and params > 0\n"
        "ultralytics_offline(home)  # a later trial's load stage\n"
        "print(os.environ['YOLO_CONFIG_DIR'])\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_")}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "home"), str(EMBEDDED_MODEL)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str((tmp_path / "home" / "ultralytics").resolve())


def test_trials_timed_on_this_machine_run_one_at_a_time_unless_asked():
    """Latency taken here beside another trial's fine-tune is not a figure to choose on: one worker by default."""
    assert timed_here_one_at_a_time(SearchConfig(), None)
    assert not timed_here_one_at_a_time(SearchConfig(workers=2), None)
    assert not timed_here_one_at_a_time(SearchConfig(), "pi5-lab")
    assert not timed_here_one_at_a_time(SearchConfig(ray_address="head:6379"), None)
