"""Run a callback right after a module is imported, or now if it already is.

Presets use this so that watching timm or transformers imports neither: the
functions are watched when (and if) the user's own code imports them.  A
finder placed first on ``sys.meta_path`` notices the modules we wait for,
lets the other finders locate them, and wraps only their loader's
``exec_module`` so the callbacks run after the module's code.
"""
import importlib.abc
import sys
import threading
import warnings

from ._errors import CaptureWarning

_lock = threading.RLock()
_pending = {}   # module name -> [callback, ...]
_prefixes = {}  # package name -> [callback, ...]: every submodule, for as long as waited for


def when_imported(name, callback):
    """Call ``callback(module)`` once module ``name`` is imported (now, if it is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _pending.setdefault(name, []).append(callback)
            _install()
            return
    _run(name, module, [callback])


def when_submodules_imported(package, callback):
    """Call ``callback(module)`` for each submodule of ``package``, imported now or later.

    Unlike ``when_imported`` it keeps waiting, for every later submodule,
    until ``cancel(callback)``.
    """
    prefix = package + "."
    with _lock:
        _prefixes.setdefault(prefix, []).append(callback)
        _install()
        present = [(name, module) for name, module in list(sys.modules.items())
                   if name.startswith(prefix) and module is not None]
    for name, module in present:
        _run(name, module, [callback])


def cancel(callback):
    """Forget ``callback`` wherever it waits."""
    with _lock:
        for table in (_pending, _prefixes):
            for name in list(table):
                table[name] = [cb for cb in table[name] if cb is not callback]
                if not table[name]:
                    del table[name]


def _waiting(fullname):
    return fullname in _pending or any(fullname.startswith(p) for p in _prefixes)


def _run(name, module, callbacks):
    for callback in callbacks:
        try:
            callback(module)
        except Exception as exc:  # never break the user's import
            warnings.warn(
                "visualizer: setting up capture for {} failed: {}: {}".format(
                    name, type(exc).__name__, exc), CaptureWarning, stacklevel=2)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if not _waiting(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _Loader(spec.loader)
        return spec


class _Loader(importlib.abc.Loader):
    """Delegates to the real loader; runs the waiting callbacks after exec_module."""

    def __init__(self, loader):
        self._loader = loader

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        name = module.__spec__.name if module.__spec__ is not None else module.__name__
        with _lock:
            callbacks = _pending.pop(name, [])
            for prefix, waiting in _prefixes.items():
                if name.startswith(prefix):
                    callbacks.extend(waiting)
        # Put the real loader back so reloads and introspection see it.
        if module.__spec__ is not None and module.__spec__.loader is self:
            module.__spec__.loader = self._loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self._loader
        _run(name, module, callbacks)


_finder = _Finder()


def _install():
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def weakly(owner, method):
    """A callback for ``when_imported`` that calls ``method(owner, module)`` without keeping ``owner`` alive."""
    import weakref

    ref = weakref.ref(owner)

    def callback(module):
        alive = ref()
        if alive is not None:
            method(alive, module)

    return callback
