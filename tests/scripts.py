"""Scripts the tests import by path (the tutorials, the OptunaHub folder's files)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
import sys
from types import ModuleType


def load_script(name: str, path: Path) -> ModuleType:
    """Import the file at ``path`` as module ``name``.

    NOTE: registered in ``sys.modules`` before it runs, since dataclasses look their module up there.
    """
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
