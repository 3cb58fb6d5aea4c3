"""What a person watching a training run sees: a live bar on a terminal, a plain line every
few steps in a log (Slurm, CI). Rank 0 only; the numbers come from the step's metrics. Both go to
stderr, so that stdout holds only a command's result (`train --json` prints JSON alone)."""

from __future__ import annotations

import sys


class Progress:
    def __init__(self, enabled: bool, start: int, total: int):
        self.enabled, self.total, self.bar = enabled, total, None
        self.every = max(1, total // 20)
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self.bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[info]}"), console=Console(stderr=True))
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, m: dict):
        if not self.enabled:
            return
        info = f"loss {m['loss']:.3f}  {m['tokens_per_s']:,.0f} tok/s  MFU {100 * m['mfu']:.1f}%"
        if "val_loss" in m:
            info += f"  val {m['val_loss']:.3f}"
        if self.bar is not None:
            self.bar.update(self.task, completed=m["step"], info=info)
        elif m["step"] % self.every == 0 or m["step"] == self.total or "val_loss" in m:
            print(f"step {m['step']:>6}/{self.total}  {info}", file=sys.stderr, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()
