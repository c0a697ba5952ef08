"""The one progress-callback shape every long step reports through, and a heartbeat for steps without one."""

import contextlib
import contextvars
import threading
import time
from typing import Callable, Iterator, Optional

# what (a file name, "decode", "epoch 3"), units done so far, units in all when known
Progress = Callable[[str, int, Optional[int]], None]


@contextlib.contextmanager
def heartbeat(say: Callable[[str], None], what: str, every: float = 10.0) -> Iterator[Callable[[str], None]]:
    """For steps that report nothing while they work (pictures, uploads, scoring another model): a line
    `<what> (still working, N s)` every `every` seconds, so a log is never silent for long. Yields a
    function that renames the step as the work moves on."""
    done, current = threading.Event(), [what, time.monotonic()]

    def beat() -> None:
        while not done.wait(every):
            name, since = current
            say(f"{name} (still working, {time.monotonic() - since:.0f} s)")

    # The thread runs in a copy of the caller's context: an orchestrator that keeps the current run in a
    # context variable (Prefect does) then sends its lines to that run instead of dropping them as runless.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), name="heartbeat", daemon=True)
    thread.start()
    try:
        yield lambda step: current.__setitem__(slice(None), [step, time.monotonic()])
    finally:
        done.set()
        thread.join()
