"""edge-deploy's public Python API, beside the `deploy` command.

    import edge_deploy
    result = edge_deploy.build(target="arm", precision="int8", prune={"ratio": 0.5})
    print(result.bundle, result.accuracy.drop_points, result.speed.speedup_p50)

The framework lives in `edge_deploy.pipeline`, the targets in
`edge_deploy.targets`, calibration and quantization in
`edge_deploy.calibration`; the source tree keeps them as the top-level folders
pipeline/, targets/ and calibration/.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["build", "target_capabilities", "BuildConfig", "BuildResult"]


def __getattr__(name: str):
    # Imported on first use so that `import edge_deploy` stays cheap.
    if name == "BuildConfig":
        from edge_deploy.pipeline.config import BuildConfig

        return BuildConfig
    if name == "BuildResult":
        from edge_deploy.pipeline.build import BuildResult

        return BuildResult
    raise AttributeError(name)


def build(config=None, *, home: str | os.PathLike | None = None, use_cache: bool = True, **settings):
    """Runs a build like `deploy build` and returns its typed result.

    `config` is a BuildConfig or a path to a deploy.yaml; keyword settings
    (the config's keys, sections as dicts) override it. Errors are raised as
    `edge_deploy.pipeline.errors.DeployError` subclasses.
    """
    from edge_deploy.pipeline.build import run_build
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
    resolved = validate(base, "edge_deploy.build()")
    home = Path(home if home is not None else os.environ.get("DEPLOY_HOME", ".deploy"))
    return run_build(resolved, home, use_cache=use_cache)


def target_capabilities() -> dict[str, dict]:
    """Every registered target's declared capabilities (imports no toolchain)."""
    from edge_deploy.targets import TARGETS, load_target

    return {name: load_target(name).capabilities() for name in sorted(TARGETS)}
