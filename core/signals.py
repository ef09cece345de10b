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
