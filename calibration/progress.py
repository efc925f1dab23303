"""Progress lines for the long parts of an INT8 build (calibrating, ranking units), whichever backend runs them."""

from __future__ import annotations

import sys
import time
from typing import Callable


class Progress:
    """'calibrating: image 40/200 (35 s)' lines through `say`: the quantize stage's progress channel, which the CLI
    prints beside the stage's own lines, so a build whose output goes to a log is not silent through the long parts
    of an INT8 build. Without a channel (a benchmark, a test) the lines go to stderr, prefixed 'quantize:'.
    About ten lines per task, and one at least every EVERY_SECONDS."""

    EVERY_SECONDS = 30.0

    def __init__(self, label: str, total: int | None, say: Callable[[str], None] | None = None):
        self.label, self.total = label, total
        self.say = say or (lambda text: print(f"quantize: {text}", file=sys.stderr, flush=True))
        self.done = 0
        self.started = self.last = time.monotonic()

    def step(self) -> None:
        now = time.monotonic()
        self.done += 1
        every = max(1, -(-self.total // 10)) if self.total else 20
        if self.done % every == 0 or self.done == self.total or now - self.last >= self.EVERY_SECONDS:
            self.last = now
            of = f"/{self.total}" if self.total else ""
            self.say(f"{self.label} {self.done}{of} ({now - self.started:.0f} s)")
