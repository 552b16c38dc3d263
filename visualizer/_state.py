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
``visualizer.integrations.compile``).  A name is bound while its code object lives, so a
call still running old code after a rewrite still finds the recorder it was made for.

What the libraries need from capture plugs in from outside: an ``Extension``
(``State.extend``) hears when capture starts and stops, when a function comes
under capture, and when its code is made, installed or removed.  The core
imports none of them: like pytest's built-in plugins, they are named in
``PLUGINS`` and imported by name the first time a state is used, each
module's ``plug_in(state)`` extending it (``visualizer.integrations``: the
attention kernel seam and torch's compilers).

Threads, with the GIL or without it (free-threaded CPython, PEP 703).  The
design does not lean on the GIL for atomicity of our own steps; what protects
what:

* ``State.lock`` (an ``RLock``) serialises every change to what is captured
  and how: ``targets`` and ``by_rewritten``, installing and removing code
  (the ``__code__`` assignments), ``active`` and ``fast`` with the
  ``switches`` they run (``set_active``, ``register``, ``unregister``,
  ``add_switch``, ``remove_switch``, ``extend``, ``close``), and the
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
* Attention calls delivered from outside the function (an attention kernel
  that an extension watches, see ``capture_call``): the probabilities a call
  leaves for the frame of a captured function wait in ``State.supplied``, a
  ``threading.local``, so each thread sees only its own frames and no lock is
  needed; ``drop_supplied`` replaces it whole.  Extensions guard their own
  tables.
* ``_imports`` has its own lock for the callbacks that wait for an import.

The code rewriting itself is the pure function ``_rewrite.rewrite``; the
public face is ``_get_local.GetLocal``.
"""
import builtins
import importlib
import itertools
import sys
import threading
import types
import warnings
import weakref

from . import _rewrite
from ._errors import CaptureWarning, VisualizerError
from .events import AttentionEvent, Event, EventDispatcher, QKVEvent
from .storage import memory as _store

# Modules whose ``plug_in(state)`` extends every state on its first use (see ``Extension``).
PLUGINS = ("visualizer.integrations",)


class Extension:
    """What code outside the core adds to capture; each hook is optional.

    Added with ``State.extend``.  The hooks run under ``State.lock``:

    * ``start(state)`` and ``stop(state)``: capture turns on, off;
    * ``target_made(target)``: a function's code comes under capture;
    * ``code_made(target, code)``: ``target``'s rewritten code was made;
    * ``installed(target, function)``: ``function`` now runs the rewritten code;
    * ``removed(target, function)``: ``function`` runs its original code again.
    """

    def start(self, state):
        pass

    def stop(self, state):
        pass

    def target_made(self, target):
        pass

    def code_made(self, target, code):
        pass

    def installed(self, target, function):
        pass

    def removed(self, target, function):
        pass


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
        self.functions = weakref.WeakSet()
        self.warned = set()
        self.explicit = False   # watched or decorated by the user, not only by a preset
        self.watched = False    # named to get_local.watch by the user
        self.attention = False  # its values are attention maps (queries=/heads= apply)
        self.maybe_unbound = False  # some return of the rewritten code may lack a name
        # A preset's: a predicate of loaded names; every result of a call to one
        # that the code stores is reported (see ``collecting``).
        self.collect = None
        # A preset's: ``shape(value, source, frame)`` gives each value it captures
        # the layout the library's integration promises (see ``State.shaped``).
        self.shape = None
        # A preset's: ``{method name: _rewrite.SOFTMAX or MIXED}``, what the calls
        # it makes return (see ``_rewrite.applied_maps``); and, once its code is
        # made, the ``Applied`` key of the mixed maps it multiplies with the values.
        self.mixes = None
        self.applied = None

    def takes_calls(self):
        """Whether an attention call made inside this function supplies its unbound name.

        A function whose fused path calls an attention kernel and whose eager
        path computes the probabilities itself leaves its variable unbound on
        the fused path: timm's ``Attention.forward`` and ``attn``.  Such a
        function, watched by a preset or by the user, gets the call's
        probabilities instead (see ``State.take_supplied``), under its own key.
        """
        return (self.maybe_unbound or self.collecting) and bool(self.names) and (
            self.attention or (self.explicit and self.state.computes_attention(self.code)))

    @property
    def collecting(self):
        """Whether the rewritten code reports every marked result it stores, not ``names``.

        A preset's attention target in code that names its probabilities in
        its own way reports each result of a marked call (a softmax, told by
        ``visualizer.integrations``) as it is stored: every head of a loop over
        heads, and the probabilities before a later mixing of heads.  Once the
        user watches the function by name, it reports their names instead.
        """
        return self.collect is not None and not self.explicit

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
            mixed = _rewrite.applied_maps(self.code, self.collect, self.mixes) \
                if self.collecting else ()
            self.applied = Applied(self, mixed) if mixed else None
            record = make_record(self.state, self)
            record_locals = make_record_locals(self)
            bound = _bind(record, record_locals)
            try:
                code, names = self.code, self.names
                if mixed:
                    code, names = _rewrite.collecting(
                        code, _COLLECTED, self.collect, _APPLIED, self.mixes), \
                        (_APPLIED, _COLLECTED)
                elif self.collecting:
                    code, names = _rewrite.collecting(code, _COLLECTED, self.collect), \
                        (_COLLECTED,)
                code = _rewrite.rewrite(
                    code, names, _rewrite.Global(bound[0]),
                    _rewrite.Global(bound[1]), source=self.source,
                    overrides=self.overrides, builtin_locals=_rewrite.Global(_LOCALS))
            except BaseException:
                _unbind(bound)
                raise
            weakref.finalize(code, _unbind, bound)
            self.recorders, self.bound = (record, record_locals), bound
            self.state.notify("code_made", self, code)
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


class Applied:
    """Where a collecting target keeps the mixed maps it multiplies with the values.

    Its key is the target's qualname and ``.applied`` (``'GPSA.forward.applied'``:
    ConViT's gated map; ``'TalkingHeadAttn.forward.applied'``: CaiT's map after
    the talking heads mix it), beside the target's own key, which keeps the
    softmaxes it stores (the parts).  ``State.store`` takes it like a target.
    """

    SUFFIX = "applied"

    def __init__(self, target, names):
        self.state = target.state
        self.target = target
        self.qualname = target.qualname
        self.names = (names[0],)
        self.keys = ("{}.{}".format(target.qualname, self.SUFFIX),)
        self.source = target.source
        self.attention = True
        self.explicit = False
        self.warned = target.warned

    @property
    def shape(self):
        return self.target.shape


_MISSING = object()

_BUILTINS = builtins.__dict__
_LOCALS = "__visualizer_locals__"  # the built-in locals(), under a name no module shadows
_COLLECTED = "__visualizer_collected__"  # the list local of a collecting target
_APPLIED = "__visualizer_applied__"  # its list of the mixed maps multiplied with values
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
            frame = _frame(target, state)
            supplied = state.take_supplied(frame) if state.supplying else None
            if supplied and not missing and target.attention and not target.explicit and \
                    frame_locals[target.names[0]] is None:
                missing = [target.names[0]]  # None on a fused path: an attention call supplies it
            if missing:
                if state.active:
                    if supplied and len(missing) == 1:
                        state.capture_supplied(target, frame_locals, missing[0], supplied, frame)
                        return
                    if target.explicit or not target.attention:
                        # A preset's eager variable is unbound on the fused path by
                        # design: the attention calls made there are captured.
                        target.warn_unbound(missing)
                return
            values = [frame_locals[n] for n in target.names]
            if values[0] is None and target.attention and not target.explicit:
                return  # a preset's variable on a fused path (see make_record)
            source = None if target.source is None else frame_locals.get(target.source)
            state.capture(target, source, values, frame)
        except Exception as exc:  # never let a capture break the user's function
            state.capture_failed(target, exc)

    return record_locals


def _same_map(value, softmax):
    """Whether ``value`` is ``softmax`` itself or a view of it (a reshape, as BLOOM's ``bmm`` takes).

    A branch not taken (a ``head_mask`` product) leaves the map that multiplies
    the values the stored softmax: it is kept once, under the softmax's key.
    """
    if value is softmax:
        return True
    pointer = getattr(value, "data_ptr", None)
    other = getattr(softmax, "data_ptr", None)
    if pointer is None or other is None:
        return False
    try:
        pointer, other = pointer(), other()
        if type(pointer) is not int or type(other) is not int:  # torch.fx Proxies, say
            return False
        return pointer == other and value.numel() == softmax.numel() and \
            value.dtype == softmax.dtype
    except Exception:  # not tensors after all
        return False


def _frame(target, state):
    """The frame of the function whose recorder calls this, where it is needed, else None.

    Needed to take the attention calls made inside it, and by a preset's
    ``shape``; otherwise never looked up: TorchDynamo cannot trace
    ``sys._getframe`` and warns where a recorder runs at a graph break.
    """
    if state.supplying or target.shape is not None:
        return sys._getframe(2)
    return None


def _keys(qualname, names):
    """Cache keys, one per name: the qualname alone when there is one name."""
    if len(names) == 1:
        return (qualname,)
    return tuple("{}.{}".format(qualname, n) for n in names)


def request_key(key, request):
    """The cache key of the maps of one request of a packed batch: ``'key[request]'``.

    Continuous batching (transformers' ``generate_batch``) computes the
    attention of several requests in one call; their maps are split per
    request (``Parts``) and each request's go under the key of the function
    that computed them, tagged with its id: ``'LlamaAttention.forward[req_0]'``.
    Qualnames hold no ``[``, so ``split_request_key`` gives both back.
    """
    return "{}[{}]".format(key, request)


def split_request_key(key):
    """``(key, request)`` of a key ``request_key`` made, else ``(key, None)``."""
    if isinstance(key, str) and key.endswith("]"):
        start = key.find("[")
        if start > 0:
            return key[:start], key[start + 1:-1]
    return key, None


class Parts(tuple):
    """One captured map that a preset's ``shape`` split by request: ``((request, map), ...)``.

    ``State.capture`` stores each part under ``request_key(key, request)``
    (see there), as if the function had computed it alone.
    """

    __slots__ = ()


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
    # sets it so (Falcon's ``attention_scores``): the attention call made there
    # is captured, so None is no capture.
    skip_none = target.attention and not target.explicit
    if target.collecting:
        applied = target.applied
        with_source = target.source is not None

        def record(*args):  # ([source,] [applied,] maps): the softmax results it stored
            try:
                source = args[0] if with_source else None
                frame = _frame(target, state)
                stored = args[-1]
                for probs in stored:
                    state.capture(target, source, (probs,), frame)
                if applied is not None:  # the maps ``@`` took, unless a softmax stored
                    for probs in args[-2]:
                        if not any(_same_map(probs, softmax) for softmax in stored):
                            state.capture(applied, source, (probs,), frame)
                if state.supplying:  # the attention calls made inside it
                    for probs in state.take_supplied(frame) or ():
                        state.store(target, source, (probs,), frame)
            except Exception as exc:
                failed(target, exc)
        return record
    if len(target.names) == 1:
        key = target.keys[0]
        if skip_none:
            def record(*args):  # (value) or (source, value)
                try:
                    source = args[0] if len(args) == 2 else None
                    frame = _frame(target, state)
                    if args[-1] is not None:
                        state.capture(target, source, args[-1:], frame)
                    elif state.supplying:  # None on a fused path: attention calls supply it
                        for probs in state.take_supplied(frame) or ():
                            state.store(target, source, (probs,), frame)
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

    def __init__(self, plugins=()):
        self.active = False
        self.fast = False
        self.cache = _store.Cache()
        self.storage = _store.Storage()
        self.events = EventDispatcher(on_change=self.refresh)
        self.lock = threading.RLock()
        self.store_lock = threading.Lock()
        self.targets = {}       # id(original code) -> _Target (which keeps the code alive)
        self.by_rewritten = {}  # id(rewritten code) -> (that code, Target)
        self.switches = []      # (on, off): run as capture starts, stops
        self.extensions = []    # Extension objects (see ``extend``)
        self.plugins = plugins  # module names still to plug in (see ``PLUGINS``)
        self.attention_marks = []  # predicates of names that compute attention (a softmax)
        self.failed = set()
        self.keep_calls = False   # keep every attention call that no watched function takes
        self.calls_missed = {}    # (call's name, qualname) -> calls nothing took, this capture
        # Attention run where capture cannot reach, counted by an extension this capture:
        # (what, cause and fix) -> calls; and weakref(module) -> ((what, cause and fix),
        # whether(module) computes attention), asked at the end only if nothing was captured.
        self.unreached = {}
        self.unreached_modules = {}
        self.calls_taken = 0  # attention calls delivered to capture_call, ever
        self.supplied = threading.local()  # per thread: id(frame) -> (code, [probabilities])
        self.supplying = False

    # -- extensions ---------------------------------------------------------------

    def plug_in(self):
        """Import the plugin modules not plugged in yet and let each extend this state."""
        with self.lock:
            plugins, self.plugins = self.plugins, ()
            for name in plugins:
                importlib.import_module(name).plug_in(self)

    def extend(self, extension):
        """Add an ``Extension``: it hears of every target and switch from now on (and now)."""
        with self.lock:
            self.extensions.append(extension)
            self.add_switch(lambda: extension.start(self), lambda: extension.stop(self))
            for target in list(self.targets.values()):
                extension.target_made(target)
                if target.rewritten is not None:
                    extension.code_made(target, target.rewritten)

    def notify(self, hook, *args):
        """Call ``hook`` (an ``Extension`` method's name) of every extension."""
        for extension in self.extensions:
            getattr(extension, hook)(*args)

    def computes_attention(self, code):
        """Whether ``code`` calls something that computes attention (see ``attention_marks``)."""
        return any(mark(name) for name in code.co_names for mark in self.attention_marks)

    def refresh(self):
        """Recompute ``fast``: can recorders skip events, transforms and bounds?"""
        self.fast = self.active and self.storage.is_default and not len(self.events)

    def capture(self, target, source, values, frame=None):
        """Dispatch events for one call's values, then store them (both shaped).

        ``frame``: the frame of the function they come from, returning (for
        ``shaped``), or None.
        """
        if not self.active:
            return
        values = self.shaped(target, source, values, frame)
        if len(values) == 1 and type(values[0]) is Parts:
            for request, part in values[0]:
                self.capture(_request_target(target, request), source, (part,))
            return
        keys = target.keys
        if len(self.events):
            for key, name, value in zip(keys, target.names, values):
                self.events.dispatch(Event(key, target.qualname, name, value, source))
        self.put(target, source, values)

    @staticmethod
    def shaped(target, source, values, frame=None):
        """``values`` in the layout the target's preset gives them (``Target.shape``).

        A library that computes a map in a layout of its own (heads merged into
        the batch axis) is known to its integration, which hands the target a
        ``shape(value, source, frame)``; the core applies it to what the preset
        captures, before events, selections, reductions and storage see it,
        and knows no library.  ``frame`` is the returning frame the values come
        from (None where there is none: a kernel call given to the target from
        outside, a compiled graph).  A variable the user names is stored as the
        code holds it.
        """
        shape = target.shape
        if shape is None or target.explicit:
            return values
        return [shape(value, source, frame) for value in values]

    # -- attention calls delivered from outside the function ---------------------------

    def capture_call(self, key, qualname, source, call, owner=None):
        """Take one attention call (an extension's, e.g. the kernel seam's).

        ``call`` has ``query``, ``key`` and ``value`` and computes its
        probabilities on demand: ``call.probabilities(queries, heads, graph)``
        and ``call.reduced(reduce, queries, heads, graph, running, owner)``.
        ``owner``: None, or ``(target, frame, source)`` when a watched function
        takes the probabilities (its running ``frame``, whose unbound variable
        they supply when it returns, or None to capture into it now).
        Otherwise the call is stored under ``key`` when ``keep_calls`` is on
        (the 'kernel' preset).  ``QKVEvent`` and ``AttentionEvent`` go to the
        listeners either way; the probabilities are computed only if stored
        or read.  A call nothing takes is counted for the warning at the end
        of ``capture()``.

        With ``grad=True`` storage the probabilities are a leaf of the autograd
        graph (``call.leaf_probabilities``) and this returns ``(call, probs,
        queries, heads)``: the extension joins them to the call's output so
        that they receive their gradient (``integrations.kernel.join``).
        Otherwise it returns None.
        """
        storage = self.storage
        self.calls_taken += 1
        target = frame = None
        if owner is not None:
            target, frame, source = owner
            key, qualname = target.keys[0], target.qualname
            if frame is not None and target.source is not None:
                source = frame.f_locals.get(target.source)
        store = storage.kind != "none" and (target is not None or self.keep_calls)
        listened = len(self.events)
        if not store and not listened:
            if target is None:
                missed = (getattr(call, "name", "attention"), qualname)
                self.calls_missed[missed] = self.calls_missed.get(missed, 0) + 1
            return
        # A preset's attention target selects queries= and heads= when it stores.
        selection = (None, None) if target is not None and target.attention else (
            storage.queries, storage.heads)
        graph = storage.kind == "graph"
        reduce = storage.reduce if target is None or not target.attention else None
        if store and reduce is not None:  # computed in blocks of rows, never in full
            probs = call.reduced(reduce, selection[0], selection[1], graph, storage.running,
                                 source)
        elif store and storage.grad:  # a leaf that the call's output will lead the loss to
            probs = call.leaf_probabilities(selection[0], selection[1])
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
            target = _call_target(key, qualname, source is not None)
            if reduce is None and storage.convert_owned is not None and call.owns_maps:
                # The call's maps are its own: kept as they are (no copy, no preparing).
                self.add(target, source, (storage.convert_owned(probs),))
            else:
                self.store(target, source, (probs,))
        elif frame is not None:
            self.supply(frame, target, probs)
        else:
            self.store(target, source, (probs,))
        if storage.grad:
            return call, probs, selection[0], selection[1]
        return None

    def supply(self, frame, target, probs):
        """Keep an attention call's probabilities for the running ``frame`` of ``target``."""
        entries = getattr(self.supplied, "entries", None)
        if entries is None:
            entries = self.supplied.entries = {}
        entry = entries.get(id(frame))
        if entry is None or entry[0] is not frame.f_code:
            entries[id(frame)] = (frame.f_code, [probs])
        else:
            entry[1].append(probs)
        self.supplying = True

    def take_supplied(self, frame):
        """The probabilities attention calls made inside ``frame`` (now returning), or None."""
        entries = getattr(self.supplied, "entries", None)
        if not entries:
            return None
        entry = entries.pop(id(frame), None)
        if entry is None or entry[0] is not frame.f_code:
            return None
        return entry[1]

    def drop_supplied(self):
        """Forget every probability waiting for a frame (capture stopped)."""
        self.supplied = threading.local()
        self.supplying = False

    def capture_supplied(self, target, frame_locals, name, supplied, frame=None):
        """Store one call of ``target`` per attention call, the call giving ``name``.

        The attention call dispatched its events already.
        """
        source = None if target.source is None else frame_locals.get(target.source)
        for probs in supplied:
            self.store(target, source, [probs if n == name else frame_locals[n]
                                        for n in target.names], frame)

    def report_silent(self, cache, missed, unreached=None, modules=None):
        """Warn about what ran while capturing into ``cache`` but left nothing there.

        ``unreached`` and ``modules``: what ``State.unreached`` and
        ``State.unreached_modules`` held when the capture ended.
        """
        unreached = dict(unreached or {})
        if modules and not any(len(values) for values in cache.values()):
            for ref, (cause, computes) in modules.items():
                module = ref()
                if module is not None and computes(module):
                    unreached[cause] = unreached.get(cause, 0) + 1
        for (what, why), calls in sorted(unreached.items()):
            warnings.warn("visualizer: no attention captured from {} ({} call{}): {}".format(
                what, calls, "s" if calls > 1 else "", why), CaptureWarning, stacklevel=4)
        if missed:
            calls = sum(missed.values())
            what = ", ".join(sorted({name for name, _ in missed}))
            where = ", ".join("{} x{}".format(q, n) for (_, q), n in sorted(missed.items())[:6])
            warnings.warn(
                "visualizer: {} attention kernel call{} ({}, from "
                "{}) ran while capturing, but nothing captured {}: call "
                "get_local.watch_attention() (or watch_attention(['kernel'])) before running "
                "the model to capture every attention map.".format(
                    calls, "s" if calls > 1 else "", what, where, "them" if calls > 1 else "it"),
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

    def store(self, target, source, values, frame=None):
        """Store one call's values (shape, transform, convert, bound), aligned across names."""
        self.put(target, source, self.shaped(target, source, values, frame))

    def put(self, target, source, values):
        """``store`` for values shaped already (see ``shaped``)."""
        if not self.active:
            return
        keys = target.keys
        storage = self.storage
        if storage.kind == "none":
            return
        # Prepare every value before storing any, so a failing transform
        # leaves the lists of a multi-name capture aligned.
        self.add(target, source, [storage.prepare(key, value, target.attention, source)
                                  for key, value in zip(keys, values)])

    def add(self, target, source, prepared):
        """Append one call's prepared values to the cache (see ``put``), with its source."""
        if not self.active:
            return
        cache = self.cache
        keep_last = self.storage.keep_last
        ref = _store.source_ref(source) if target.source is not None else _store.NO_SOURCE
        # One lock for the appends of one call, so that calls from other threads
        # cannot interleave between the lists of several names, or between a
        # value and its source.
        with self.store_lock:
            for key, value in zip(target.keys, prepared):
                cache.add(key, value, ref)
                if keep_last is not None:
                    cache.trim(key, keep_last)

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
            function.__code__ = new
            self.notify("installed", target, function)
        else:
            warnings.warn(
                "get_local: {} no longer runs the code it had when it was decorated "
                "(something else replaced its __code__), so it is not captured."
                .format(target.qualname), CaptureWarning, stacklevel=3)

    def is_captured(self, function):
        """Whether ``function`` runs code under capture (of at least one name)."""
        target = self.target_of(function.__code__)
        return target is not None and bool(target.names)

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

    def uninstall(self, target, function):
        code = function.__code__
        if code is not target.code and self.target_of(code) is target:
            function.__code__ = target.code
            self.notify("removed", target, function)

    def register(self, function, names, source, overrides=None, explicit=True,
                 attention=False, collect=None, shape=None, mixes=None):
        """Put ``function`` under capture of ``names``; install now if active.

        ``explicit``: the user asked for it (not only a preset); ``attention``:
        its values are attention maps; ``collect``: a predicate of loaded names
        (a softmax): report every result of such a call it stores while only
        presets watch it (``Target.collecting``); ``shape``: a preset's
        ``shape(value, source, frame)``, the layout its values are stored in
        (``State.shaped``); ``mixes``: what the calls it makes return, for
        the maps it multiplies with the values (``_rewrite.applied_maps``).

        If the code cannot be rewritten (``_rewrite.UnreadableCode``) while
        active, the error is raised and nothing is registered or changed.
        """
        with self.lock:
            if self.plugins:
                self.plug_in()
            code = function.__code__
            target = self.target_of(code)
            created = target is None
            if created:
                target = Target(self, code, function.__qualname__, names, source,
                                 function.__module__)
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
            target.shape = target.shape or shape
            if mixes and mixes != target.mixes:
                target.mixes = dict(target.mixes or {}, **mixes)
                target.rewritten = None
            if self.active:
                try:
                    target.rewritten_code()
                except VisualizerError:
                    (target.names, target.keys, target.overrides, target.rewritten,
                     target.collect) = saved
                    raise
            if created:
                self.targets[id(code)] = target
                self.notify("target_made", target)
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
            if active and self.plugins:
                self.plug_in()
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


class _CallKey:
    """What ``State.store`` needs to know of the key of an attention call nothing took."""

    __slots__ = ("keys", "names", "qualname", "source", "attention")
    shape = None  # the seam computes its calls in their layout already

    def __init__(self, key, qualname, has_source, attention=False, names=("attn",)):
        self.keys = (key,)
        self.names = names
        self.qualname = qualname
        self.source = "module" if has_source else None
        # False for a kernel call: queries= and heads= were applied before computing
        self.attention = attention


_call_keys = {}


def _call_target(key, qualname, has_source):
    found = _call_keys.get((key, has_source))
    if found is None:
        found = _call_keys[(key, has_source)] = _CallKey(key, qualname, has_source)
    return found


def _request_target(target, request):
    """What ``State.capture`` needs of ``target`` to store one request's part (``Parts``).

    Made anew each time, not kept in ``_call_keys``: a server sees requests without end.
    """
    return _CallKey(request_key(target.keys[0], request), target.qualname,
                    target.source is not None, target.attention, target.names[:1])
