"""One warning per distinct cause and process, through Optuna's logger."""

from __future__ import annotations

import threading

import optuna

_seen: set[str] = set()
_lock = threading.Lock()


def warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _seen:
            return
        _seen.add(key)
    optuna.logging.get_logger("optuna_fms").warning(message)
