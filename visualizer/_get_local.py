"""The ``get_local`` object: decorator, switch and cache.

This module holds all the state: which functions are under capture, their
original and rewritten code objects, and the cache.  The code rewriting
itself is the pure function ``_rewrite.rewrite``.

Capture is "installed" by assigning the rewritten code object to the
function's ``__code__`` and "removed" by assigning the original back, so the
function object (and every reference to it, bound methods included) stays
the same and, while capture is off, runs exactly the code it was born with.
"""
import contextlib
import sys
import threading
import types
import warnings
import weakref

from . import _imports, _resolve, _rewrite, _store, _torch
from ._errors import CaptureWarning, VisualizerError, VisualizerTypeError, VisualizerValueError
from .events import Event, EventDispatcher


class _Target:
    """One original code object under capture, and the functions that run it."""

    def __init__(self, state, code, qualname, names, source, module=None):
        self.state = state
        self.code = code
        self.qualname = qualname
        self.module = module
        self.names = tuple(names)
        self.keys = _keys(qualname, self.names)
        self.source = source
        self.overrides = {}
        self.rewritten = None
        self.functions = weakref.WeakSet()
        self.warned = set()

    def add_names(self, names):
        """Capture ``names`` as well; the code is rewritten again on next install."""
        merged = tuple(dict.fromkeys(self.names + tuple(names)))
        if merged != self.names:
            self.names = merged
            self.keys = _keys(self.qualname, merged)
            self.rewritten = None

    def add_overrides(self, overrides):
        """Read these attributes as constants while installed (see ``_rewrite.rewrite``)."""
        if overrides and any(self.overrides.get(k, _MISSING) is not v
                             for k, v in overrides.items()):
            self.overrides.update(overrides)
            self.rewritten = None

    def rewritten_code(self):
        if self.rewritten is None:
            self.rewritten = _rewrite.rewrite(
                self.code, self.names, _make_record(self.state, self), self.record_locals,
                source=self.source, overrides=self.overrides)
        return self.rewritten

    def record_locals(self, frame_locals):
        """Called with ``locals()`` at returns where some name may be unbound."""
        try:
            missing = [n for n in self.names if n not in frame_locals]
            if missing:
                if self.state.active:
                    self.warn_unbound(missing)
                return
            source = None if self.source is None else frame_locals.get(self.source)
            self.state.capture(self, source, [frame_locals[n] for n in self.names])
        except Exception as exc:  # never let a capture break the user's function
            self.state.capture_failed(self, exc)

    def warn_unbound(self, missing):
        new = [n for n in missing if n not in self.warned]
        if not new:
            return
        self.warned.update(new)
        names = ", ".join(repr(n) for n in new)
        warnings.warn(
            "get_local: {names} {verb} not bound when {fn} returned, so that call recorded "
            "nothing (later calls like it are not reported again). The variable is "
            "assigned only on a path that did not run, e.g. a fused-attention fast "
            "path; make that path run (timm: fused_attn=False; transformers: "
            "attn_implementation='eager'), or capture a variable bound on every "
            "path.".format(names=names, verb="was" if len(new) == 1 else "were",
                          fn=self.qualname),
            CaptureWarning, stacklevel=3)


_MISSING = object()


def _keys(qualname, names):
    """Cache keys, one per name: the qualname alone when there is one name."""
    if len(names) == 1:
        return (qualname,)
    return tuple("{}.{}".format(qualname, n) for n in names)


def _make_record(state, target):
    """Build the function a rewritten code object calls where all names are bound.

    The rewritten code passes ``(source, *values)`` or ``values``.  With one
    name, the common case, a specialised function takes the shortest path when
    the state is ``fast`` (active, default storage, no event handlers): skip the
    conversion for types known not to be tensors, append.  Anything else goes
    through ``_State.capture``.  Nothing here may raise into the user's code.
    """
    plain = _store.plain_types
    convert = _store.to_numpy
    weak = weakref.ref
    lock = state.store_lock
    failed = state.capture_failed
    if len(target.names) == 1:
        key = target.keys[0]
        if target.source is None:
            def record(value):
                try:
                    if state.fast:
                        if type(value) not in plain:
                            value = convert(value)
                        cache = state.cache
                        try:
                            cache[key].append(value)
                        except KeyError:  # a new key, or one the user deleted
                            cache.add(key, value)
                    else:
                        state.capture(target, None, (value,))
                except Exception as exc:
                    failed(target, exc)
        else:
            def record(source, value):
                try:
                    if state.fast:
                        if type(value) not in plain:
                            value = convert(value)
                        cache = state.cache
                        try:
                            ref = weak(source)
                        except TypeError:
                            ref = None
                        with lock:  # a value and its source, never split by a thread switch
                            cache.add(key, value, ref)
                    else:
                        state.capture(target, source, (value,))
                except Exception as exc:
                    failed(target, exc)
        return record

    if target.source is None:
        def record(*values):
            try:
                state.capture(target, None, values)
            except Exception as exc:
                failed(target, exc)
    else:
        def record(source, *values):
            try:
                state.capture(target, source, values)
            except Exception as exc:
                failed(target, exc)
    return record


class _State:
    """Everything that changes at run time, shared by all recorders."""

    def __init__(self):
        self.active = False
        self.fast = False
        self.cache = _store.Cache()
        self.storage = _store.Storage()
        self.events = EventDispatcher(on_change=self.refresh)
        self.lock = threading.RLock()
        self.store_lock = threading.Lock()
        self.targets = {}       # id(original code) -> _Target (which keeps the code alive)
        self.by_rewritten = {}  # id(rewritten code) -> (rewritten code, _Target)
        self.dynamo_hook = False
        self.jit = _torch.JitGuard(self.is_captured)
        self.jit_hook = False
        self.switches = [(self.jit_on, self.jit.off)]  # (on, off): run as capture starts, stops
        self.failed = set()

    def refresh(self):
        """Recompute ``fast``: can recorders skip events, transforms and bounds?"""
        self.fast = self.active and self.storage.is_default and not len(self.events)

    def capture(self, target, source, values):
        """Dispatch events for one call's values, then store them."""
        if not self.active:
            return
        keys = target.keys
        if len(self.events):
            for key, name, value in zip(keys, target.names, values):
                self.events.dispatch(Event(key, target.qualname, name, value, source))
        storage = self.storage
        if storage.kind == "none":
            return
        # Prepare every value before storing any, so a failing transform
        # leaves the lists of a multi-name capture aligned.
        prepared = [storage.prepare(key, value) for key, value in zip(keys, values)]
        cache = self.cache
        ref = _store.source_ref(source) if target.source is not None else _store._NO_SOURCE
        # One lock for the appends of one call, so that calls from other threads
        # cannot interleave between the lists of several names, or between a
        # value and its source.
        with self.store_lock:
            for key, value in zip(keys, prepared):
                cache.add(key, value, ref)
                if storage.keep_last is not None:
                    cache.trim(key, storage.keep_last)

    def capture_failed(self, target, exc):
        if target.qualname in self.failed:
            return
        self.failed.add(target.qualname)
        warnings.warn(
            "get_local: capturing {} failed and that call recorded nothing: {}: {}"
            .format(target.qualname, type(exc).__name__, exc),
            CaptureWarning, stacklevel=3)

    # -- installing and removing rewritten code -------------------------------

    def target_of(self, code):
        """The target whose original or rewritten code ``code`` is, or None."""
        target = self.targets.get(id(code))
        if target is not None and target.code is code:
            return target
        code_and_target = self.by_rewritten.get(id(code))
        if code_and_target is not None and code_and_target[0] is code:
            return code_and_target[1]
        return None

    def install(self, target, function):
        if self.target_of(function.__code__) is target:
            new = target.rewritten_code()
            self.by_rewritten[id(new)] = (new, target)
            function.__code__ = new
            if not _torch.mark(function, new) and not self.dynamo_hook:
                # Mark later, if torch.compile turns up while we are installed.
                self.dynamo_hook = True
                _imports.when_imported("torch._dynamo.eval_frame", self.mark_installed)
        else:
            warnings.warn(
                "get_local: {} no longer runs the code it had when it was decorated "
                "(something else replaced its __code__), so it is not captured."
                .format(target.qualname), CaptureWarning, stacklevel=3)

    def is_captured(self, function):
        """Whether ``function`` runs code under capture (of at least one name)."""
        target = self.target_of(function.__code__)
        return target is not None and bool(target.names)

    def jit_on(self):
        if "torch" in sys.modules:
            self.jit.on()
        elif not self.jit_hook:
            self.jit_hook = True
            _imports.when_imported("torch", lambda torch: self.active and self.jit.on(torch))

    def mark_installed(self, module=None):
        """Mark every installed rewritten code for torch.compile (see ``_torch``)."""
        with self.lock:
            self.dynamo_hook = False
            for target in list(self.targets.values()):
                for function in list(target.functions):
                    if self.target_of(function.__code__) is target and \
                            function.__code__ is not target.code:
                        _torch.mark(function, function.__code__)

    def uninstall(self, target, function):
        code = function.__code__
        if code is not target.code and self.target_of(code) is target:
            function.__code__ = target.code
            _torch.unmark(function)

    def register(self, function, names, source, overrides=None):
        """Put ``function`` under capture of ``names``; install now if active.

        If the code cannot be rewritten (``_rewrite.UnreadableCode``) while
        active, the error is raised and nothing is registered or changed.
        """
        with self.lock:
            code = function.__code__
            target = self.target_of(code)
            created = target is None
            if created:
                target = _Target(self, code, function.__qualname__, names, source,
                                 function.__module__)
            saved = (target.names, target.keys, dict(target.overrides), target.rewritten)
            target.add_names(names)
            target.add_overrides(overrides)
            if self.active:
                try:
                    target.rewritten_code()
                except VisualizerError:
                    target.names, target.keys, target.overrides, target.rewritten = saved
                    raise
            if created:
                self.targets[id(code)] = target
            for key in saved[1]:
                if key not in target.keys and not self.cache.get(key, True):
                    del self.cache[key]
            target.functions.add(function)
            if self.active:
                for fn in list(target.functions):
                    self.install(target, fn)
            return target

    def unregister(self, function):
        """Stop capturing from ``function`` and give it its original code back."""
        with self.lock:
            target = self.target_of(function.__code__)
            if target is None:
                return False
            self.uninstall(target, function)
            target.functions.discard(function)
            if not len(target.functions):
                del self.targets[id(target.code)]
                for key in [k for k, (_, t) in self.by_rewritten.items() if t is target]:
                    del self.by_rewritten[key]
            return True

    def add_switch(self, on, off):
        """Call ``on()`` whenever capture starts (now, if active) and ``off()`` when it stops."""
        with self.lock:
            self.switches.append((on, off))
            if self.active:
                on()

    def remove_switch(self, on, off):
        with self.lock:
            if (on, off) in self.switches:
                self.switches.remove((on, off))
                if self.active:
                    off()

    def set_active(self, active):
        with self.lock:
            changed = active != self.active
            self.active = active
            self.refresh()
            if changed:
                for on, off in list(self.switches):
                    (on if active else off)()
            for target in list(self.targets.values()):
                for fn in list(target.functions):
                    if not active:
                        self.uninstall(target, fn)
                        continue
                    try:
                        self.install(target, fn)
                    except VisualizerError as exc:  # one function must not stop the others
                        if target.qualname not in self.failed:
                            self.failed.add(target.qualname)
                            warnings.warn(str(exc), CaptureWarning, stacklevel=3)
                        break


class GetLocal:
    """Capture local variables of functions by name, per call, into a cache.

    Use it as a decorator with the names of the locals to capture::

        from visualizer import get_local
        get_local.activate()

        @get_local('attn')
        def attention(q, k, v):
            attn = (q @ k.T).softmax(-1)
            return attn @ v

        attention(q, k, v)
        get_local.cache    # {'attention': [attn of that call]}

    The decorator returns the very function it was given.  While capture is
    active, that function's ``__code__`` is a rewritten copy that reports the
    named locals each time it returns; while inactive it is the original code,
    so an inactive ``get_local`` costs nothing at all.  Functions decorated
    while inactive are remembered and start capturing when ``activate()`` is
    called, so the order of activate and import does not matter.
    """

    def __init__(self):
        self._state = _State()

    # -- the decorator --------------------------------------------------------

    def __call__(self, *names):
        """Return a decorator that captures the locals ``names`` of a function.

        With one name the cache key is the function's ``__qualname__``; with
        several, each name gets ``'<qualname>.<name>'``.

        >>> @get_local('y')
        ... def f(x):
        ...     y = x * 2
        ...     return y + 1
        """
        names = _check_names(names)

        def decorator(obj):
            function, source = _function_of(obj, names)
            self._state.register(function, names, source)
            return obj

        return decorator

    # -- functions you cannot edit ------------------------------------------------

    def watch(self, target, *names, source=None, overrides=None):
        """Capture the locals ``names`` of the function at dotted path ``target``.

        The same as decorating it with ``@get_local(*names)``, for code you do not
        want to edit: ``target`` is a path such as
        ``'timm.layers.attention.Attention.forward'`` (its module is imported if it
        is not yet) or the function itself.  The function is changed in place, so
        models and bound methods created before the call are captured too.
        Watching the same target again captures once; extra names are added.
        ``source`` names the argument passed to event handlers as the event source
        (default: ``self``/``cls`` of a method, else none).  ``overrides`` maps
        attribute names to constants that every ``x.attr`` read in the function
        sees instead while capture is on, e.g. ``{'fused_attn': False}`` to take
        a module's eager path; with overrides, ``names`` may be empty.  Returns
        the function.

        >>> get_local.watch('timm.layers.attention.Attention.forward', 'attn')
        """
        if overrides is not None and not isinstance(overrides, dict):
            raise VisualizerTypeError(
                "overrides must be a dict from attribute name to value, got {!r}".format(
                    overrides))
        for attr in overrides or ():
            if not isinstance(attr, str) or not attr.isidentifier():
                raise VisualizerTypeError(
                    "overrides: attribute names must be strings naming an attribute, "
                    "got {!r}".format(attr))
        names = _check_names(names) if names or not overrides else ()
        obj = _resolve.resolve(target) if isinstance(target, str) else target
        function, default_source = _function_of(obj, names, tuple(overrides or ()))
        if source is None:
            source = default_source
        elif source not in function.__code__.co_varnames[:_n_args(function.__code__)]:
            raise VisualizerValueError(
                "watch: source {!r} is not an argument of {}; its arguments are: {}".format(
                    source, function.__qualname__,
                    ", ".join(function.__code__.co_varnames[:_n_args(function.__code__)])))
        self._state.register(function, names, source, overrides)
        return function

    def unwatch(self, target):
        """Stop capturing from ``target`` and restore its original code object.

        ``target`` is what was given to ``watch`` (or a decorated function).  The
        captures made so far stay in the cache.

        >>> get_local.unwatch('timm.layers.attention.Attention.forward')
        """
        obj = _resolve.resolve(target) if isinstance(target, str) else target
        for function in _candidate_functions(obj):
            if self._state.unregister(function):
                return
        raise VisualizerValueError(
            "unwatch: {!r} is not being watched (watched: {})".format(
                target, ", ".join(sorted(self.watched())) or "nothing"))

    def watch_attention(self, families=None):
        """Watch the attention probabilities of every supported model family installed.

        timm's ViT family (ViT, DeiT, BEiT, EVA, Swin), transformers' BERT family
        (and its ViT) and PyTorch's ``nn.MultiheadAttention``; the table and the
        details are in ``visualizer.presets``.  Nothing is imported: a family is
        watched when your code imports it.  While capture is on, the modules
        take their eager path (timm's ``fused_attn``, transformers' SDPA and
        PyTorch's fast path run no Python code to capture from); when it stops,
        they are fused again.  ``families`` picks some of ``'timm'``,
        ``'transformers'``, ``'torch'``.  Returns the dotted paths watched.

        >>> get_local.watch_attention()
        >>> get_local.activate()
        >>> model = timm.create_model('vit_small_patch16_224')
        >>> model(x)
        >>> len(get_local.cache['Attention.forward'])
        12
        """
        from . import presets

        return presets.watch_attention(self, families)

    def unwatch_attention(self):
        """Undo ``watch_attention``: every preset function gets its original code back.

        >>> get_local.unwatch_attention()
        """
        from . import presets

        presets.unwatch_attention(self)

    def watched(self):
        """Return ``{dotted path: captured names}`` for every function under capture.

        >>> get_local.watched()
        {'timm.layers.attention.Attention.forward': ('attn',)}
        """
        with self._state.lock:
            return {"{}.{}".format(t.module, t.qualname): t.names
                    for t in self._state.targets.values() if len(t.functions)}

    # -- the switch -----------------------------------------------------------

    def activate(self):
        """Turn capture on for every decorated function, past and future.

        >>> get_local.activate()
        """
        self._state.set_active(True)

    def deactivate(self):
        """Turn capture off: every decorated function gets its original code back.

        The cache keeps what it holds.

        >>> get_local.deactivate()
        """
        self._state.set_active(False)

    @property
    def active(self):
        """Whether capture is on."""
        return self._state.active

    # -- the cache ------------------------------------------------------------

    @property
    def cache(self):
        """The captures: ``{key: [value of call 1, value of call 2, ...]}``.

        Keys are ``__qualname__`` (one captured name) or ``'<qualname>.<name>'``
        (several).  Lists are in the order the calls returned.
        """
        return self._state.cache

    def clear(self):
        """Empty every list in the cache, keeping the keys.

        >>> get_local.clear()
        """
        self._state.cache.clear_values()

    # -- events and storage ------------------------------------------------------

    @property
    def events(self):
        """The ``EventDispatcher`` every capture goes through (see ``visualizer.events``).

        >>> get_local.events.listen(variable_is('attn'), lambda event: print(event.key))
        """
        return self._state.events

    def configure(self, store="numpy", transform=None, keep_last=None):
        """Choose how captures are stored from now on; return the previous settings.

        ``store``: ``'numpy'`` (default: torch tensors become detached CPU
        NumPy copies, float16/bfloat16 as float32), ``'tensor'`` (detached
        copies on their own device: no transfer, no synchronisation),
        ``'graph'`` (the tensors themselves, attached to the autograd graph) or
        ``'none'`` (keep nothing; event handlers still run).  ``transform``: a
        callable applied to each raw value before it is stored, or a dict from
        cache key to such a callable.  ``keep_last``: keep only the last N
        values of each key.

        >>> get_local.configure(transform=lambda attn: attn[:, :, 0], keep_last=12)
        {'store': 'numpy', 'transform': None, 'keep_last': None}
        """
        storage = _store.Storage(store, transform, keep_last)
        with self._state.lock:
            previous = self._state.storage
            self._state.storage = storage
            self._state.refresh()
        return previous.as_dict()

    @contextlib.contextmanager
    def capture(self, store="numpy", transform=None, keep_last=None):
        """Capture into a fresh cache for the duration of a ``with`` block.

        Activates capture and applies the storage settings (as in
        ``configure``) inside the block, then restores the previous state,
        settings and cache, even if the block raises.  The yielded cache holds
        exactly the captures made inside the block and stays valid afterwards.

        >>> with get_local.capture(transform=lambda attn: attn.mean(1)) as cache:
        ...     model(x)
        >>> cache['Attention.forward']
        """
        storage = _store.Storage(store, transform, keep_last)
        state = self._state
        with state.lock:
            saved = (state.active, state.cache, state.storage)
            scoped = state.cache = _store.Cache()
            state.storage = storage
            state.set_active(True)
        try:
            yield scoped
        finally:
            with state.lock:
                active, state.cache, state.storage = saved
                state.set_active(active)

    def by_module(self, model, cache=None):
        """Regroup captures from the methods of ``model``'s modules by module name.

        Returns ``{'blocks.3.attn': [values of its calls], ...}`` for the
        captures in ``cache`` (default: ``get_local.cache``) whose ``self`` is a
        submodule of ``model``, names as in ``model.named_modules()`` (the model
        itself is ``''``).  With several names captured from one function, the
        keys are ``'blocks.3.attn.q'`` and so on; when a module has several
        captured functions, the function name is added: ``'blocks.3.attn.forward'``.

        >>> get_local.by_module(model)['blocks.0.attn'][0].shape
        (1, 6, 197, 197)
        """
        cache = self._state.cache if cache is None else cache
        named = getattr(model, "named_modules", None)
        if named is None:
            raise VisualizerTypeError(
                "by_module needs a torch.nn.Module (something with named_modules()), got {}"
                .format(type(model).__name__))
        sources = getattr(cache, "sources", None)
        if sources is None:
            raise VisualizerTypeError(
                "by_module needs a cache made by get_local (get_local.cache or the one "
                "get_local.capture() gives); a loaded or copied dict has no module record")
        names = {id(module): name for name, module in named()}
        modules = {id(module): module for _, module in named()}
        found = {}  # (module name, key) -> values
        for key, refs in sources.items():
            values = cache.get(key, [])
            if len(refs) != len(values):
                raise VisualizerValueError(
                    "by_module: the list of {!r} was changed by hand ({} values for {} "
                    "recorded calls); clear() and capture again".format(
                        key, len(values), len(refs)))
            for ref, value in zip(refs, values):
                module = ref() if ref is not None else None
                if module is not None and modules.get(id(module)) is module:
                    found.setdefault((names[id(module)], key), []).append(value)
        return _name_by_module(found, self._state)

    # -- files ---------------------------------------------------------------------

    def save(self, path, cache=None):
        """Save ``cache`` (default: ``get_local.cache``) to one ``.npz`` file, without pickle.

        Keys and the order of values are kept.  Values must be NumPy arrays or
        numbers (the default storage makes tensors into arrays).

        >>> get_local.save('attention.npz')
        """
        from ._files import save_cache

        save_cache(self._state.cache if cache is None else cache, path)

    def load(self, path):
        """Load a file written by ``save`` and return its cache (a dict of lists).

        >>> cache = get_local.load('attention.npz')
        """
        from ._files import load_cache

        return load_cache(path)

    def __repr__(self):
        state = "active" if self.active else "inactive"
        return "<get_local {}: {} keys>".format(state, len(self.cache))


def _name_by_module(found, state):
    """Turn ``{(module name, key): values}`` into by_module's names (see there)."""
    key_info = {}
    for target in list(state.targets.values()):
        for key, name in zip(target.keys, target.names):
            key_info[key] = (target.qualname.rsplit(".", 1)[-1], name, len(target.names) > 1)
    per_module = {}
    for module_name, key in found:
        per_module.setdefault(module_name, set()).add(
            key_info.get(key, (key, None, False))[0])
    out = {}
    for (module_name, key), values in found.items():
        function, name, several = key_info.get(key, (key, None, False))
        parts = [module_name] if module_name else []
        if len(per_module[module_name]) > 1:
            parts.append(function)
        if several:
            parts.append(name)
        out[".".join(parts)] = values
    return out


def _check_names(names):
    if not names:
        raise VisualizerTypeError(
            "get_local needs the names of the locals to capture, "
            "e.g. @get_local('attn') or @get_local('q', 'k')")
    for name in names:
        if not isinstance(name, str):
            if callable(name):
                raise VisualizerTypeError(
                    "get_local takes variable names, but was given {!r}; "
                    "write @get_local('attn'), not @get_local".format(name))
            raise VisualizerTypeError(
                "get_local takes variable names as strings, got {} {!r}"
                .format(type(name).__name__, name))
        if not name.isidentifier():
            raise VisualizerValueError(
                "get_local: {!r} is not a valid variable name".format(name))
    return tuple(dict.fromkeys(names))


def _function_of(obj, names, reads=()):
    """Return ``(function, source)``: the plain function to rewrite for ``obj``.

    Wrappers (``__wrapped__``) are followed to the innermost function whose
    code has the locals ``names`` and reads the attributes ``reads``.
    ``source`` is the argument passed on as the event source (``self`` or
    ``cls``), or None.  Raises a clear error for anything that is not a
    function with those locals.
    """
    source_allowed = True
    described = _describe(obj)
    if isinstance(obj, staticmethod):
        obj, source_allowed = obj.__func__, False
    elif isinstance(obj, (classmethod, types.MethodType)):
        obj = obj.__func__
    elif isinstance(obj, property):
        if obj.fget is None:
            raise VisualizerTypeError(
                "get_local cannot decorate {}: the property has no getter".format(described))
        obj = obj.fget
    outer = obj
    while True:
        if isinstance(obj, type):
            raise VisualizerTypeError(
                "get_local cannot decorate the class {}: decorate the method that "
                "computes the variable, e.g. {}.forward".format(obj.__qualname__, obj.__qualname__))
        if not isinstance(obj, types.FunctionType):
            wrapped = getattr(obj, "__wrapped__", None)
            if wrapped is not None:
                obj = wrapped
                continue
            raise VisualizerTypeError(
                "get_local can only decorate Python functions and methods, not {} "
                "(it has no Python bytecode to rewrite)".format(described))
        code = obj.__code__
        kind = _rewrite.unsupported_kind(code)
        if kind is not None:
            raise VisualizerTypeError(
                "get_local cannot capture from {}, which is {}: its locals are "
                "not final when it returns a value to its caller. Capture from the "
                "function that consumes it, or return the values you need."
                .format(obj.__qualname__, kind))
        missing = _rewrite.missing_names(code, names)
        unread = sorted(set(reads) - _rewrite.loaded_attributes(code)) if reads else ()
        if not missing and not unread:
            break
        wrapped = getattr(obj, "__wrapped__", None)
        if wrapped is None:
            if missing:
                raise _missing_error(outer, obj, missing)
            raise VisualizerValueError(
                "watch: {} never reads the attribute{} {} (it reads: {})".format(
                    obj.__qualname__, "s" if len(unread) > 1 else "",
                    ", ".join(repr(a) for a in unread),
                    ", ".join(sorted(_rewrite.loaded_attributes(code)))))
        obj = wrapped
    return obj, _source_argument(obj) if source_allowed else None


def _n_args(code):
    return (code.co_argcount + code.co_kwonlyargcount
            + bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08))


def _candidate_functions(obj):
    """The plain functions ``obj`` may stand for, outermost first."""
    seen = []
    for attr in ("__func__", "fget"):
        inner = getattr(obj, attr, None)
        if inner is not None:
            obj = inner
    while obj is not None and len(seen) < 100:
        if isinstance(obj, types.FunctionType):
            seen.append(obj)
        obj = getattr(obj, "__wrapped__", None)
    return seen


def _source_argument(function):
    """The first argument's name if ``function`` is defined in a class body."""
    parts = function.__qualname__.split(".")
    code = function.__code__
    if len(parts) >= 2 and parts[-2] != "<locals>" and code.co_argcount >= 1:
        return code.co_varnames[0]
    return None


def _missing_error(outer, function, missing):
    parts = []
    for name, close in missing:
        text = "no local variable {!r}".format(name)
        if close:
            text += " (did you mean {!r}?)".format(close)
        parts.append(text)
    where = function.__qualname__
    if function is not outer:
        where += " (unwrapped from {})".format(getattr(outer, "__qualname__", outer))
    available = _rewrite.local_names(function.__code__)
    return VisualizerValueError(
        "get_local: {} has {}. Its locals are: {}".format(
            where, ", ".join(parts), ", ".join(available) or "(none)"))


def _describe(obj):
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    kind = type(obj).__name__
    return "{} {}".format(kind, name) if name else "{} {!r}".format(kind, obj)


get_local = GetLocal()
