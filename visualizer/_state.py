"""Capture at run time: the functions under capture, their code, the cache.

A ``Target`` is one original code object under capture, with the names it
captures and the functions that run it.  ``State`` installs a target by
assigning its rewritten code object to each function's ``__code__`` and
removes it by assigning the original back, so the function object (and every
reference to it, bound methods included) stays the same and, while capture
is off, runs exactly the code it was born with.  The recorders built by
``make_record`` are what rewritten code calls when it returns; they hand the
values to ``State.capture``, which dispatches events and stores.

Rewritten code finds its recorders by name, in the built-in namespace, under
names no one else uses (``__visualizer_record_7__``), rather than among its
constants: TorchDynamo cannot trace code whose constants hold functions (see
``integrations.compile``).  A name is bound while its code object lives, so a call still
running old code after a rewrite still finds the recorder it was made for.

Threads, with the GIL or without it (free-threaded CPython, PEP 703).  The
design does not lean on the GIL for atomicity of our own steps; what protects
what:

* ``State.lock`` (an ``RLock``) serialises every change to what is captured
  and how: ``targets`` and ``by_rewritten``, installing and removing code
  (the ``__code__`` assignments), ``active`` and ``fast`` with the
  ``switches`` they run (``set_active``, ``register``, ``unregister``,
  ``add_switch``, ``remove_switch``, ``close``, ``dynamo_imported``), and the
  swaps of ``cache`` and ``storage`` by ``GetLocal.configure`` and
  ``GetLocal.capture``.  Re-entrant, because a switch or an import callback
  may register while it is held.
* ``State.store_lock`` (a ``Lock``) makes the appends of one call one step:
  the values of a call's names, each with its source, land together, so the
  lists of a multi-name capture and ``cache.sources`` stay aligned whichever
  thread runs next.  It is held around the appends only, never while user
  code (a transform, an event handler) runs.
* Without a lock: the one-name, no-source fast path appends to one list
  (``list.append``, and ``dict.setdefault`` for a new key), which is atomic
  with the GIL and locks the object itself on a free-threaded build, so no
  call is lost.  Recorders read ``active``, ``fast``, ``cache`` and
  ``storage`` as single attribute reads of references that are only ever
  replaced whole, under ``State.lock``: a call racing a switch stores into
  the cache of one side of it, complete.  ``EventDispatcher`` keeps its
  listeners in a tuple replaced whole, so ``dispatch`` walks a snapshot;
  ``listen`` and ``remove`` themselves are not serialised (add handlers from
  one thread at a time).
* Kernel calls (``integrations.kernel``): the probabilities a kernel call
  leaves for the frame of a captured function wait in ``State.stash_local``,
  a ``threading.local``, so each thread sees only its own frames and no lock
  is needed; ``seam_off`` replaces it whole.  ``kernel._lock`` guards the
  seam's own tables (the states it serves, where torch's function was put).
* ``_imports`` has its own lock for the callbacks that wait for an import.

The code rewriting itself is the pure function ``_rewrite.rewrite``; the
public face is ``_get_local.GetLocal``.
"""
import builtins
import itertools
import sys
import threading
import types
import warnings
import weakref

from . import _imports, _rewrite
from .storage import memory as _store
from .integrations import compile as _compile
from ._errors import CaptureWarning, VisualizerError
from .events import AttentionEvent, Event, EventDispatcher, QKVEvent
from .integrations import kernel


class Target:
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
        self.recorders = None  # (record, record_locals) of the rewritten code
        self.bound = ()        # the built-in names the rewritten code loads them by
        self.slot = None       # set by integrations.compile.prepare for compiled graphs
        self.compiled_in = weakref.WeakSet()  # code of frames dynamo compiled with ours inlined
        self.functions = weakref.WeakSet()
        self.warned = set()
        self.explicit = False   # watched or decorated by the user, not only by a preset
        self.watched = False    # named to get_local.watch by the user
        self.attention = False  # its values are attention maps (queries=/heads= apply)
        self.maybe_unbound = False  # some return of the rewritten code may lack a name
        self.collect = False    # a preset's: every softmax the code stores (see ``collecting``)
        _compile.note_code(code, self)

    def takes_kernel(self):
        """Whether an attention kernel called by this function supplies its unbound name.

        A function whose fused path calls the kernel and whose eager path
        computes the probabilities itself (a softmax) leaves its variable
        unbound on the fused path: timm's ``Attention.forward`` and ``attn``.
        Such a function, watched by a preset or by the user, gets the kernel's
        probabilities instead (see ``State.take_stash``), under its own key.
        """
        return (self.maybe_unbound or self.collecting) and bool(self.names) and (
            self.attention or (self.explicit and "softmax" in self.code.co_names))

    @property
    def collecting(self):
        """Whether the rewritten code reports every softmax it stores, not ``names``.

        A preset's attention target in code that names its probabilities in
        its own way (``integrations.watch_softmax_outputs``) reports each
        softmax result as it is stored: every head of a loop over heads, and
        the probabilities before a later mixing of heads.  Once the user
        watches the function by name, it reports their names instead.
        """
        return self.collect and not self.explicit

    def runs(self, code):
        """Whether ``code`` is this target's original code or one of its rewritten codes."""
        return code is self.code or self.state.target_of(code) is self

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
        """The rewritten code, made on first use and kept while the target lives.

        Its recorders are bound in the built-in namespace until the code object
        is gone; they hold the state, so ``State.close`` lets go of every
        rewritten code when its ``GetLocal`` is discarded.
        """
        if self.rewritten is None:
            record = make_record(self.state, self)
            record_locals = make_record_locals(self)
            bound = _bind(record, record_locals)
            try:
                code, names = self.code, self.names
                if self.collecting:
                    code, names = _rewrite.collecting(code, _COLLECTED), (_COLLECTED,)
                code = _rewrite.rewrite(
                    code, names, _rewrite.Global(bound[0]),
                    _rewrite.Global(bound[1]), source=self.source,
                    overrides=self.overrides, builtin_locals=_rewrite.Global(_LOCALS))
            except BaseException:
                _unbind(bound)
                raise
            weakref.finalize(code, _unbind, bound)
            _compile.note_code(code, self)
            self.recorders, self.bound = (record, record_locals), bound
            self.maybe_unbound = bound[1] in code.co_names
            self.rewritten = code
        return self.rewritten

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

_BUILTINS = builtins.__dict__
_LOCALS = "__visualizer_locals__"  # the built-in locals(), under a name no module shadows
_COLLECTED = "__visualizer_softmax_outputs__"  # the list local of a collecting target
_serial = itertools.count(1)
_elsewhere = {}  # bound name -> other built-in namespaces it was also put in


def _bind(record, record_locals):
    """Put the recorders of one rewritten code in the built-in namespace; return the names."""
    n = next(_serial)
    names = ("__visualizer_record_{}__".format(n), "__visualizer_record_locals_{}__".format(n))
    _BUILTINS.setdefault(_LOCALS, locals)
    _BUILTINS[names[0]] = record
    _BUILTINS[names[1]] = record_locals
    return names


def _unbind(names):
    """Remove what ``_bind`` put (when the code that loads these names is gone)."""
    for name in names:
        _BUILTINS.pop(name, None)
        for namespace in _elsewhere.pop(name, ()):
            namespace.pop(name, None)


def _bind_for(function, names):
    """Also bind ``names`` where ``function`` looks up built-ins, if that is elsewhere.

    Functions made with a ``__builtins__`` of their own (sandboxes, some
    ``exec`` uses) do not see the interpreter's built-in namespace.
    """
    namespace = function.__globals__.get("__builtins__", builtins)
    if isinstance(namespace, types.ModuleType):
        namespace = namespace.__dict__
    if namespace is _BUILTINS or not isinstance(namespace, dict):
        return
    for name in names:
        namespace[name] = _BUILTINS[name]
        _elsewhere.setdefault(name, []).append(namespace)
    namespace.setdefault(_LOCALS, locals)


def make_record_locals(target):
    """Build the function rewritten code calls with ``locals()`` where a name may be unbound.

    A name missing from the frame's locals means that call records nothing,
    and the first time, a warning says why.
    """
    state = target.state

    def record_locals(frame_locals):
        try:
            missing = [n for n in target.names if n not in frame_locals]
            supplied = state.take_stash(sys._getframe(1)) if state.stashed else None
            if supplied and not missing and target.attention and not target.explicit and \
                    frame_locals[target.names[0]] is None:
                missing = [target.names[0]]  # None on a fused path: the kernel supplies it
            if missing:
                if state.active:
                    if supplied and len(missing) == 1:
                        state.capture_supplied(target, frame_locals, missing[0], supplied)
                        return
                    if target.explicit or not target.attention:
                        # A preset's eager variable is unbound on the fused path by
                        # design: the kernel seam captures that path.
                        target.warn_unbound(missing)
                return
            values = [frame_locals[n] for n in target.names]
            if values[0] is None and target.attention and not target.explicit:
                return  # a preset's variable on a fused path (see make_record)
            source = None if target.source is None else frame_locals.get(target.source)
            state.capture(target, source, values)
        except Exception as exc:  # never let a capture break the user's function
            state.capture_failed(target, exc)

    return record_locals


def _keys(qualname, names):
    """Cache keys, one per name: the qualname alone when there is one name."""
    if len(names) == 1:
        return (qualname,)
    return tuple("{}.{}".format(qualname, n) for n in names)


def make_record(state, target):
    """Build the function a rewritten code object calls where all names are bound.

    The rewritten code passes ``(source, *values)`` or ``values``.  With one
    name, the common case, a specialised function takes the shortest path when
    the state is ``fast`` (active, default storage, no event handlers): skip the
    conversion for types known not to be tensors, append.  Anything else goes
    through ``State.capture``.  Nothing here may raise into the user's code.
    """
    plain = _store.plain_types
    convert = _store.to_numpy
    weak = weakref.ref
    lock = state.store_lock
    failed = state.capture_failed
    # A preset's attention variable holds None where a library's fused path
    # sets it so (Falcon's ``attention_scores``): the kernel seam captures that
    # call, so None is no capture.
    skip_none = target.attention and not target.explicit
    if target.collecting:
        def record(*args):  # (maps) or (source, maps): the softmax results it stored
            try:
                source = args[0] if len(args) == 2 else None
                for probs in args[-1]:
                    state.capture(target, source, (probs,))
                if state.stashed:  # the kernel calls made inside it
                    for probs in state.take_stash(sys._getframe(1)) or ():
                        state.store(target, source, (probs,))
            except Exception as exc:
                failed(target, exc)
        return record
    if len(target.names) == 1:
        key = target.keys[0]
        if skip_none:
            def record(*args):  # (value) or (source, value)
                try:
                    source = args[0] if len(args) == 2 else None
                    if args[-1] is not None:
                        state.capture(target, source, args[-1:])
                    elif state.stashed:  # None on a fused path: the kernel's calls supply it
                        for probs in state.take_stash(sys._getframe(1)) or ():
                            state.store(target, source, (probs,))
                except Exception as exc:
                    failed(target, exc)
            return record
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
                            try:
                                values, refs = cache[key], cache.sources[key]
                            except KeyError:
                                values = cache.setdefault(key, [])
                                refs = cache.sources.setdefault(key, [])
                            values.append(value)
                            refs.append(ref)
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


class State:
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
        self.by_rewritten = {}  # id(rewritten code) -> (that code, Target)
        self.dynamo_hook = False
        self.jit = _compile.JitGuard(self.is_captured)
        self.jit_hook = False
        # (on, off): run as capture starts, stops
        self.switches = [(self.jit_on, self.jit.off), (self.seam_on, self.seam_off)]
        self.failed = set()
        self.kernel = False       # the 'kernel' preset: keep every attention kernel call
        self.kernel_missed = {}   # qualname -> kernel calls that nothing took, this capture
        self.seam_hook = False
        self.stash_local = threading.local()  # per thread: id(frame) -> (code, [probabilities])
        self.stashed = False

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
        self.store(target, source, values)

    # -- the attention kernel seam (``integrations.kernel``) ---------------------------

    def capture_kernel(self, key, qualname, source, call, owner=None):
        """Take one attention kernel call.

        ``owner``: None, or ``(target, frame, source)`` when a watched function
        takes the probabilities (its running ``frame``, whose unbound variable
        they supply when it returns, or None to capture into it now).
        Otherwise the call is stored under ``key`` when the 'kernel' preset is
        on.  ``QKVEvent`` and ``AttentionEvent`` go to the listeners either way;
        the probabilities are computed only if stored or read.  A call nothing
        takes is counted for the warning at the end of ``capture()``.
        """
        storage = self.storage
        target = frame = None
        if owner is not None:
            target, frame, source = owner
            key, qualname = target.keys[0], target.qualname
            if frame is not None and target.source is not None:
                source = frame.f_locals.get(target.source)
        store = storage.kind != "none" and (target is not None or self.kernel)
        listened = len(self.events)
        if not store and not listened:
            if target is None:
                self.kernel_missed[qualname] = self.kernel_missed.get(qualname, 0) + 1
            return
        # A preset's attention target selects queries= and heads= when it stores.
        selection = (None, None) if target is not None and target.attention else (
            storage.queries, storage.heads)
        graph = storage.kind == "graph"
        reduce = storage.reduce if target is None or not target.attention else None
        if store and reduce is not None:  # computed in blocks of rows, never in full
            probs = kernel.reduced(call, reduce, selection[0], selection[1], graph,
                                   storage.running, source)
        else:
            probs = call.probabilities(selection[0], selection[1], graph) if store else None
        if listened:
            self.events.dispatch(QKVEvent(key, qualname, call.query, call.key, call.value, source))
            if probs is not None and target is None and reduce is None:
                compute = (lambda: probs)
            else:
                def compute():
                    return call.probabilities(storage.queries, storage.heads, graph)
            self.events.dispatch(AttentionEvent(key, qualname, compute, source))
        if not store:
            return
        if target is None:
            self.store(_kernel_target(key, qualname, source is not None), source, (probs,))
        elif frame is not None:
            self.stash_kernel(frame, target, probs)
        else:
            self.store(target, source, (probs,))

    def stash_kernel(self, frame, target, probs):
        """Keep a kernel call's probabilities for the running ``frame`` of ``target``."""
        entries = getattr(self.stash_local, "entries", None)
        if entries is None:
            entries = self.stash_local.entries = {}
        entry = entries.get(id(frame))
        if entry is None or entry[0] is not frame.f_code:
            entries[id(frame)] = (frame.f_code, [probs])
        else:
            entry[1].append(probs)
        self.stashed = True

    def take_stash(self, frame):
        """The probabilities kernel calls made inside ``frame`` (now returning), or None."""
        entries = getattr(self.stash_local, "entries", None)
        if not entries:
            return None
        entry = entries.pop(id(frame), None)
        if entry is None or entry[0] is not frame.f_code:
            return None
        return entry[1]

    def capture_supplied(self, target, frame_locals, name, supplied):
        """Store one call of ``target`` per kernel call, the kernel giving ``name``.

        The kernel call dispatched its events already.
        """
        source = None if target.source is None else frame_locals.get(target.source)
        for probs in supplied:
            self.store(target, source, [probs if n == name else frame_locals[n]
                                        for n in target.names])

    def seam_on(self):
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "nn") and hasattr(torch.nn, "functional"):
            kernel.install(self)
            self.watch_dynamo()
        elif not self.seam_hook:
            self.seam_hook = True
            _imports.when_imported("torch", _weakly(self, State.seam_on_import))

    def seam_on_import(self, torch):
        self.seam_hook = False
        if self.active:
            kernel.install(self)
            self.watch_dynamo()

    def seam_off(self):
        kernel.uninstall(self)
        self.stash_local = threading.local()
        self.stashed = False

    def report_silent(self, cache, missed):
        """Warn about what ran while capturing into ``cache`` but left nothing there."""
        if missed:
            calls = sum(missed.values())
            where = ", ".join("{} x{}".format(q, n) for q, n in sorted(missed.items())[:6])
            warnings.warn(
                "visualizer: {} attention kernel call{} (scaled_dot_product_attention, from "
                "{}) ran while capturing, but nothing captured {}: call "
                "get_local.watch_attention() (or watch_attention(['kernel'])) before running "
                "the model to capture every attention map.".format(
                    calls, "s" if calls > 1 else "", where, "them" if calls > 1 else "it"),
                CaptureWarning, stacklevel=4)
        silent = []
        with self.lock:
            for target in self.targets.values():
                if target.watched and target.names and len(target.functions) and \
                        not any(cache.get(key) for key in target.keys):
                    silent.append("{}.{}".format(target.module, target.qualname))
        if silent:
            warnings.warn(
                "get_local: {} recorded nothing while capturing: {} never returned with "
                "{} bound (the model did not run {}, e.g. a library's eager attention "
                "function under its default fused path). get_local.watch_attention() "
                "captures attention wherever it is computed.".format(
                    ", ".join(sorted(silent)), "it" if len(silent) == 1 else "they",
                    "its variables" if len(silent) == 1 else "their variables",
                    "it" if len(silent) == 1 else "them"),
                CaptureWarning, stacklevel=4)

    def store(self, target, source, values):
        """Store one call's values (transform, convert, bound), aligned across names."""
        if not self.active:
            return
        keys = target.keys
        storage = self.storage
        if storage.kind == "none":
            return
        # Prepare every value before storing any, so a failing transform
        # leaves the lists of a multi-name capture aligned.
        prepared = [storage.prepare(key, value, target.attention, source)
                    for key, value in zip(keys, values)]
        cache = self.cache
        ref = _store.source_ref(source) if target.source is not None else _store.NO_SOURCE
        # One lock for the appends of one call, so that calls from other threads
        # cannot interleave between the lists of several names, or between a
        # value and its source.
        with self.store_lock:
            for key, value in zip(keys, prepared):
                cache.add(key, value, ref)
                if storage.keep_last is not None:
                    cache.trim(key, storage.keep_last)

    def capture_failed(self, target, exc):
        seen = (target.qualname, type(exc).__name__)
        if seen in self.failed:
            return
        self.failed.add(seen)
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
            if function.__code__ is new:
                return
            self.by_rewritten[id(new)] = (new, target)
            _bind_for(function, target.bound)
            dynamo = _compile.dynamo_loaded()
            traceable = dynamo and _compile.prepare(target, *target.recorders)
            function.__code__ = new
            if dynamo:
                if not traceable:
                    _compile.mark(function, new)
                _compile.recompile(target)
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
            _imports.when_imported("torch", _weakly(self, State.jit_on_import))

    def jit_on_import(self, torch):
        if self.active:
            self.jit.on(torch)

    def close(self):
        """Capture off for good and forget every target (its ``GetLocal`` is gone).

        The built-in namespace holds the recorders, which hold this state, for
        as long as their rewritten code lives, and the targets hold that code:
        without this, every discarded ``GetLocal`` would stay alive forever.
        """
        with self.lock:
            self.set_active(False)
            for target in self.targets.values():
                target.rewritten = None
            self.targets.clear()
            self.by_rewritten.clear()
            self.switches.clear()

    def watch_dynamo(self):
        """Follow torch.compile now if TorchDynamo is imported, else once it is."""
        if _compile.dynamo_loaded():
            _compile.watch_compiles()
        elif not self.dynamo_hook:
            self.dynamo_hook = True
            _imports.when_imported("torch._dynamo", _weakly(self, State.dynamo_imported))

    def dynamo_imported(self, module=None):
        """Prepare every installed rewritten code for torch.compile (see ``integrations.compile``)."""
        _compile.watch_compiles()
        with self.lock:
            self.dynamo_hook = False
            for target in list(self.targets.values()):
                if target.recorders is not None and _compile.prepare(target, *target.recorders):
                    continue
                for function in list(target.functions):
                    if self.target_of(function.__code__) is target and \
                            function.__code__ is not target.code:
                        _compile.mark(function, function.__code__)

    def uninstall(self, target, function):
        code = function.__code__
        if code is not target.code and self.target_of(code) is target:
            function.__code__ = target.code
            _compile.unmark(function)
            if _compile.dynamo_loaded():
                _compile.recompile(target)

    def register(self, function, names, source, overrides=None, explicit=True,
                 attention=False, collect=False):
        """Put ``function`` under capture of ``names``; install now if active.

        ``explicit``: the user asked for it (not only a preset); ``attention``:
        its values are attention maps; ``collect``: report every softmax it
        stores while only presets watch it (``Target.collecting``).

        If the code cannot be rewritten (``_rewrite.UnreadableCode``) while
        active, the error is raised and nothing is registered or changed.
        """
        with self.lock:
            code = function.__code__
            target = self.target_of(code)
            created = target is None
            if created:
                target = Target(self, code, function.__qualname__, names, source,
                                 function.__module__)
                self.watch_dynamo()
            saved = (target.names, target.keys, dict(target.overrides), target.rewritten,
                     target.collect)
            target.add_names(names)
            target.add_overrides(overrides)
            explicit = target.explicit or (explicit and bool(names))
            attention = target.attention or attention
            collect = target.collect or collect
            if (explicit, attention, collect) != (target.explicit, target.attention,
                                                  target.collect):
                target.rewritten = None  # its recorders depend on these (see make_record)
            target.explicit, target.attention, target.collect = explicit, attention, collect
            if self.active:
                try:
                    target.rewritten_code()
                except VisualizerError:
                    (target.names, target.keys, target.overrides, target.rewritten,
                     target.collect) = saved
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
                target.rewritten = None  # its code keeps our recorders bound: let it go
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


class _KernelKey:
    """What ``State.store`` needs to know of a kernel capture's key."""

    __slots__ = ("keys", "names", "qualname", "source", "attention")

    def __init__(self, key, qualname, has_source):
        self.keys = (key,)
        self.names = ("attn",)
        self.qualname = qualname
        self.source = "module" if has_source else None
        self.attention = False  # queries= and heads= were applied before computing


_kernel_keys = {}


def _kernel_target(key, qualname, has_source):
    found = _kernel_keys.get((key, has_source))
    if found is None:
        found = _kernel_keys[(key, has_source)] = _KernelKey(key, qualname, has_source)
    return found


def _weakly(state, method):
    """A callback for ``_imports`` that does not keep ``state`` alive."""
    ref = weakref.ref(state)

    def callback(module):
        alive = ref()
        if alive is not None:
            method(alive, module)

    return callback
