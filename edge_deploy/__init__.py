"""edge-deploy's public Python API, beside the `deploy` command.

    import edge_deploy
    result = edge_deploy.build(target="arm", precision="int8", prune={"ratio": 0.5})
    print(result.bundle, result.accuracy.drop_points, result.speed.speedup_p50)

    found = edge_deploy.search(target="cpu", search={"max_map_drop": 1.0, "max_trials": 8})
    print(found.best.spec.label(), found.best.p50_ms, [t.spec.label() for t in found.front])

The framework lives in `edge_deploy.pipeline`, the targets in
`edge_deploy.targets`, calibration and quantization in
`edge_deploy.calibration`; the source tree keeps them as the top-level folders
pipeline/, targets/ and calibration/.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["build", "search", "target_capabilities", "BuildConfig", "BuildResult", "SearchResult"]


def __getattr__(name: str):
    # Imported on first use so that `import edge_deploy` stays cheap.
    if name == "BuildConfig":
        from edge_deploy.pipeline.config import BuildConfig

        return BuildConfig
    if name == "BuildResult":
        from edge_deploy.pipeline.build import BuildResult

        return BuildResult
    if name == "SearchResult":
        from edge_deploy.pipeline.search import SearchResult

        return SearchResult
    raise AttributeError(name)


def build(config=None, *, home: str | os.PathLike | None = None, use_cache: bool = True, **settings):
    """Runs a build like `deploy build` and returns its typed result.

    `config` is a BuildConfig or a path to a deploy.yaml; keyword settings
    (the config's keys, sections as dicts) override it. Errors are raised as
    `edge_deploy.pipeline.errors.DeployError` subclasses.
    """
    from edge_deploy.pipeline.build import run_build

    resolved = _resolved(config, settings, "edge_deploy.build()")
    return run_build(resolved, _home(home), use_cache=use_cache)


def search(config=None, *, home: str | os.PathLike | None = None, **settings):
    """Runs a search like `deploy search` and returns its SearchResult (front, best, every trial).

    Settings as for build(); the search's own keys go in `search={...}` (max_map_drop, prune_ratios,
    precisions, imgsz, max_trials, time_budget_s, workers, ray_address, pick, accept_drop). With
    `pick="best-under-budget"` the fastest trial within the budget is published as a bundle
    (`result.picked`). A search with no trial within the budget raises AccuracyGateError unless
    `accept_drop` is set; then `result.best` is None and `result.best_found` is the least lossy trial.
    """
    from edge_deploy.pipeline.search import budget_error, publish_pick, run_search

    resolved = _resolved(config, settings, "edge_deploy.search()")
    home_dir = _home(home)
    result = run_search(resolved, home_dir)
    chosen = result.plan.config.search
    if chosen.pick == "best-under-budget" and (result.best is not None or chosen.accept_drop):
        publish_pick(result, home_dir)
    if result.best is None and not chosen.accept_drop:
        raise budget_error(result)
    return result


def _resolved(config, settings: dict, where: str):
    from edge_deploy.pipeline.config import load_config, validate

    if config is None or isinstance(config, (str, os.PathLike)):
        base = load_config(Path(config) if config is not None else None, {}).model_dump(mode="json")
    else:
        base = config.model_dump(mode="json")
    for key, value in settings.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return validate(base, where)


def _home(home) -> Path:
    return Path(home if home is not None else os.environ.get("DEPLOY_HOME", ".deploy"))


def target_capabilities() -> dict[str, dict]:
    """Every registered target's declared capabilities (imports no toolchain)."""
    from edge_deploy.targets import TARGETS, load_target

    return {name: load_target(name).capabilities() for name in sorted(TARGETS)}
