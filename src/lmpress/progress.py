"""Progress for long work: bars (rich) on a terminal; in a pipe or a log file, a line every few
seconds of a long loop, and a line for any step that takes longer than a few seconds (`phase`), so
that no command is silent for long and a fast one prints nothing extra."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger("lmpress.progress")
EVERY = 5.0  # seconds between progress lines in a pipe
AFTER = 3.0  # seconds a step runs before it is announced


@contextmanager
def phase(description: str, after: float = AFTER) -> Iterator[None]:
    """Announce ``description`` if it is still running after ``after`` seconds (a long load, a
    save, a speed measurement), then say how long it took; a fast step prints nothing."""
    t0 = time.perf_counter()
    announced = threading.Event()

    def announce() -> None:
        announced.set()
        log.info("%s ...", description)

    timer = threading.Timer(after, announce)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        if announced.is_set():
            log.info("%s: done in %.1f s", description, time.perf_counter() - t0)


def _lines(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    """``items``, with a line ``DESCRIPTION: i/total`` whenever ``EVERY`` seconds have passed."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else None  # type: ignore[arg-type]
    last = time.perf_counter()
    for i, item in enumerate(items):
        now = time.perf_counter()
        if now - last >= EVERY:
            log.info("%s: %d%s", description, i, f"/{total}" if total else "")
            last = now
        yield item


def track(items: Iterable[T], description: str, enabled: bool = True, total: int | None = None) -> Iterator[T]:
    """Iterate over ``items``, showing a progress bar on stderr when ``enabled`` and stderr is a
    terminal (in a pipe or a log file a bar would only leave empty lines)."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        yield from _lines(items, description, total)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        yield from bar.track(items, description=description, total=total)
