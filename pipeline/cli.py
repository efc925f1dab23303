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
            _fail("interrupted; nothing was published", 130)
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
@click.option("--no-cache", is_flag=True, help="run every stage even when a cached result exists")
@click.option("--print-config", is_flag=True, help="print the resolved config as YAML and exit")
@click.option("--json", "as_json", is_flag=True, help="print only the machine-readable summary")
def build(config_path, model, data, target, profile, precision, imgsz, output, prune_ratio, prune_criterion, prune_steps,
          prune_epochs, calib, calib_size, quant_method, symmetric,
          max_map_drop, min_sqnr, accept_drop, runs, threads, no_cache, print_config, as_json):
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
        "probe.threads": threads,
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
        elif status is not None:
            status.stop()
            status = None

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
        profiles = "\n".join(f"{p.name}: threads {p.threads or 'default'}, imgsz {p.imgsz or 'model'}"
                              + "".join(f", {k} {v}" for k, v in p.facts.items())
                              + (" (default)" if p.name == t.default_profile else "") for p in t.profiles)
        rules = t.quant_rules
        int8 = f"{rules.name}: {', '.join(rules.methods)}" if rules else "none"
        table.add_row(name, ", ".join(t.toolchain), ", ".join(t.precisions), int8, t.input_layout, profiles,
                      t.description)
    Console().print(table)


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
def check(bundle):
    """Re-hash every file of a bundle against its manifest."""
    from edge_deploy.pipeline.stages.release import check_bundle

    manifest = check_bundle(bundle)
    click.echo(f"ok: {len(manifest['files'])} files match {bundle}/manifest.json")
