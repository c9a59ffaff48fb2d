"""Stopping on request at any phase: SIGTERM (what schedulers, spot instances, the UI's Stop and
``kill`` send) stops a command as Ctrl-C does, within moments, wherever it is.

Python runs a signal handler between two bytecodes of the main thread, so raising from it stops
data preparation, an evaluation, PPO's sampling or a search trial within one batch's time: a
stop honoured only at the next training step would come after Kubernetes' SIGKILL, 30 s later,
when the base evaluation alone takes a minute. Two places must not be cut in half, and defer the
stop to their end instead:

- an optimizer update: the weights have changed and the loop's state not yet (``held``);
- a training loop over several processes, which must all stop at the same step: it polls
  ``is_set`` at step boundaries inside ``held``.

The bottom layer, beside ``errors``: the recipes, the loop and the CLI use it.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """Stopped on request (SIGTERM): the command ends as on Ctrl-C, its run ``interrupted``.

    ``at_boundary``: raised by a training loop at a step boundary that every process agreed on (so
    the processes may still exchange their random states for the checkpoint)."""

    def __init__(self, at_boundary: bool = False):
        super().__init__("stopped on request (SIGTERM)")
        self.at_boundary = at_boundary


class StopRequest:
    """Set by SIGTERM. Unless ``held``, the handler also raises ``Interrupted`` where the main thread is;
    within ``held`` the stop waits for its end. It raises once: a second SIGTERM, arriving while the
    first one's checkpoint is written, only sets it again."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._holds = 0
        self._raised = False

    def is_set(self) -> bool:
        return self._event.is_set()

    def set(self) -> None:
        """Ask for a stop without a signal (another thread, a test): acted on where code polls ``is_set``."""
        self._event.set()

    def hold(self) -> None:
        """Defer a SIGTERM until the matching ``release``."""
        self._holds += 1

    def release(self) -> None:
        """End a ``hold``; at the last one, a SIGTERM that came meanwhile is raised here."""
        self.drop()
        self._raise_if_due()

    def drop(self) -> None:
        """End a ``hold`` without raising: for code already leaving on an exception."""
        self._holds = max(0, self._holds - 1)

    @contextmanager
    def held(self) -> Iterator[StopRequest]:
        self.hold()
        try:
            yield self
        except BaseException:
            self.drop()  # already leaving: no second exception on top
            raise
        self.release()

    def _raise_if_due(self) -> None:
        if self._event.is_set() and not self._holds and not self._raised:
            self._raised = True
            raise Interrupted()

    def _on_signal(self, signum, frame) -> None:
        self._event.set()
        self._raise_if_due()


_current: StopRequest | None = None


@contextmanager
def on_sigterm() -> Iterator[StopRequest]:
    """While inside, SIGTERM stops the command as ``StopRequest`` says. Nested uses share the outer
    request (the CLI's, around a recipe's). Off the main thread, where Python sets no signal handler,
    it yields a request that only ``set`` sets."""
    global _current
    if _current is not None:
        yield _current
        return
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return
    previous = signal.signal(signal.SIGTERM, request._on_signal)
    _current = request
    try:
        yield request
    finally:
        _current = None
        signal.signal(signal.SIGTERM, previous)


class UpdateHold:
    """Holds ``stop`` from a step's first optimizer update to ``end``, the step's boundary, so that
    a SIGTERM never lands between changed weights and the loop state that counts them. A
    torch optimizer's step pre-hook marks the update, whichever ``Step`` calls it (DP, PPO's epochs)."""

    def __init__(self, stop: StopRequest, optimizer) -> None:
        self.stop = stop
        self.holding = False
        self.handle = optimizer.register_step_pre_hook(self._on_update)

    def _on_update(self, *_) -> None:
        if not self.holding:
            self.holding = True
            self.stop.hold()

    def end(self) -> None:
        """The step's boundary: a SIGTERM that came during its update is raised here."""
        if self.holding:
            self.holding = False
            self.stop.release()

    def remove(self) -> None:
        """Unhook, leaving no hold behind (called on the way out, so it raises nothing)."""
        self.handle.remove()
        if self.holding:
            self.holding = False
            self.stop.drop()
