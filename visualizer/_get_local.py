"""The ``get_local`` object: the public face of capture.

``GetLocal`` checks what it is given (names, functions, dotted paths,
options) and asks ``_state.State`` to do the work; a new reader finds the
run-time machinery there and the code rewriting in ``_rewrite``.
"""
import contextlib
import types
import weakref

from . import _compat, _resolve, _rewrite
from .storage import memory as _store, stream as _stream
from ._errors import VisualizerTypeError, VisualizerValueError
from ._state import PLUGINS, State, request_key, split_request_key


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
        self._state = State(plugins=PLUGINS)
        self._in_memory = None  # the in-memory cache while configure(stream=...) is on
        # When this object goes, capture stops and the state lets go of its code.
        weakref.finalize(self, self._state.close)

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
        return self._watch(target, names, source, overrides)

    def _watch(self, target, names, source=None, overrides=None, explicit=True,
               attention=False, collect=None, shape=None, mixes=None):
        """``watch``, also for presets: ``explicit=False`` marks a preset's target,
        ``attention=True`` one whose values are attention maps, ``collect`` (a
        predicate of loaded names, such as ``integrations.is_softmax``) one that
        reports every result of such a call it stores (``_state.Target.collecting``),
        ``shape`` (``shape(value, source, frame)``) the layout a preset's values
        are stored in (``_state.State.shaped``), ``mixes`` what the calls it makes
        return, so that the mixed maps it multiplies with the values are captured
        too (``_rewrite.applied_maps``; key ``'<qualname>.applied'``)."""
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
        arguments = function.__code__.co_varnames[:_compat.argument_count(function.__code__)]
        if source is None:
            source = default_source
        elif source not in arguments:
            raise VisualizerValueError(
                "watch: source {!r} is not an argument of {}; its arguments are: {}".format(
                    source, function.__qualname__, ", ".join(arguments)))
        target = self._state.register(function, names, source, overrides, explicit, attention,
                                      collect, shape, mixes)
        if explicit and names:
            target.watched = True  # reported if a capture() block ends without a call
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

        Every call of torch's ``scaled_dot_product_attention`` (the kernel
        seam), the eager attention of timm's and transformers' classes, and
        PyTorch's ``nn.MultiheadAttention``; the table and the details are in
        ``visualizer.presets``, the measured reach in COVERAGE.md.  Nothing
        is imported: a family is watched when your code imports it.  Nothing
        is switched to an eager path either: the model computes what it
        would without capture, ``nn.MultiheadAttention``'s native fast path
        included.  ``families`` picks some of ``'kernel'``,
        ``'timm'``, ``'transformers'``, ``'torch'``.  Returns the dotted paths
        watched.

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

    def configure(self, store=None, transform=None, keep_last=None, queries=None,
                  heads=None, reduce=None, stream=None, grad=False, append=False):
        """Choose how captures are stored from now on; return the previous settings.

        ``store``: ``'numpy'`` (the default without ``grad``: torch tensors become detached CPU
        NumPy copies, float16/bfloat16 as float32), ``'tensor'`` (detached
        copies on their own device: no transfer, no synchronisation),
        ``'graph'`` (the tensors themselves, attached to the autograd graph) or
        ``'none'`` (keep nothing; event handlers still run).  ``transform``: a
        callable applied to each raw value before it is stored, or a dict from
        cache key to such a callable.  ``keep_last``: keep only the last N
        values of each key.  ``queries`` and ``heads`` (an int, a slice or a
        sequence of ints) keep only those query rows and heads of attention
        maps, ``(batch, heads, queries, keys)``; the kernel seam computes only
        them (``queries=-1``: the last token's row, ``queries=0``: ViT's CLS
        row), the presets' eager captures are sliced.  An int keeps its axis.
        ``reduce`` keeps a reduction of each attention map instead of the map,
        computed at the kernel a block of query rows at a time, so the full
        ``(batch, heads, queries, keys)`` matrix never exists:
        ``'head_mean'`` (mean over heads: ``(batch, queries, keys)``),
        ``'received'`` (attention each key receives, summed over the query
        rows: ``(batch, heads, keys)``) or ``'rollout'`` (attention rollout
        through this layer, Abnar & Zuidema 2020: ``(batch, queries, keys)``;
        the last layer's value is the model's rollout).  ``queries`` and
        ``heads`` apply first (for ``'rollout'``, ``queries`` picks rows of the
        result).  ``stream``: a folder to write every capture into as it
        happens (``get_local.cache`` then reads this run's values from it;
        configuring without ``stream`` closes it and brings the in-memory
        cache back); a folder that holds captures already is refused unless
        ``append=True`` adds this run to it; see ``capture``.  See the
        README's "Long contexts" section.
        ``grad=True``: every captured tensor is kept itself (``store``
        defaults to ``'graph'``) and receives its gradient when you run
        ``backward()``, as ``.grad``; attention maps taken at the kernel seam
        join the graph without changing the output or any other gradient.
        See ``capture`` and ``visualizer.attribution``.

        >>> get_local.configure(transform=lambda attn: attn[:, :, 0], keep_last=12)
        {'store': 'numpy', 'transform': None, 'keep_last': None, 'queries': None, 'heads': None}
        """
        storage = _store.Storage(store, transform, keep_last, queries, heads, reduce, stream,
                                 grad, append)
        state = self._state
        with state.lock:
            previous = state.storage
            if stream is not None:
                streamed = _stream.open_writer(stream, append)
                if previous.stream is None:
                    self._in_memory = state.cache
            if previous.stream is not None and getattr(state.cache, "close", None):
                state.cache.close()
                if stream is None:
                    state.cache = self._in_memory
                    self._in_memory = None
            if stream is not None:
                state.cache = streamed
            state.storage = storage
            state.refresh()
        return previous.as_dict()

    @contextlib.contextmanager
    def capture(self, store=None, transform=None, keep_last=None, queries=None,
                heads=None, reduce=None, stream=None, grad=False, append=False):
        """Capture into a fresh cache for the duration of a ``with`` block.

        Activates capture and applies the storage settings (as in
        ``configure``) inside the block, then restores the previous state,
        settings and cache, even if the block raises.  The yielded cache holds
        exactly the captures made inside the block and stays valid afterwards.
        When the block ends, a ``CaptureWarning`` names what left nothing in
        it: attention kernels that ran with nothing capturing them, and
        watched functions that recorded nothing.

        ``stream='run.vz'`` writes each capture to that folder as it happens
        (one ``.npy`` file per value and an append-only index; under
        ``torch.distributed`` one index per rank) and keeps none in memory:
        the yielded cache reads them back lazily, each value a read-only
        memory map, and ``get_local.load('run.vz')`` reads the folder, even
        while it is being written.  Runs are never mixed unasked: a folder
        that holds captures already is refused with a ``VisualizerError``
        unless ``append=True``, which adds this block as a new run (numbered
        0, 1, ... in the order written; the yielded cache holds this run's
        values).  ``get_local.load('run.vz')`` reads every run, its
        ``.runs`` lists them and ``get_local.load('run.vz', run=-1)`` reads
        the latest alone.

        ``grad=True`` keeps each captured tensor itself, and after
        ``score.backward()`` its ``.grad`` is ``d score / d value``: for an
        attention map, exactly what autograd gives the probabilities of an
        eager attention (``P @ v``).  At the kernel seam the map is computed
        beside the fused kernel as a leaf of the graph that the kernel's output
        leads the loss to: the output, and every other gradient, are bit for
        bit those of a run without capture.  On an eager path (a preset's,
        or your own ``@get_local('attn')``) the tensor is the model's own,
        kept with ``retain_grad()``.  ``queries=`` and ``heads=`` keep the
        rows and heads of the map and of its gradient; ``transform=``,
        ``reduce=``, ``stream=`` and copying stores cannot receive a
        gradient and are refused.  With dropout in training, a seam map is
        the probabilities before dropout and its gradient that of the map
        after dropout (the kernel keeps its dropout mask).  The relevance
        maps of ``visualizer.attribution`` take these maps.

        >>> with get_local.capture(transform=lambda attn: attn.mean(1)) as cache:
        ...     model(x)
        >>> cache['Attention.forward']
        >>> with get_local.capture(queries=-1) as cache:   # the last token's row only
        ...     model.generate(**inputs, max_new_tokens=8)
        >>> with get_local.capture(reduce='rollout', queries=0) as cache:  # CLS rollout
        ...     model(x)
        >>> with get_local.capture(stream='run.vz') as cache:   # on disk, RAM stays flat
        ...     for batch in loader: model(batch)
        >>> with get_local.capture(grad=True) as cache:         # maps with their gradient
        ...     logits = model(x)
        >>> logits[0, logits[0].argmax()].backward()
        >>> cache['Attention.forward'][-1].grad.shape
        torch.Size([1, 6, 197, 197])
        >>> with get_local.capture(stream='run.vz', append=True):  # a second run, kept apart
        ...     model(x)
        >>> get_local.load('run.vz', run=-1)   # that run alone
        """
        storage = _store.Storage(store, transform, keep_last, queries, heads, reduce, stream,
                                 grad, append)
        state = self._state
        scoped = _stream.open_writer(stream, append) if stream is not None else _store.Cache()
        with state.lock:
            saved = (state.active, state.cache, state.storage, state.calls_missed,
                     state.unreached, state.unreached_modules)
            state.cache = scoped
            state.storage = storage
            state.calls_missed = {}
            state.unreached, state.unreached_modules = {}, {}
            state.set_active(True)
        failed = True
        try:
            yield scoped
            failed = False
        finally:
            with state.lock:
                missed, unreached, modules = (state.calls_missed, state.unreached,
                                              state.unreached_modules)
                (active, state.cache, state.storage, state.calls_missed, state.unreached,
                 state.unreached_modules) = saved
                state.set_active(active)
            if stream is not None:
                scoped.close()
            if not failed:
                state.report_silent(scoped, missed, unreached, modules)

    def by_module(self, model, cache=None):
        """Regroup captures from the methods of ``model``'s modules by module name.

        Returns ``{'blocks.3.attn': [values of its calls], ...}`` for the
        captures in ``cache`` (default: ``get_local.cache``) whose ``self`` is a
        submodule of ``model``, names as in ``model.named_modules()`` (the model
        itself is ``''``).  With several names captured from one function, the
        keys are ``'blocks.3.attn.q'`` and so on; when a module has several
        captured functions, the function name is added: ``'blocks.3.attn.forward'``.
        The maps of one request of a continuous batch (transformers'
        ``generate_batch``) are named with its id: ``'model.layers.0.self_attn[req_0]'``.

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
        numbers (the default storage makes tensors into arrays).  Under
        ``torch.distributed`` (``torchrun``: ``RANK``/``WORLD_SIZE`` set, or a
        process group initialised) each rank writes ``attention.rank<r>.npz``
        and ``attention.npz`` becomes a small manifest of the ranks, so no
        rank overwrites another's.  Returns the path written.

        >>> get_local.save('attention.npz')
        'attention.npz'
        """
        from . import storage

        return storage.save(self._state.cache if cache is None else cache, path)

    def load(self, path, rank=None, run=None):
        """Load what ``save`` or a stream wrote and return its cache (a dict of lists).

        ``path`` is an ``.npz`` file, the manifest of a run under
        ``torch.distributed`` (every rank's captures merged: each list holds
        rank 0's calls, then rank 1's, ...; a rank that saved nothing is
        named in a warning) or a stream folder (values read lazily, as
        read-only memory maps).  ``rank=r`` loads only process ``r``'s;
        ``run=k`` one run of a stream folder written with ``append=True``
        (``run=-1``: the latest; ``cache.runs`` lists them).

        >>> cache = get_local.load('attention.npz')
        >>> first = get_local.load('attention.npz', rank=0)
        >>> latest = get_local.load('run.vz', run=-1)
        """
        from . import storage

        return storage.load(path, rank, run)

    def __repr__(self):
        state = "active" if self.active else "inactive"
        return "<get_local {}: {} keys>".format(state, len(self.cache))


def _name_by_module(found, state):
    """Turn ``{(module name, key): values}`` into by_module's names (see there)."""
    key_info = {}
    for target in list(state.targets.values()):
        for key, name in zip(target.keys, target.names):
            key_info[key] = (target.qualname.rsplit(".", 1)[-1], name, len(target.names) > 1)
        if target.applied is not None:  # 'blocks.0.attn.applied' beside 'blocks.0.attn'
            key_info[target.applied.keys[0]] = (target.qualname.rsplit(".", 1)[-1],
                                                target.applied.SUFFIX, True)
    per_module = {}
    for module_name, key in found:
        key = split_request_key(key)[0]
        per_module.setdefault(module_name, set()).add(
            key_info.get(key, (key, None, False))[0])
    out = {}
    for (module_name, key), values in found.items():
        key, request = split_request_key(key)  # one request of a packed batch: 'name[req_0]'
        function, name, several = key_info.get(key, (key, None, False))
        parts = [module_name] if module_name else []
        if len(per_module[module_name]) > 1:
            parts.append(function)
        if several:
            parts.append(name)
        name = ".".join(parts)
        out[name if request is None else request_key(name, request)] = values
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
