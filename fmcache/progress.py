"""Progress display for long work."""

from __future__ import annotations

import time


class progress_bar:
    """Rich progress with throughput (items/s) and ETA; a no-op when disabled (other ranks, --quiet).

    ``with progress_bar(enabled, total, title, verb) as advance: advance(n)``.
    """

    def __init__(self, enabled: bool, total: int, title: str, verb: str = "extract", unit: str = "img/s"):
        self.enabled, self.total, self.title, self.verb, self.unit = enabled and total > 0, total, title, verb, unit

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(
            TextColumn(f"[bold]{self.verb}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} " + self.unit),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self.bar.start()
        self.task = self.bar.add_task(self.title, total=self.total, rate="-")
        self.t0 = time.perf_counter()
        self.done = 0

        def advance(n: int) -> None:
            self.done += n
            rate = self.done / max(time.perf_counter() - self.t0, 1e-9)
            self.bar.update(self.task, advance=n, rate=f"{rate:.1f}")

        return advance

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.bar.stop()
