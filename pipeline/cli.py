"""The `deploy` command. The one place where errors become a message and an exit code."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path

import click

from edge_deploy.pipeline.errors import DeployError
from edge_deploy.pipeline.userfiles import WRITE_FAILURES, write_failure

# Native libraries print their own log lines (OpenCV and its FFmpeg on a corrupt video) before ours; errors are
# reported once, by us, in one line.
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

DEFAULT_CONFIG = Path("deploy.yaml")


def home_dir() -> Path:
    """Where caches, generated data and Ultralytics' config live: DEPLOY_HOME, else ./.deploy."""
    return Path(os.environ.get("DEPLOY_HOME") or ".deploy")  # set but empty means unset, not "here"


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def one_line(message: str) -> str:
    """A message as one line: whatever a library put on several lines (YAML carets, usage blocks) is joined."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {one_line(message)}", err=True)
    sys.exit(code)


# What an interrupted command leaves behind, where "nothing was published" would not be the whole truth.
INTERRUPTED = {"bench": "interrupted; the jobs still running were stopped, and results that arrived are kept in the "
                        "results store (deploy results)",
               "search": "interrupted; the trials still running were stopped, finished trials are kept (OUTPUT/search/"
                         "trials) and running the same search again resumes from them"}


def _terminated(signum, frame):
    raise KeyboardInterrupt


class DeployGroup(click.Group):
    def main(self, *args, **kwargs):
        # Click's own usage errors come as three lines (Usage / Try / Error); ours are one, like every error.
        signal.signal(signal.SIGTERM, _terminated)  # cleans up like Ctrl-C instead of dying mid-write
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            click.echo(exc.ctx.get_help())  # plain `deploy`: the help, as asked
            sys.exit(0)
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else "deploy"
            _fail(f"{exc.format_message()} (see '{command} --help')", 2)
        except click.ClickException as exc:
            _fail(exc.format_message(), exc.exit_code if exc.exit_code else 2)
        except click.exceptions.Abort:
            _fail("interrupted; nothing was published", 130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DeployError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail(INTERRUPTED.get(ctx.invoked_subcommand, "interrupted; nothing was published"), 130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except OSError as exc:
            # A write failure the user can fix, wherever in a build it happens; any other OSError is ours.
            if exc.errno not in WRITE_FAILURES:
                _internal(exc)
            failure = write_failure(exc, exc.filename or "the build's files")
            _fail(str(failure), failure.exit_code)
        except Exception as exc:
            _internal(exc)


def _internal(exc: Exception) -> None:
    """A bug of ours: still one line, with a way to see more."""
    if os.environ.get("DEPLOY_DEBUG"):
        traceback.print_exception(exc)
    first = str(exc).splitlines()[0] if str(exc) else ""
    click.echo(f"internal error: {type(exc).__name__}: {first} (set DEPLOY_DEBUG=1 for the traceback)", err=True)
    sys.exit(70)


@click.group(cls=DeployGroup)
@click.version_option(package_name="edge-deploy")
def main():
    """Prune, export, quantize, compile, verify and probe YOLO detectors for edge targets."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=str),
              help="deploy.yaml to read (default: ./deploy.yaml when present)")
@click.option("--model", type=click.Path(path_type=str), help="Ultralytics .pt checkpoint or .yaml model")
@click.option("--data", type=click.Path(path_type=str), help="Ultralytics data YAML (val split is evaluated)")
@click.option("--target", help="target name, see `deploy targets`")
@click.option("--profile", help="device profile of the target, e.g. raspberry-pi-5 (sets probe threads)")
@click.option("--precision", help="fp32, int8, w4a8 (INT4 weights, INT8 activations) or int4 (weight-only)")
@click.option("--imgsz", type=int, help="input size (default: the checkpoint's training size)")
@click.option("--output", type=click.Path(path_type=str), help="where bundles are published (default: dist)")
@click.option("--prune", "prune_ratio", type=float, help="share of channels to prune, e.g. 0.5 (structured)")
@click.option("--prune-criterion", help="l1, l2, bn_scale, taylor, fpgm, lamp or random")
@click.option("--prune-steps", type=int, help="pruning steps, each followed by fine-tuning")
@click.option("--prune-epochs", type=int, help="fine-tuning epochs after each pruning step (default 12)")
@click.option("--calib", type=click.Path(path_type=str),
              help="calibration image folder, data YAML or video; with --model and no --data, the unlabelled images "
                   "the build is also measured on (fidelity to FP32)")
@click.option("--calib-size", type=int, help="number of calibration images")
@click.option("--quant-method", help="auto (default: try every method the target accepts, keep the best), minmax, entropy or percentile")
@click.option("--symmetric", is_flag=True, default=None, help="symmetric INT8 activations (zero point 0)")
@click.option("--max-map-drop", type=float, help="mAP50-95 points the build may lose against FP32 (default: 0.5 for int8, 2.0 for w4a8/int4, 0.1 for fp16)")
@click.option("--min-sqnr", type=float,
              help="lowest output SQNR (dB) a quantized artifact may have against its FP32 parent (default 15)")
@click.option("--accept-drop", is_flag=True, default=None,
              help="ship the best INT8 model even when it misses --max-map-drop")
@click.option("--runs", type=int, help="timed probe runs (at least 50)")
@click.option("--threads", type=int, help="runtime threads for the probe")
@click.option("--device", help="run the probe on this device from devices.yaml (jetson: its engine is built there)")
@click.option("--inventory", type=click.Path(path_type=str), help="device inventory (default: ./devices.yaml)")
@click.option("--no-cache", is_flag=True, help="run every stage even when a cached result exists")
@click.option("--print-config", is_flag=True, help="print the resolved config as YAML and exit")
@click.option("--json", "as_json", is_flag=True, help="print only the machine-readable summary")
def build(config_path, model, data, target, profile, precision, imgsz, output, prune_ratio, prune_criterion, prune_steps,
          prune_epochs, calib, calib_size, quant_method, symmetric,
          max_map_drop, min_sqnr, accept_drop, runs, threads, device, inventory, no_cache, print_config, as_json):
    """Build a deployable bundle (default: the embedded YOLOv8n for the cpu target)."""
    from edge_deploy.pipeline.config import dump_config, load_config

    if config_path is None and DEFAULT_CONFIG.exists():
        config_path = DEFAULT_CONFIG
    config = load_config(config_path, {
        "model": model, "data": data, "target": target, "profile": profile, "precision": precision, "imgsz": imgsz,
        "output": output, "prune.ratio": prune_ratio, "prune.criterion": prune_criterion,
        "prune.steps": prune_steps, "prune.epochs": prune_epochs, "calibration.source": calib, "calibration.size": calib_size,
        "quantize.method": quant_method, "quantize.symmetric": symmetric, "quantize.max_map_drop": max_map_drop,
        "quantize.min_sqnr_db": min_sqnr,
        "quantize.on_budget_exceeded": "continue" if accept_drop else None, "probe.runs": runs,
        "probe.threads": threads, "probe.device": device, "probe.inventory": inventory,
    })
    if print_config:
        click.echo(dump_config(config), nl=False)
        return
    console = _stderr_console()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        from rich.markup import escape

        # One line per warning however wide the terminal, like every error.
        console.print(f"[yellow]warning:[/] {escape(one_line(str(message)))}", soft_wrap=True)

    warnings.showwarning = show_warning
    from edge_deploy.pipeline.build import run_build

    status = None
    started = time.monotonic()
    interactive = console.is_terminal

    def on_event(stage: str, event: str) -> None:
        nonlocal status
        if as_json:
            return
        if not interactive:
            # Output going to a log gets a line per step on stdout, so a long stage is never silent; stderr keeps
            # the one-line error alone.
            click.echo(f"[{time.monotonic() - started:7.1f} s] {stage}: {event}")
            return
        if event == "running":
            status = console.status(f"[bold]{stage}[/] running…")
            status.start()
        elif event in ("done", "cached"):
            if status is not None:
                status.stop()
                status = None
        elif status is not None:
            # A stage's progress line ('calibrating: image 40/200 (35 s)') replaces the spinner's text.
            status.update(f"[bold]{stage}[/] {event}")

    try:
        result = run_build(config, home_dir(), use_cache=not no_cache, on_event=on_event)
    finally:
        if status is not None:
            status.stop()
    summary = {"bundle": str(result.bundle), "bundle_updated": result.bundle_changed,
               "build_record": str(result.record_path), "stages": [r.to_json() for r in result.records]}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        from edge_deploy.pipeline.summary import render_summary

        render_summary(result, result.config)


def _listed(text: str | None, kind: type, option: str):
    """A comma-separated flag value (`--precisions int8,fp32`) as a list, each item checked for its type."""
    if text is None:
        return None
    try:
        return [kind(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        raise click.UsageError(f"{option} {text!r}: expected a comma-separated list of {kind.__name__}s") from None


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=str),
              help="deploy.yaml to read (default: ./deploy.yaml when present); its search: section holds these flags")
@click.option("--model", type=click.Path(path_type=str), help="Ultralytics .pt checkpoint or .yaml model")
@click.option("--data", type=click.Path(path_type=str), help="Ultralytics data YAML (labelled: trials are scored by mAP)")
@click.option("--target", help="target name, see `deploy targets`")
@click.option("--profile", help="device profile of the target, e.g. raspberry-pi-5")
@click.option("--imgsz", type=int, help="the baseline's input size (default: the profile's or the checkpoint's)")
@click.option("--output", type=click.Path(path_type=str),
              help="where the search's records (OUTPUT/search) and a picked bundle go (default: dist)")
@click.option("--max-map-drop", type=float, help="mAP50-95 points a trial may lose against the baseline (default 1.0)")
@click.option("--sizes", help="input sizes to try, e.g. 96,128,160 (multiples of the model's stride)")
@click.option("--size-range", nargs=2, type=int, help="smallest and largest input size: every stride multiple between")
@click.option("--prune-ratios", help="prune ratios to try, e.g. 0,0.25,0.5 (0: unpruned)")
@click.option("--prune-criteria", help="pruning criteria to try, e.g. bn_scale,l1")
@click.option("--precisions", help="precisions to try (default: every precision the target supports)")
@click.option("--quant-methods", help="INT8 range methods to try, e.g. auto or minmax,percentile")
@click.option("--epochs", help="fine-tune epochs per fidelity rung, cheapest first, e.g. 1,4,12")
@click.option("--eta", type=int, help="successive halving: about 1 in eta trials of a rung goes on (default 3)")
@click.option("--max-trials", type=int, help="trials (builds) the search may use, including those on record")
@click.option("--time-budget", type=float, help="seconds after which no new trial starts")
@click.option("--workers", type=int, help="trials at once (default: 1 when trials are timed on this machine, "
                                          "else CPUs / --cpus-per-trial)")
@click.option("--cpus-per-trial", type=int, help="CPUs each trial declares to Ray and keeps to (default: the "
                                                 "cores shared among the trials at once; 1 on a cluster)")
@click.option("--ray-address", help="join this Ray cluster (host:port) instead of starting a local instance")
@click.option("--pick", type=click.Choice(["none", "best-under-budget"]),
              help="best-under-budget publishes the fastest trial within --max-map-drop as a bundle")
@click.option("--accept-drop", is_flag=True, default=None,
              help="exit 0 when no trial is within the budget (and --pick publishes the least lossy one)")
@click.option("--calib", type=click.Path(path_type=str), help="calibration image folder, data YAML or video")
@click.option("--calib-size", type=int, help="number of calibration images")
@click.option("--min-sqnr", type=float, help="lowest output SQNR (dB) of a quantized artifact (default 15)")
@click.option("--runs", type=int, help="timed probe runs per trial (at least 50)")
@click.option("--device", help="time every trial on this device from devices.yaml (one trial at a time there)")
@click.option("--inventory", type=click.Path(path_type=str), help="device inventory (default: ./devices.yaml)")
@click.option("--print-config", is_flag=True, help="print the resolved config as YAML and exit")
@click.option("--json", "as_json", is_flag=True, help="print only the machine-readable summary")
def search(config_path, model, data, target, profile, imgsz, output, max_map_drop, sizes, size_range, prune_ratios,
           prune_criteria, precisions, quant_methods, epochs, eta, max_trials, time_budget, workers, cpus_per_trial,
           ray_address, pick, accept_drop, calib, calib_size, min_sqnr, runs, device, inventory, print_config,
           as_json):
    """Search prune ratio, precision and input size for the Pareto front of latency against mAP (on Ray)."""
    from edge_deploy.pipeline.config import dump_config, load_config

    if config_path is None and DEFAULT_CONFIG.exists():
        config_path = DEFAULT_CONFIG
    config = load_config(config_path, {
        "model": model, "data": data, "target": target, "profile": profile, "imgsz": imgsz, "output": output,
        "calibration.source": calib, "calibration.size": calib_size, "quantize.min_sqnr_db": min_sqnr,
        "probe.runs": runs, "probe.device": device, "probe.inventory": inventory,
        "search.max_map_drop": max_map_drop, "search.imgsz": _listed(sizes, int, "--sizes"),
        "search.imgsz_range": list(size_range) if size_range else None,
        "search.prune_ratios": _listed(prune_ratios, float, "--prune-ratios"),
        "search.prune_criteria": _listed(prune_criteria, str, "--prune-criteria"),
        "search.precisions": _listed(precisions, str, "--precisions"),
        "search.quant_methods": _listed(quant_methods, str, "--quant-methods"),
        "search.epochs": _listed(epochs, int, "--epochs"), "search.eta": eta, "search.max_trials": max_trials,
        "search.time_budget_s": time_budget, "search.workers": workers, "search.cpus_per_trial": cpus_per_trial,
        "search.ray_address": ray_address, "search.pick": pick, "search.accept_drop": accept_drop,
    })
    if print_config:
        click.echo(dump_config(config), nl=False)
        return
    from edge_deploy.pipeline.search import budget_error, front_row, FRONT_COLUMNS, publish_pick, run_search

    started = time.monotonic()

    def on_event(what: str, event: str) -> None:
        if not as_json:
            click.echo(f"[{time.monotonic() - started:7.1f} s] {what}: {event}")

    result = run_search(config, home_dir(), on_event)
    settings = result.plan.config.search
    unmet = result.best is None
    if settings.pick == "best-under-budget" and (not unmet or settings.accept_drop):
        publish_pick(result, home_dir())
    if as_json:
        from edge_deploy.pipeline.search import search_record

        click.echo(json.dumps({**search_record(result), "record": str(result.record_path),
                               "picked": str(result.picked) if result.picked else None}, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        b = result.baseline
        table = Table(*FRONT_COLUMNS, title=f"Pareto front ({result.plan.target_name}): baseline {b.spec.label()} "
                                            f"mAP50-95 {b.map50_95:.4f}, p50 {b.p50_ms:.2f} ms")
        for trial in result.front:
            table.add_row(*front_row(trial), style="bold" if trial is result.best else None)
        console = Console(highlight=False)
        if not console.is_terminal:
            console.width = 140  # a log keeps each row on one line
        console.print(table)
        click.echo(f"{len(result.trials)} trials ({result.executed} run, {result.reused} on record) in "
                   f"{result.seconds:.0f} s{'; stopped by ' + result.stopped_by if result.stopped_by else ''}; "
                   f"record: {result.record_path}, front: {result.table_path}, plot: {result.plot_path}")
        failed = [t for t in result.trials if t.status == "failed"]
        if failed:
            click.echo(f"{len(failed)} trial(s) failed (their errors are in the record): "
                       + "; ".join(f"{t.spec.label()}: {t.error}" for t in failed[:3]))
        if result.best:
            click.echo(f"fastest within {settings.max_map_drop:.2f} points: {result.best.spec.label()} "
                       f"({result.best.drop_points:.2f} points, p50 {result.best.p50_ms:.2f} ms)")
        if result.picked:
            click.echo(f"published: {result.picked}")
    if unmet and not settings.accept_drop:
        raise budget_error(result)


@main.command()
@click.option("--json", "as_json", is_flag=True, help="print the targets' declared capabilities as JSON")
def targets(as_json):
    """List targets, their precisions and profiles (imports no toolchain)."""
    from rich.console import Console
    from rich.table import Table

    from edge_deploy.targets import TARGETS, load_target

    if as_json:
        click.echo(json.dumps({name: {**load_target(name).capabilities(), "profiles": [
            {"name": p.name, "threads": p.threads, "imgsz": p.imgsz, "description": p.description, "facts": p.facts}
            for p in load_target(name).profiles]} for name in sorted(TARGETS)}, indent=1))
        return
    table = Table("target", "toolchain", "precisions", "INT8", "layout", "profiles", "description")
    for name in sorted(TARGETS):
        t = load_target(name)
        profiles = "\n".join(f"{p.name}: threads {p.threads or 'every core'}, imgsz {p.imgsz or 'model'}"
                              + "".join(f", {k} {v}" for k, v in p.facts.items())
                              + (" (default)" if p.name == t.default_profile else "") for p in t.profiles)
        rules = t.quant_rules
        int8 = f"{rules.name}: {', '.join(rules.methods)}" if rules else "none"
        table.add_row(name, ", ".join(t.toolchain), ", ".join(t.precisions), int8, t.input_layout, profiles,
                      t.description)
    Console().print(table)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--device", "devices", multiple=True, required=True,
              help="device name from devices.yaml (repeat for several; they run concurrently)")
@click.option("--inventory", type=click.Path(path_type=Path), help="device inventory (default: ./devices.yaml)")
@click.option("--runs", type=click.IntRange(50, 100_000), default=100, show_default=True, help="timed runs")
@click.option("--warmup", type=click.IntRange(0, 10_000), default=10, show_default=True, help="untimed runs first")
@click.option("--threads", type=click.IntRange(1, 256), help="runtime threads on the device (default: runtime's)")
@click.option("--image", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="image the probe runs on (default: a generated one; latency does not depend on content)")
@click.option("--timeout", type=click.FloatRange(1, 86_400), help="seconds a job may run (default: per device)")
@click.option("--against", type=click.Path(path_type=Path),
              help="another bundle of the same model, target and input size (FP32, or e.g. FP16 on a Jetson), "
                   "timed in turns with BUNDLE in each device's job: the speed-up over it on that device")
@click.option("--json", "as_json", is_flag=True, help="print the results as JSON")
def bench(bundle, devices, inventory, runs, warmup, threads, image, timeout, against, as_json):
    """Run a bundle's probe on devices; every result is kept in the results store as it arrives."""
    import asyncio

    from edge_deploy.pipeline.bench import bench_devices, exit_code, outcome_line, outcomes_json
    from edge_deploy.pipeline.resultstore import default_store
    from edge_deploy.targets.transports.inventory import Inventory

    names = list(dict.fromkeys(devices))  # one job per device, however often it is named
    loaded = Inventory.load(inventory)
    for name in names:
        loaded.get(name)
    store = default_store(home_dir())
    console = _stderr_console()
    progress = _DeviceProgress(console, names, quiet=as_json)
    with progress:
        outcomes = asyncio.run(bench_devices(bundle, names, loaded, home_dir(), store, runs, warmup, threads, image,
                                             timeout, progress.update, against))
    if as_json:
        click.echo(json.dumps(outcomes_json(outcomes), indent=1))
    else:
        for outcome in outcomes:
            click.echo(outcome_line(outcome))
    code = exit_code(outcomes)
    if code:
        failed = [o.device for o in outcomes if o.error]
        click.echo(f"error: {len(failed)} of {len(outcomes)} devices failed ({', '.join(failed)}); results that "
                   f"arrived are in {store.path}", err=True)
        sys.exit(code)


class _DeviceProgress:
    """One line per device while jobs run: a live table on a terminal, a timestamped line per phase otherwise."""

    def __init__(self, console, names: list[str], quiet: bool):
        self.console, self.quiet, self.started = console, quiet, time.monotonic()
        self.phases = {name: "queued" for name in names}
        self.live = None

    def _table(self):
        from rich.table import Table

        table = Table("device", "phase", box=None)
        for name, phase in self.phases.items():
            table.add_row(name, phase)
        return table

    def __enter__(self):
        if not self.quiet and self.console.is_terminal:
            from rich.live import Live

            self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=True)
            self.live.start()
        return self

    def update(self, name: str, phase: str) -> None:
        self.phases[name] = phase
        if self.quiet:
            return
        if self.live is not None:
            self.live.update(self._table())
        else:
            click.echo(f"[{time.monotonic() - self.started:7.1f} s] {name}: {phase}", err=True)

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.stop()
        return False


@main.command()
@click.option("--inventory", type=click.Path(path_type=Path), help="device inventory (default: ./devices.yaml)")
@click.option("--no-check", is_flag=True, help="list only; do not contact the devices")
@click.option("--json", "as_json", is_flag=True, help="print the devices and their state as JSON")
def devices(inventory, no_check, as_json):
    """List the inventory's devices and check that each answers (its runtime versions)."""
    import asyncio

    from edge_deploy.targets.transports.inventory import Inventory, check_devices

    loaded = Inventory.load(inventory)
    states = {} if no_check else asyncio.run(check_devices(loaded))
    rows = [{"device": name, "transport": d.transport, "where": d.where(), "target": d.target,
             "profile": d.profile, "power_sensor": d.power_sensor, **({"state": states[name]} if states else {})}
            for name, d in loaded.devices.items()]
    if as_json:
        click.echo(json.dumps(rows, indent=1))
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("device", "transport", "where", "target", "profile", *(["state"] if states else []),
                      caption=f"from {loaded.source}")
        for row in rows:
            state = row.get("state")
            cells = [row["device"], row["transport"], str(row["where"]), row["target"] or "any",
                     row["profile"] or "-"]
            if state is not None:
                cells.append(state["summary"])
            table.add_row(*cells)
        Console().print(table)
    if states and any(not s["ok"] for s in states.values()):
        sys.exit(6)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--version", "version", required=True, help="the release's version, e.g. 1.2.0")
@click.option("--output", type=click.Path(path_type=Path), default=Path("releases"), show_default=True,
              help="folder the archive is written to")
@click.option("--sign-key", type=click.Path(path_type=Path),
              help="Ed25519 private key (OpenSSH or PEM, unencrypted) to sign the manifest with")
def release(bundle, version, output, sign_key):
    """Pack a published bundle as name-version-target-precision.tar.gz (reproducible, optionally signed)."""
    from edge_deploy.pipeline.archive import release as make_release
    from edge_deploy.pipeline.userfiles import check_writable_folder

    check_writable_folder(output, "release folder")
    archive = make_release(bundle, version, output, sign_key)
    click.echo(f"released {archive}{' (signed)' if sign_key else ''}")


@main.command()
@click.argument("archive", type=click.Path(path_type=Path))
@click.option("--public-key", type=click.Path(path_type=Path),
              help="Ed25519 public key the manifest's signature must match")
@click.option("--json", "as_json", is_flag=True, help="print the outcome as JSON")
def verify(archive, public_key, as_json):
    """Check a release archive: safe to extract, every file's sha256, and its signature when a key is given."""
    from edge_deploy.pipeline.archive import verify as verify_archive

    outcome = verify_archive(archive, public_key)
    if as_json:
        click.echo(json.dumps(outcome, indent=1))
    else:
        signature = {"valid": ", signature valid", "not checked": ", signed (pass --public-key to check it)"
                     if outcome["signed"] else ", unsigned"}[outcome["signature"]]
        click.echo(f"ok: {outcome['files']} files of {outcome['bundle']} match their sha256{signature}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def check(bundle):
    """Re-hash every file of a bundle against its manifest."""
    from edge_deploy.pipeline.stages.release import check_bundle

    manifest = check_bundle(bundle)
    click.echo(f"ok: {len(manifest['files'])} files match {bundle}/manifest.json")


@main.command()
@click.option("--device", help="only this device (its inventory name)")
@click.option("--artifact", "artifact_prefix", metavar="SHA_PREFIX", help="only artifacts whose sha256 starts so")
@click.option("--bundle", help="only this bundle name, e.g. yolov8n-160-cpu-int8")
@click.option("--json", "as_json", is_flag=True, help="print the stored results (whole probe results) as JSON")
def results(device, artifact_prefix, bundle, as_json):
    """List stored probe results per device over time, each p50 against the same bundle's previous one."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from edge_deploy.pipeline.resultstore import default_store, p50_changes

    store = default_store(home_dir())
    shown = store.query(device=device, artifact=artifact_prefix, bundle=bundle)
    failed = store.failures(device=device, artifact=artifact_prefix, bundle=bundle)
    # The change is against the previous result of the same device and bundle, whichever artifact that was:
    # filtering by artifact must not hide last week's build from this week's.
    history = store.query(device=device, bundle=bundle) if artifact_prefix else shown
    changes = p50_changes(history)
    if as_json:
        click.echo(json.dumps({"store": str(store.path),
                               "results": [{**r.to_json(), "p50_change_percent": changes.get(r.id)} for r in shown],
                               "failures": [f.to_json() for f in failed]}, indent=1))
        return
    if not shown and not failed:
        asked = " ".join(f"--{name} {value}" for name, value in
                         (("device", device), ("artifact", artifact_prefix), ("bundle", bundle)) if value)
        click.echo(f"no stored probe results match {asked} in {store.path}" if asked
                   else f"no probe results stored yet in {store.path}")
        return

    def when(text: str) -> str:
        return text.replace("T", " ").removesuffix("Z")

    def figure(value, digits: int) -> str:
        return "not reported" if value is None else f"{value:.{digits}f}"

    def change(result) -> str:
        if result.p50_ms is None:
            return "not reported"
        percent = changes.get(result.id)
        return "first" if percent is None else f"{percent:+.1f} %"

    console = Console(highlight=False)
    for name in sorted({r.device for r in shown} | {f.device for f in failed}):
        mine = [r for r in shown if r.device == name]
        if mine:
            table = Table("when (UTC)", "bundle", "artifact", "runtime", "p50 ms", "p90 ms", "FPS", "power",
                          "p50 vs previous", title=escape(name))
            for r in mine:
                label = (r.bundle or r.artifact_label) + ("" if r.role == "artifact" else f" ({r.role})")
                table.add_row(when(r.when), escape(label), r.artifact_sha256[:12], escape(r.runtime or "not reported"),
                              figure(r.p50_ms, 2), figure(r.p90_ms, 2), figure(r.fps, 1), r.power_text(), change(r))
            console.print(table)
        lost = [f for f in failed if f.device == name]
        if lost:
            table = Table("when (UTC)", "bundle", "artifact", "error", title=escape(f"{name}: failed attempts"))
            for f in lost:
                table.add_row(when(f.recorded_at), escape(f.bundle or ""), f.artifact_sha256[:12], escape(f.error))
            console.print(table)
