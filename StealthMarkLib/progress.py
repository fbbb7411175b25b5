"""Progress reporting and cancellation for long work.

A :class:`Progress` is handed to every long-running function. At a terminal it draws a bar (tqdm);
with ``--progress json`` it writes one JSON object per line to stdout for the Slicer module::

    {"event": "progress", "stage": "lime", "done": 120, "total": 1000, "message": "..."}

Cancellation is cooperative: :meth:`Progress.check` raises :class:`~StealthMarkLib.errors.Cancelled`
once :meth:`Progress.cancel` was called (the CLI calls it on SIGINT and SIGTERM).
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any, Callable, TextIO

from .errors import Cancelled


class Progress:
    """Silent base reporter: counts, checks for cancellation, prints nothing."""

    def __init__(self) -> None:
        self._cancel = threading.Event()
        self.stage: str | None = None
        self.total = 0
        self.done = 0

    # -- cancellation -------------------------------------------------------------------------
    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")

    # -- reporting ----------------------------------------------------------------------------
    def start(self, stage: str, total: int, message: str = "") -> None:
        self.check()
        self.stage, self.total, self.done = stage, int(total), 0
        self._emit_start(message)

    def advance(self, n: int = 1, message: str = "") -> None:
        self.check()
        self.done += int(n)
        self._emit_advance(n, message)

    def finish(self, message: str = "") -> None:
        self._emit_finish(message)
        self.stage = None

    def log(self, message: str, **fields: Any) -> None:
        """A line of information for the user (never secrets)."""

    def quiet(self) -> "Progress":
        """A silent reporter that shares this one's cancellation (for the other ranks of a distributed run)."""
        silent = Progress()
        silent._cancel = self._cancel
        return silent

    def callback(self) -> Callable[[int, int], None]:
        """A ``(done, total)`` callback for code that reports absolute counts (the LIME engine)."""

        def cb(done: int, total: int) -> None:
            # a new total, or a count that starts over (a second run), is a new start, not a step back
            if self.stage is None or total != self.total or done < self.done:
                self.start(self.stage or "work", total)
            self.advance(done - self.done)

        return cb

    def _emit_start(self, message: str) -> None:
        pass

    def _emit_advance(self, n: int, message: str) -> None:
        pass

    def _emit_finish(self, message: str) -> None:
        pass


class BarProgress(Progress):
    """A tqdm bar on stderr; log lines go to stderr too so stdout stays clean for results."""

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__()
        self.stream = stream or sys.stderr
        self._bar = None

    def _emit_start(self, message: str) -> None:
        from tqdm.auto import tqdm

        self._close()
        self._bar = tqdm(total=self.total, desc=self.stage, file=self.stream, leave=False,
                         dynamic_ncols=True, disable=None)

    def _emit_advance(self, n: int, message: str) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if message:
                self._bar.set_postfix_str(message, refresh=False)

    def _emit_finish(self, message: str) -> None:
        self._close()
        if message:
            self.log(message)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def log(self, message: str, **fields: Any) -> None:
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)


class JsonProgress(Progress):
    """One JSON object per line on ``stream`` (stdout by default), throttled to ~10 lines a second."""

    def __init__(self, stream: TextIO | None = None, min_interval: float = 0.1) -> None:
        super().__init__()
        self.stream = stream or sys.stdout
        self.min_interval = min_interval
        self._last = 0.0

    def emit(self, event: str, **fields: Any) -> None:
        rec = {"event": event, **fields}
        self.stream.write(json.dumps(rec, default=str) + "\n")
        self.stream.flush()

    def _emit_start(self, message: str) -> None:
        self.emit("start", stage=self.stage, total=self.total, message=message)
        self._last = time.monotonic()

    def _emit_advance(self, n: int, message: str) -> None:
        now = time.monotonic()
        if now - self._last >= self.min_interval or self.done >= self.total:
            self._last = now
            self.emit("progress", stage=self.stage, done=self.done, total=self.total, message=message)

    def _emit_finish(self, message: str) -> None:
        self.emit("finish", stage=self.stage, message=message)

    def log(self, message: str, **fields: Any) -> None:
        self.emit("log", message=message, **fields)


def make_progress(mode: str | None) -> Progress:
    """``"json"`` -> :class:`JsonProgress`, ``"bar"``/``None`` -> :class:`BarProgress`, ``"none"`` -> silent."""
    if mode == "json":
        return JsonProgress()
    if mode == "none":
        return Progress()
    return BarProgress()
