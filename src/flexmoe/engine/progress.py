"""Progress display: a live rich view on a terminal, plain log lines otherwise (or --quiet).

`logs_to(progress)` shows flexmoe's own log records (loading, partition, truncation, skipped
rows, failures) through the same display, so a long step never runs silently.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager


class Progress:
    """Silent progress (library use and tests); subclasses display it."""

    def start(self, rounds: int, first_round: int) -> None: ...
    def round_started(self, round_index: int, clients: list[int]) -> None: ...
    def client_started(self, client_id: int, steps: int) -> None: ...
    def step(self, step: int, steps: int, loss: float) -> None: ...
    def client_done(self, client_id: int, loss: float) -> None: ...
    def message(self, text: str) -> None: ...
    def close(self) -> None: ...


class LogProgress(Progress):
    """One line per client and per round, with elapsed time and a round-based ETA."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.t0 = self.round_t0 = time.monotonic()
        self.rounds = self.first = self.round = 0

    def start(self, rounds: int, first_round: int) -> None:
        self.rounds, self.first, self.round_t0 = rounds, first_round, time.monotonic()

    def round_started(self, round_index: int, clients: list[int]) -> None:
        self.round = round_index
        self._print(f"round {round_index}/{self.rounds}: clients {clients}{self._eta()}")

    def client_done(self, client_id: int, loss: float) -> None:
        self._print(f"round {self.round}/{self.rounds}: client {client_id} trained, loss {loss:.4f}")

    def message(self, text: str) -> None:
        self._print(text)

    def _eta(self) -> str:
        done = self.round - self.first
        if done <= 0:
            return ""
        elapsed = time.monotonic() - self.round_t0
        return f" (eta {elapsed / done * (self.rounds - self.round + 1):.0f}s)"

    def _print(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:7.1f}s] {text}", file=self.stream, flush=True)


class RichProgress(Progress):
    """Live bars: rounds (with ETA) and the current client's local steps (with loss)."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.progress import Progress as Bars

        self.console = Console(stderr=True)
        self.bars = Bars(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.rounds_task = self.client_task = None

    def start(self, rounds: int, first_round: int) -> None:
        self.bars.start()
        self.rounds_task = self.bars.add_task("rounds", total=rounds, completed=first_round - 1, info="")
        self.client_task = self.bars.add_task("client", total=1, info="")

    def round_started(self, round_index: int, clients: list[int]) -> None:
        self.bars.update(self.rounds_task, completed=round_index - 1, info=f"round {round_index}: clients {clients}")

    def client_started(self, client_id: int, steps: int) -> None:
        self.bars.reset(self.client_task, total=steps, description=f"client {client_id}", info="")

    def step(self, step: int, steps: int, loss: float) -> None:
        self.bars.update(self.client_task, completed=step, info=f"loss {loss:.4f}")

    def message(self, text: str) -> None:
        self.console.log(text)

    def close(self) -> None:
        if self.rounds_task is not None:
            self.bars.update(self.rounds_task, completed=self.bars.tasks[self.rounds_task].total)
        self.bars.stop()


def make_progress(quiet: bool) -> Progress:
    return LogProgress() if quiet or not sys.stderr.isatty() else RichProgress()


class _ProgressHandler(logging.Handler):
    def __init__(self, progress: Progress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress.message(record.getMessage())
        except Exception:  # a display problem must never stop a run
            self.handleError(record)


@contextmanager
def logs_to(progress: Progress):
    """Route the `flexmoe` loggers' records of INFO and above to `progress` while inside."""
    logger = logging.getLogger("flexmoe")
    handler, level = _ProgressHandler(progress), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield progress
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
