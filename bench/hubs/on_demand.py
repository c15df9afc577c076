"""A hub's checkpoints built the first time a replay asks for them, each checked against the table.

A full build trains every configuration (arch: 8,400 CPU seconds, animal: 9,500), while one study
of 160 epochs touches some 40-60 of them. :class:`OnDemandCache` builds the zoo once and then one
configuration at a time, in a spawned one-thread process with the same portable numerics as
``build``, so every file is the one a full build would write; its hash must match the table or
the replay stops. Two replays that want the same configuration take turns (a lock file per
configuration), and what one built the other reuses.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path

from bench.hubs import recipe as recipe_mod
from bench.hubs.recipe import HubRecipe, HubTable


def recipe_of(table: HubTable) -> HubRecipe:
    """The recipe that built ``table`` (``bench.hubs.<name>``; a ``-micro`` name is its micro variant)."""
    name, micro = table.name.removesuffix("-micro"), table.name.endswith("-micro")
    try:
        module = importlib.import_module(f"bench.hubs.{name}")
    except ImportError as err:
        raise ValueError(f"no recipe module bench.hubs.{name} for hub {table.name!r}") from err
    recipe = module.recipe(micro)
    if recipe.fingerprint() != table.data["fingerprint"]:
        raise ValueError(f"the recipe of {table.name!r} changed since its table was built "
                         f"(fingerprint {recipe.fingerprint()} against {table.data['fingerprint']})")
    return recipe


class OnDemandCache:
    """Fills ``table.cache_dir`` with what is asked for; ``close()`` ends the builder process."""

    def __init__(self, table: HubTable) -> None:
        self.table = table
        self.recipe = recipe_of(table)
        self.cache = Path(table.cache_dir)
        self.built: list[int] = []  # configurations this object had to build
        self._ready: set[int] = set()  # configurations whose files this object has checked
        self._zoo_ready = False
        self._stack = contextlib.ExitStack()
        self._mapper: recipe_mod.Mapper | None = None
        recipe_mod._prepare_cache(self.recipe, self.cache, fresh=False)

    def close(self) -> None:
        self._stack.close()
        self._mapper = None

    def __enter__(self) -> OnDemandCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ensure_zoo(self) -> None:
        """Every zoo member's pretrained checkpoint (checked once per object)."""
        if self._zoo_ready:
            return
        t = self.table
        missing = [z["id"] for z in t.zoo if not t.zoo_checkpoint_path(z["id"]).is_file()]
        if missing:
            with self._locked("zoo"):
                missing = [k for k in missing if not t.zoo_checkpoint_path(k).is_file()]
                if missing:
                    list(self._map(recipe_mod._pretrain_task, missing))
        for z in t.zoo:
            self._check(t.zoo_checkpoint_path(z["id"]), z["sha256"], f"zoo model {z['id']}")
        self._zoo_ready = True

    def ensure_config(self, cid: int) -> None:
        """Every checkpoint (epochs 0..n) of configuration ``cid``."""
        if cid in self._ready:
            return
        t = self.table
        paths = [t.checkpoint_path(cid, e) for e in range(t.n_epochs + 1)]
        if all(p.is_file() for p in paths):
            self._ready.add(cid)
            return
        self.ensure_zoo()
        with self._locked(f"c{cid:04d}"):
            if not all(p.is_file() for p in paths):
                list(self._map(recipe_mod._finetune_task, [cid]))
                self.built.append(cid)
        for e, p in enumerate(paths):
            self._check(p, t.checkpoint_sha(cid, e), f"config {cid} epoch {e}")
        self._ready.add(cid)

    def _map(self, fn: Callable[[int], dict], ids: list[int]) -> Iterator[dict]:
        if self._mapper is None:
            self._mapper = self._stack.enter_context(recipe_mod._workers(self.recipe, self.cache, 1))
        return self._mapper(fn, ids)

    @contextlib.contextmanager
    def _locked(self, what: str) -> Iterator[None]:
        lock = self.cache / "locks" / f"{what}.lock"
        lock.parent.mkdir(exist_ok=True)
        with open(lock, "w") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @staticmethod
    def _check(path: Path, want: str, what: str) -> None:
        got = recipe_mod._sha(path)
        if got != want:
            raise RuntimeError(f"{what} built on demand differs from the table ({path}: sha256 {got}, "
                               f"table {want}); rebuild the hub with `build --fresh`")
