"""Storage and artifact calls that ride out a short outage: retry with backoff, then a clear error."""

from __future__ import annotations

from collections.abc import Callable
import time
from typing import TypeVar

from optuna_fms._warnings import warn_once

T = TypeVar("T")

# NOTE: about 6 s in all: a database restart or a network blip, not a long outage.
DELAYS: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)


class StorageUnavailable(RuntimeError):
    """The storage or the artifact store did not answer through every retry."""


def is_transient(err: BaseException) -> bool:
    """A lost connection or a timeout (directly, or as the cause of Optuna's storage error)."""
    seen = 0
    while err is not None and seen < 4:
        if isinstance(err, (ConnectionError, TimeoutError)):
            return True
        if type(err).__name__ in ("OperationalError", "InterfaceError") and "sqlalchemy" in type(err).__module__:
            return True
        err, seen = err.__cause__, seen + 1  # type: ignore[assignment]
    return False


def with_backoff(what: str, call: Callable[[], T], delays: tuple[float, ...] = DELAYS) -> T:
    """``call()``, retried after each delay while it fails transiently; StorageUnavailable at the end.

    Only calls that can be repeated go through here: reads, and writes of a whole value.
    """
    for attempt, delay in enumerate((*delays, None)):
        try:
            return call()
        except Exception as err:  # noqa: BLE001 - re-raised unless transient
            if not is_transient(err):
                raise
            if delay is None:
                raise StorageUnavailable(
                    f"optuna-fms could not {what}: no answer after {attempt + 1} tries over "
                    f"{sum(delays):.1f} s ({type(err).__name__}: {err}). Nothing was written or lost "
                    "by this call; the trial can be retried once the storage is back."
                ) from err
            warn_once(f"retry:{what}", f"Could not {what} ({type(err).__name__}: {err}); retrying.")
            time.sleep(delay)
    raise AssertionError("unreachable")
