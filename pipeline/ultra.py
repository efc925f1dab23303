"""Keeps Ultralytics off the network.

Ultralytics reads its config directory and offline flags once, at import time,
and reaches for the network for fonts, settings sync, weights and pip
installs. Every use of it in this project goes through `ultralytics_offline`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from edge_deploy.pipeline.errors import DeployError

_prepared: Path | None = None


def ultralytics_offline(home: Path):
    """Configures Ultralytics to work from `home` only and returns the `ultralytics` module."""
    global _prepared
    config_dir = (Path(home) / "ultralytics").resolve()
    if _prepared is None:
        if "ultralytics" in sys.modules and os.environ.get("YOLO_CONFIG_DIR") != str(config_dir):
            raise DeployError("ultralytics was imported before its offline configuration was applied")
        os.environ["YOLO_CONFIG_DIR"] = str(config_dir)
        os.environ["YOLO_OFFLINE"] = "1"
        os.environ["YOLO_AUTOINSTALL"] = "0"
        os.environ.setdefault("YOLO_VERBOSE", "0")
        _install_font(config_dir / "Ultralytics")
        _prepared = config_dir
    import ultralytics
    from ultralytics.utils import SETTINGS

    wanted = {
        "sync": False,
        "runs_dir": str(_prepared / "runs"),
        "datasets_dir": str(_prepared / "datasets"),
        "weights_dir": str(_prepared / "weights"),
    }
    if any(SETTINGS.get(k) != v for k, v in wanted.items()):
        SETTINGS.update(wanted)
    return ultralytics


def _install_font(folder: Path) -> None:
    # Loading any data set runs Ultralytics' font check, which downloads Arial
    # unless a file of that name is already in its config folder. Matplotlib
    # (an Ultralytics dependency) ships DejaVu Sans, which serves the same purpose.
    import matplotlib

    source = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        target = folder / name
        if not target.exists():
            tmp = target.with_suffix(".tmp")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
