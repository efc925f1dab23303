"""The `deploy` command. The one place where errors become a message and an exit code."""

from __future__ import annotations

import json
import os
import sys
import traceback
import warnings
from pathlib import Path

import click

from edge_deploy.pipeline.errors import DeployError

DEFAULT_CONFIG = Path("deploy.yaml")


def home_dir() -> Path:
    """Where caches, generated data and Ultralytics' config live: DEPLOY_HOME, else ./.deploy."""
    return Path(os.environ.get("DEPLOY_HOME", ".deploy"))


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


class DeployGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DeployError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was published", err=True)
            sys.exit(130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except Exception as exc:  # a bug of ours: still one line, with a way to see more
            if os.environ.get("DEPLOY_DEBUG"):
                traceback.print_exc()
            click.echo(f"internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                       "(set DEPLOY_DEBUG=1 for the traceback)", err=True)
            sys.exit(70)


@click.group(cls=DeployGroup)
@click.version_option(package_name="edge-deploy")
def main():
    """Prune, export, quantize, compile, verify and probe YOLO detectors for edge targets."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="deploy.yaml to read (default: ./deploy.yaml when present)")
@click.option("--model", type=click.Path(path_type=Path), help="Ultralytics .pt checkpoint or .yaml model")
@click.option("--data", type=click.Path(path_type=Path), help="Ultralytics data YAML (val split is evaluated)")
@click.option("--target", help="target name, see `deploy targets`")
@click.option("--profile", help="device profile of the target, e.g. raspberry-pi-5 (sets probe threads)")
@click.option("--precision", help="fp32, int8, w4a8 (INT4 weights, INT8 activations) or int4 (weight-only)")
@click.option("--imgsz", type=int, help="input size (default: the checkpoint's training size)")
@click.option("--output", type=click.Path(path_type=Path), help="where bundles are published (default: dist)")
@click.option("--prune", "prune_ratio", type=float, help="share of channels to prune, e.g. 0.5 (structured)")
@click.option("--prune-criterion", help="l1, l2, bn_scale, taylor, fpgm, lamp or random")
@click.option("--prune-steps", type=int, help="pruning steps, each followed by fine-tuning")
@click.option("--prune-epochs", type=int, help="fine-tuning epochs after each pruning step (default 12)")
@click.option("--calib", type=click.Path(path_type=Path), help="calibration image folder, data YAML or video")
@click.option("--calib-size", type=int, help="number of calibration images")
@click.option("--quant-method", help="auto (default: try every method the target accepts, keep the best), minmax, entropy or percentile")
@click.option("--symmetric", is_flag=True, default=None, help="symmetric INT8 activations (zero point 0)")
@click.option("--max-map-drop", type=float, help="mAP50-95 points the build may lose against FP32 (default: 0.5 for int8, 2.0 for w4a8/int4, 0.1 for fp16)")
@click.option("--accept-drop", is_flag=True, default=None,
              help="ship the best INT8 model even when it misses --max-map-drop")
@click.option("--runs", type=int, help="timed probe runs (at least 50)")
@click.option("--threads", type=int, help="runtime threads for the probe")
@click.option("--no-cache", is_flag=True, help="run every stage even when a cached result exists")
@click.option("--print-config", is_flag=True, help="print the resolved config as YAML and exit")
@click.option("--json", "as_json", is_flag=True, help="print only the machine-readable summary")
def build(config_path, model, data, target, profile, precision, imgsz, output, prune_ratio, prune_criterion, prune_steps,
          prune_epochs, calib, calib_size, quant_method, symmetric,
          max_map_drop, accept_drop, runs, threads, no_cache, print_config, as_json):
    """Build a deployable bundle (default: the embedded YOLOv8n for the cpu target)."""
    from edge_deploy.pipeline.config import dump_config, load_config

    if config_path is None and DEFAULT_CONFIG.exists():
        config_path = DEFAULT_CONFIG
    config = load_config(config_path, {
        "model": model, "data": data, "target": target, "profile": profile, "precision": precision, "imgsz": imgsz,
        "output": output, "prune.ratio": prune_ratio, "prune.criterion": prune_criterion,
        "prune.steps": prune_steps, "prune.epochs": prune_epochs, "calibration.source": calib, "calibration.size": calib_size,
        "quantize.method": quant_method, "quantize.symmetric": symmetric, "quantize.max_map_drop": max_map_drop,
        "quantize.on_budget_exceeded": "continue" if accept_drop else None, "probe.runs": runs,
        "probe.threads": threads,
    })
    if print_config:
        click.echo(dump_config(config), nl=False)
        return
    console = _stderr_console()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        console.print(f"[yellow]warning:[/] {message}")

    warnings.showwarning = show_warning
    from edge_deploy.pipeline.build import run_build

    status = None

    def on_event(stage: str, event: str) -> None:
        nonlocal status
        if as_json:
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
            {"name": p.name, "threads": p.threads, "imgsz": p.imgsz, "description": p.description}
            for p in load_target(name).profiles]} for name in sorted(TARGETS)}, indent=1))
        return
    table = Table("target", "toolchain", "precisions", "INT8", "layout", "profiles", "description")
    for name in sorted(TARGETS):
        t = load_target(name)
        profiles = "\n".join(f"{p.name}: threads {p.threads or 'default'}, imgsz {p.imgsz or 'model'}"
                              for p in t.profiles)
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
