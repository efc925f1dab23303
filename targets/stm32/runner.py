"""The stm32 target's device runner is the board's firmware, not this script.

A microcontroller runs no Python: the model is compiled into the firmware
(model_data.cc, kTensorArenaSize from model_data.h), and the serial transport
(targets/transports/serial.py) sends the board one job line naming the sha256
of model.tflite and this RUNNER_VERSION. The firmware answers
`RESULT <nonce> {json}` with at least `model_sha256` (of the model it was built
from), `runner_version` (this number), `runtime` (e.g. "tflite-micro <commit>")
and `latency_ms` (its p50/p90/... over the job's `runs` after `warmup`);
`memory_mb`, `power` and `arena_used_bytes` when it knows them. The bundle's
firmware/serial_probe.c is that firmware side (targets/stm32/serial_probe.py).

This file exists so that a job has a runner to hash and version like every
other target's. Run anywhere else (the local transport, SSH, ...), it says so
and exits with launch.py's "runtime missing" code.
"""

from __future__ import annotations

import sys

RUNNER_VERSION = 1
EXIT_NO_RUNTIME = 69

if __name__ == "__main__":
    print("error: an stm32 artifact runs inside the board's firmware; probe it with a serial device "
          "(devices.yaml: transport: serial)", file=sys.stderr)
    sys.exit(EXIT_NO_RUNTIME)
