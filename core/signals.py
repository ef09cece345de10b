"""Stop requests: SIGTERM, SIGUSR1 and SIGINT (Ctrl-C) set a flag that a long job reads at its next
safe point (a step boundary, a finished batch of images), where it saves and stops cleanly. A
second Ctrl-C interrupts at once (``KeyboardInterrupt``). Handlers are installed from the main
thread only (Python's rule) and the previous ones are put back afterwards."""
from __future__ import annotations

import signal
import threading
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopSignals:
    """``install()`` ... ``restore()`` (or ``with StopSignals() as stop:``); ``received`` is the first
    stop signal's number, None while none came."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now
        self.received = signum

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread() and not self._previous:
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else ""

    def __enter__(self) -> "StopSignals":
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()


class StopBetweenSteps:
    """Outside the windows where a callback obeys stop signals at a safe point (before class images,
    while loading, after the final save), SIGTERM and SIGUSR1 raise ``exception(message)`` at once:
    nothing is half-written there (checkpoints are written atomically), so the job ends with one line
    instead of dying silently with status -15. The callbacks' own ``StopSignals`` take over while
    they run, and put this back afterwards. SIGINT keeps Python's KeyboardInterrupt."""

    def __init__(self, exception: type[BaseException], describe: Any):
        self.exception, self.describe = exception, describe  # describe(signal name) -> message
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        raise self.exception(self.describe(signal.Signals(signum).name))

    def __enter__(self) -> "StopBetweenSteps":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGUSR1)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
