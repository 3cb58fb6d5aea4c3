"""Test hook: faults a test asks for through the environment, injected into a real run.

    SUPERCLUSTER_FAULT_EXIT="RANK:STEP:MARKER"  RANK dies when it reaches STEP, once (the
        marker file records that it did), as a crashed node would: no cleanup, no message.
    SUPERCLUSTER_FAULT_SLOW="RANK:SECONDS"      RANK is that much slower every step, as a
        throttled device would, so that straggler detection can be seen to work.

Neither is set in normal use; the trainer calls `before_step` and `after_step` and knows
nothing else about them.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


class Faults:
    def __init__(self, rank: int, environ=os.environ):
        self.rank = rank
        self.exit_at = None
        if spec := environ.get("SUPERCLUSTER_FAULT_EXIT"):
            fault_rank, fault_step, marker = spec.split(":", 2)
            if int(fault_rank) == rank:
                self.exit_at = (int(fault_step), Path(marker))
        self.delay = 0.0
        if spec := environ.get("SUPERCLUSTER_FAULT_SLOW"):
            slow_rank, seconds = spec.split(":")
            self.delay = float(seconds) if int(slow_rank) == rank else 0.0

    def before_step(self, step: int) -> None:
        if self.exit_at is not None and step == self.exit_at[0] and not self.exit_at[1].exists():
            self.exit_at[1].write_text(f"rank {self.rank} exited at step {step}\n")
            os._exit(17)

    def after_step(self) -> None:
        """Inside the step's timing, before the collectives that would line the ranks up."""
        if self.delay:
            time.sleep(self.delay)
