"""Progress reporting for the one-off writers (``flashtier convert``, ``flashtier compress``)."""

from __future__ import annotations

from collections.abc import Callable


def ticker(total: int, progress: Callable[[int, int], None] | None) -> Callable[[], None]:
    """A ``tick()`` to call after each of ``total`` items: it counts the calls and reports
    ``progress(done, total)`` after each one (nothing when ``progress`` is None)."""
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    return tick
