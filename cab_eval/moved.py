"""The measurement code's old import paths under ``cab_attention``, kept for one release.

``cab_attention.evaluate``, ``cab_attention.benchmark``, ``cab_attention.demo`` and
``cab_attention.cli`` moved to :mod:`cab_eval` (the ``[eval]`` extra). Importing an old name warns
with a :class:`DeprecationWarning` and returns the *same* module object as the new name (one copy of
each module, so state and ``isinstance`` checks agree), e.g.
``cab_attention.evaluate.passkey is cab_eval.evaluate.passkey``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

# old package or module -> new one
MOVED = {
    "cab_attention.evaluate": "cab_eval.evaluate",
    "cab_attention.benchmark": "cab_eval.benchmark",
    "cab_attention.demo": "cab_eval.demo",
    "cab_attention.cli": "cab_eval.cli",
}


def warn_moved(old: str, new: str, stacklevel: int = 3) -> None:
    warnings.warn(f"{old} moved to {new} (install cab-attention[eval]); the old name goes in the next release",
                  DeprecationWarning, stacklevel=stacklevel)


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``<old package>.<sub>`` to the already-imported ``<new package>.<sub>``."""

    def __init__(self) -> None:
        self._real_specs: dict[str, object] = {}

    def find_spec(self, fullname, path=None, target=None):
        for old, new in MOVED.items():
            if fullname.startswith(old + "."):
                return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        for old, new in MOVED.items():
            if spec.name.startswith(old + "."):
                module = importlib.import_module(new + spec.name[len(old):])
                # The import system stamps the alias's spec onto the module it gets back; keep the
                # real one so that the module still knows where it lives.
                self._real_specs[spec.name] = module.__spec__
                return module
        raise ImportError(spec.name)

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self._real_specs.pop(module.__spec__.name)


_FINDER = _MovedFinder()


def alias(old: str) -> ModuleType:
    """Make ``old`` (a package or module being imported) an alias of its new home; return the new module."""
    new = MOVED[old]
    warn_moved(old, new, stacklevel=4)
    module = importlib.import_module(new)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
    sys.modules[old] = module
    return module
