"""Random-number states in checkpoints: the process-wide RNGs, or one trial's own generators.

A checkpoint stores the state of torch's CPU generator, numpy's legacy ``RandomState`` and
``random`` in one format, whether it came from the process-wide RNGs or from a
:class:`TrialRNG`, so either can resume from either.

NOTE: the process-wide RNGs are shared by every thread. With ``study.optimize(n_jobs > 1)``
several trials draw from them at once, and restoring one trial's state would move the others'
streams; such trials resume exactly only through their own :class:`TrialRNG`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
import random
import threading
from typing import Any

import numpy as np
import torch


@dataclass
class TrialRNG:
    """One trial's generators, for objectives that run in threads (``n_jobs > 1``).

    Draw from ``torch`` (pass it as ``generator=`` to torch functions and DataLoaders),
    ``numpy`` and ``random`` instead of the process-wide RNGs; pass the object to
    :func:`optuna_fms.save_checkpoint` as ``rng=``, and get it back from
    :meth:`optuna_fms.Checkpoint.rng` after :func:`optuna_fms.load_checkpoint`.
    CPU only: CUDA's generators are process-wide.
    """

    torch: torch.Generator
    numpy: np.random.RandomState
    random: random.Random

    @classmethod
    def seeded(cls, seed: int) -> TrialRNG:
        """Fresh generators for a new configuration (nothing to resume)."""
        gen = torch.Generator()
        gen.manual_seed(seed)
        return cls(gen, np.random.RandomState(seed), random.Random(seed))

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> TrialRNG:
        gen = torch.Generator()
        gen.set_state(state["torch"])
        numpy_rng = np.random.RandomState()
        numpy_rng.set_state(_numpy_state(state["numpy"]))
        python_rng = random.Random()
        python_rng.setstate(_random_state(state["random"]))
        return cls(gen, numpy_rng, python_rng)

    def state(self) -> dict[str, Any]:
        return {
            "torch": self.torch.get_state(),
            "random": self.random.getstate(),
            "numpy": _numpy_record(self.numpy.get_state()),
        }


def global_state() -> dict[str, Any]:
    """The process-wide RNG states (and CUDA's, once CUDA is in use)."""
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "random": random.getstate(),
        "numpy": _numpy_record(np.random.get_state()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_global(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_random_state(state["random"]))
    np.random.set_state(_numpy_state(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def may_restore_global(requested: bool | None) -> bool:
    """Whether a load restores the process-wide RNGs: as requested, else (None) only on the
    main thread, where Optuna runs trials with ``n_jobs=1``; its ``n_jobs > 1`` workers are
    pool threads, which share the RNGs with each other."""
    if requested is not None:
        return requested
    return threading.current_thread() is threading.main_thread()


# NOTE: numpy's key array becomes an int64 tensor (safetensors stores tensors, not uint32 arrays).
def _numpy_record(state: tuple) -> list[Any]:
    kind, keys, pos, has_gauss, cached = state
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]


def _numpy_state(record: list[Any]) -> tuple:
    kind, keys, pos, has_gauss, cached = record
    return (kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached)


def _random_state(record: Any) -> tuple:
    version, internal, gauss = record
    return (version, tuple(internal), gauss)
