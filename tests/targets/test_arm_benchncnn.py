from pathlib import Path

import pytest

from edge_deploy.pipeline.errors import InputError
from edge_deploy.targets.arm.benchncnn import parse_benchncnn

SAMPLES = Path(__file__).parents[1] / "samples" / "benchncnn"


def test_raspberry_pi_sample():
    parsed = parse_benchncnn((SAMPLES / "rpi3b-plus.txt").read_text())
    assert parsed["settings"] == {"loop_count": 8, "num_threads": 4, "powersave": 0, "gpu_device": -1,
                                  "cooling_down": 1}
    assert parsed["models"]["squeezenet"] == {"min_ms": 93.77, "max_ms": 94.78, "avg_ms": 94.25}
    assert parsed["models"]["resnet18_int8"]["avg_ms"] == 166.53
    assert "pi@raspberrypi:~/ncnn/build/benchmark" not in parsed["models"]


def test_text_without_results_is_refused():
    with pytest.raises(InputError, match="no benchncnn result lines"):
        parse_benchncnn("loop_count = 4\nsegmentation fault\n")
