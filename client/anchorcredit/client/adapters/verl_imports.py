"""Run a patch on a module right after it is imported (or at once, if it already is).

A Ray worker setup hook runs before the process imports verl; importing verl there just to
patch it would cost every worker seconds (and fail in workers whose environment lacks
parts of it). A meta-path finder patches each target module the moment it finishes
loading instead, whatever the import order.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
import threading
from collections.abc import Callable
from typing import Any

Patch = Callable[[Any], Callable[[], None]]  # module -> undo


class _Loader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader, after: Callable[[Any], None]):
        self._inner = inner
        self._after = after

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: Any) -> None:
        self._inner.exec_module(module)
        self._after(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... of the real one
        return getattr(self._inner, name)


class PostImportHooks(importlib.abc.MetaPathFinder):
    """{module name: patch}; `install()` patches loaded modules now, the rest on import."""

    def __init__(self, patches: dict[str, Patch]):
        self._patches = dict(patches)
        self._undo: list[Callable[[], None]] = []
        self._looking = threading.local()
        self._lock = threading.Lock()

    def install(self) -> None:
        sys.meta_path.insert(0, self)
        for name in self._patches:
            module = sys.modules.get(name)
            if module is not None:
                self._apply(name, module)

    def remove(self) -> None:
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        with self._lock:
            undo, self._undo = self._undo[::-1], []
        for fn in undo:
            fn()

    def _apply(self, name: str, module: Any) -> None:
        undo = self._patches[name](module)
        with self._lock:
            self._undo.append(undo)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self._patches:
            return None
        busy = getattr(self._looking, "names", set())
        if fullname in busy:
            return None
        self._looking.names = busy | {fullname}
        try:  # the spec the other finders give, with a loader that patches after loading
            spec = importlib.util.find_spec(fullname)
        finally:
            self._looking.names = busy
        if spec is None or spec.loader is None:
            return None
        spec.loader = _Loader(spec.loader, lambda m: self._apply(fullname, m))
        return spec
