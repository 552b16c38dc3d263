"""What torch's compilers need from capture; nothing here imports torch itself.

* The kernel seam inside torch.compile: when dynamo traces the seam, it
  traces ``traced_call``, which notes at compile time who makes the call (the
  frames dynamo inlines, frozen) and puts one call of the ordered custom
  operator ``visualizer::attention_call`` beside the kernel; at run time the
  operator hands the call to the seam as an eager call.  The compiled model
  computes its output as it would without capture.

* torch.compile: TorchDynamo traces the rewritten code like any other (the
  rewrite loads its recorders by name, so its constants hold no functions).
  When it reaches a recorder, dynamo traces ``traced`` instead (the
  recorder's ``_torchdynamo_inline``, which dynamo itself uses to see through
  wrappers): a call of the custom operator ``visualizer::record``, registered
  as an ordered side effect, so that no compiler drops or reorders it.  The
  compiled graph calls it at run time with the real tensors, and it hands
  them to the state like an eager capture.  So captures work inside compiled
  graphs, ``fullgraph=True`` and the inductor backend included, and give the
  values the compiled model computed.  Where that cannot work (values that
  are not tensors, names that may be unbound, or a torch without custom
  operators or effects), the recorder runs eagerly, at a graph break: right
  values again, and with ``fullgraph=True`` dynamo's error carries our reason.
* TorchScript: ``torch.jit.script`` compiles a function from its source and
  ``torch.jit.trace`` records a graph; neither runs Python code afterwards, so
  nothing can be captured from the result.  While capture is on, both say so
  with a CaptureWarning when given something under capture.
"""
import functools
import itertools
import sys
import warnings
import weakref

from .. import _imports
from .._errors import CaptureWarning
from .._state import Extension
from . import kernel

_MARK = "_torchdynamo_disable"
_MESSAGE = "_torchdynamo_disable_msg"  # shown by dynamo when the graph break is an error
_OURS = "__visualizer_marked__"
_INLINE = "_torchdynamo_inline"  # dynamo traces this attribute's function instead

_TARGETS = weakref.WeakValueDictionary()  # slot -> Target, for the operator at run time
_SLOTS = weakref.WeakKeyDictionary()      # Target -> its slot
_COMPILED_IN = weakref.WeakKeyDictionary()  # Target -> code of frames dynamo compiled with it inlined
_SOURCES = weakref.WeakValueDictionary()  # id(source) -> source, noted while dynamo traces
_slots = itertools.count(1)
_support = None  # the helpers traced code calls once made, False if this torch cannot


_CODES = weakref.WeakValueDictionary()  # id(code) -> Target, original and rewritten codes
_watching = None  # the handle of our dynamo bytecode hook, False if this torch has none
_compiled_unseen = False  # dynamo compiled frames we could not see into


def dynamo_loaded():
    """Whether TorchDynamo is imported (nothing to prepare for before that)."""
    return hasattr(sys.modules.get("torch._dynamo"), "reset")


def note_code(code, target):
    """Remember that ``code`` belongs to ``target`` (see ``watch_compiles``)."""
    _CODES[id(code)] = target


def watch_compiles():
    """From now on, note which frames dynamo compiles with code of a target inlined.

    Dynamo does not guard on a function's ``__code__`` when it inlines a
    method (nn.Module.forward), so a graph compiled before capture started
    would go on running the original code, and one compiled while capturing
    would go on capturing.  ``recompile`` drops exactly those frames when a
    target's code changes.  Frames compiled before this runs are unknown:
    the first change after it drops every compiled frame.
    """
    global _watching, _compiled_unseen
    if _watching is not None:
        return
    from . import flex

    if not _prepare_traced_call(flex):  # a torch that cannot: say so when they are traced
        for code in flex.wrapper_codes():
            seam_code(code, flex.COMPILED_MESSAGE)
    try:
        from torch._dynamo import convert_frame
    except ImportError:  # pragma: no cover - every torch with dynamo has it
        _watching = False
        return
    # The compiled code objects dynamo still holds (``Tracker.seen_ids``);
    # unknown in a torch without them, so assume some.
    compiled = getattr(getattr(convert_frame, "output_codes", None), "seen_ids", None)
    _compiled_unseen = compiled is None or bool(compiled)
    _watching = convert_frame.register_bytecode_hook(_compiled)


def _compiled(code, new_code):
    """Dynamo's bytecode hook: ``code`` was just compiled; which targets did it trace?"""
    global _compiled_unseen
    try:
        # The output graph of this compilation, in the caller's frame: it lists
        # every code object traced, inlined ones included.
        traced = sys._getframe(1).f_locals["output"].traced_code
    except Exception:  # a torch that calls this hook differently
        _compiled_unseen = True
        return None
    for traced_code in traced:
        target = _CODES.get(id(traced_code))
        if target is not None and target.runs(traced_code):
            _COMPILED_IN.setdefault(target, weakref.WeakSet()).add(code)
        elif traced_code is _SEAM_CODE and _call_op is None:
            _compiled_through_seam(code)
        elif _call_op is None and _SEAMS.get(id(traced_code), (None,))[0] is traced_code:
            _compiled_through_seam(code, _SEAMS[id(traced_code)][1])
    return None


_SEAM_CODE = kernel.scaled_dot_product_attention.__code__
_SEAMS = {}  # id(code) -> (code, message): the seam's other wrappers (``seam_code``)
_seam_warned = set()


def seam_code(code, message):
    """Warn ``message`` (``{}``: the compiled function) once if dynamo traces ``code`` while capturing.

    For the wrappers the seam puts in place of other attention functions
    (``integrations.flex``), which capture nothing inside compiled graphs.
    """
    _SEAMS[id(code)] = (code, message)


def _compiled_through_seam(code, message=None):
    """Dynamo traced a seam where this torch cannot capture in compiled graphs; say so once."""
    if not kernel.serving():
        return
    if (message or "seam") in _seam_warned:
        return
    _seam_warned.add(message or "seam")
    if message is not None:
        warnings.warn(message.format(getattr(code, "co_name", "a function")), CaptureWarning,
                      stacklevel=2)
        return
    warnings.warn(
        "visualizer: torch.compile compiled {} with attention kernels while capture is on, "
        "and this torch has no effectful custom operators: inside its compiled graphs the "
        "kernel seam captures nothing (the compiled model runs "
        "torch's kernel as it is). Capture from the eager model, or watch the function "
        "that computes the attention on its eager path, e.g. get_local.watch("
        "'timm.layers.attention.Attention.forward', 'attn', overrides={{'fused_attn': "
        "False}}): such captures work inside compiled graphs.".format(
            getattr(code, "co_name", "a function")), CaptureWarning, stacklevel=2)


def recompile(target):
    """Make dynamo compile again the frames that inlined ``target``'s old code."""
    global _compiled_unseen
    torch = sys.modules["torch"]
    if _compiled_unseen:
        _compiled_unseen = False
        torch.compiler.reset()
        return
    reset_code = sys.modules["torch._dynamo.eval_frame"].reset_code
    for code in list(_COMPILED_IN.pop(target, ())):
        reset_code(code)


def prepare(target, record, record_locals):
    """Make ``target``'s recorders traceable by dynamo; False if this torch cannot.

    Called before rewritten code is installed, and for installed code when dynamo is imported.
    """
    if getattr(record, _INLINE, None) is not None:
        return True  # these recorders are prepared already
    support = _compile_support()
    if not support:
        return False
    if target not in _SLOTS:
        _SLOTS[target] = next(_slots)
        _TARGETS[_SLOTS[target]] = target
    setattr(record, _INLINE, support.traced_record(target, record))
    setattr(record_locals, _INLINE, support.traced_record_locals(target, record_locals))
    return True


def deliver(slot, source_id, values):
    """Run time of the operator: hand one call's tensors to their target's state."""
    target = _TARGETS.get(slot)
    if target is None:  # forgotten since this graph was compiled
        return
    state = target.state
    try:
        if not state.active:
            return
        # The compiled graph may reuse these buffers once the operator returns,
        # and a transform, an event handler or a storage that keeps tensors may
        # keep a view: give them copies.  The default storage copies anyway.
        if not state.fast:
            values = [v.detach().clone() for v in values]
        if state.storage.kind == "graph" and "graph" not in target.warned:
            target.warned.add("graph")
            warnings.warn(
                "get_local: {} ran inside a compiled graph, where store='graph' keeps "
                "tensors without the caller's autograd graph (gradients do not reach "
                "them). Capture from the eager model for gradient-weighted maps."
                .format(target.qualname), CaptureWarning, stacklevel=2)
        source = _SOURCES.get(source_id) if source_id else None
        state.capture(target, source, values)
    except Exception as exc:  # never let a capture break the user's model
        state.capture_failed(target, exc)


def _compile_support():
    """The ``_Support`` of this torch, made once; False if it has no effectful custom ops."""
    global _support
    if _support is None:
        try:
            _support = _Support(sys.modules["torch"])
        except Exception:  # an older torch: no custom operators or no effects
            _support = False
    return _support


class _Support:
    """The operator and the functions dynamo traces in place of our recorders."""

    def __init__(self, torch):
        from typing import List

        from torch._dynamo.comptime import comptime

        Tensor = torch.Tensor

        def record(values: List[Tensor], slot: int, source: int) -> None:
            deliver(slot, source, values)

        def attention_call(tensors: List[Tensor], site: int) -> None:
            deliver_call(site, tensors)

        self.op = _register(torch, record)
        self.call_op = _register(torch, attention_call, "attention_call")
        self.torch = torch
        self.comptime = comptime

    def traced_record(self, target, record):
        eager = self.disable(record, target, "a value that is not a tensor")
        emit, tensors = self.emitter(target), self.tensors
        if target.collecting:  # one list: every softmax the code stored (Target.collecting)
            applied = target.applied  # and the mixed maps ``@`` took, if any
            if applied is not None and applied not in _SLOTS:
                _SLOTS[applied] = next(_slots)
                _TARGETS[_SLOTS[applied]] = applied
            emit_applied = self.emitter(applied) if applied is not None else None

            def traced(*args):
                maps = args[-1]
                mixed = args[-2] if applied is not None else ()
                if not maps and not mixed:
                    # A preset's fused path: the seam captures nothing in a compiled
                    # graph (and says so, see _compiled_through_seam); no graph break.
                    return None
                if not tensors(maps) or not tensors(mixed):
                    return eager(*args)
                source = args[0] if target.source is not None else None
                for probs in maps:
                    emit(source, [probs])
                for probs in mixed:  # statically mixed: no identity test to trace
                    emit_applied(source, [probs])
            return traced
        if target.source is None:
            def traced(*values):
                if not tensors(values):
                    return eager(*values)
                emit(None, values)
        else:
            def traced(source, *values):
                if not tensors(values):
                    return eager(source, *values)
                emit(source, values)
        return traced

    def traced_record_locals(self, target, record_locals):
        names, source_name = target.names, target.source
        eager = self.disable(record_locals, target, "a variable that may be unbound or "
                             "is not a tensor")
        emit, tensors = self.emitter(target), self.tensors

        def traced(frame_locals):
            values = []
            for name in names:
                if name not in frame_locals:
                    if target.attention and not target.explicit:
                        # A preset's fused path: the seam captures nothing in a compiled
                        # graph (and says so, see _compiled_through_seam); no graph break.
                        return None
                    return eager(frame_locals)
                values.append(frame_locals[name])
            if not tensors(values):
                return eager(frame_locals)
            emit(None if source_name is None else frame_locals.get(source_name), values)
        return traced

    def disable(self, function, target, what):
        """``function``, run eagerly at a graph break, with our reason for fullgraph."""
        return self.torch._dynamo.disable(function, reason=(
            "visualizer's get_local is capturing from {} {}, which cannot be captured "
            "inside a compiled graph, so it is captured eagerly at a graph break. With "
            "fullgraph=True, stop capturing first (get_local.deactivate() or "
            "get_local.unwatch), or capture a tensor bound on every path".format(
                target.qualname, what)))

    def tensors(self, values):
        """Whether every value is a tensor (decided while dynamo traces)."""
        for value in values:
            if not isinstance(value, self.torch.Tensor):
                return False
        return True

    def emitter(self, target):
        """The traced body for tensors: one call of the operator."""
        op, comptime, slot = self.op, self.comptime, _SLOTS[target]

        def emit(source, values):
            token = 0
            if source is not None:
                token = id(source)  # dynamo guards on it: this graph is for this source
                comptime(_note_source)
            op(list(values), slot, token)
        return emit


def _note_source(ctx):
    """At compile time: remember the object the ``source`` local holds, by id."""
    try:
        variable = ctx.get_local("source")._i_will_not_complain_if_bc_breaks_VariableTracker()
        obj = variable.get_real_python_backed_value()
        _SOURCES[id(obj)] = obj
    except Exception:  # not weakly referable, or a torch that changed: no source
        pass


def _register(torch, function, name="record"):
    """Register ``function`` as an ordered, effectful custom operator ``visualizer::name``."""
    try:
        from torch._library.effects import EffectType
    except ImportError:  # pragma: no cover - torch releases before torch._library.effects
        from torch._higher_order_ops.effects import _EffectType as EffectType

    for n in itertools.count():
        qualified = "visualizer::" + name if n == 0 else "visualizer::{}_{}".format(name, n)
        try:
            op = torch.library.custom_op(qualified, mutates_args=())(function)
            break
        except RuntimeError:  # registered by another copy of this module
            if n > 20:
                raise

    @op.register_fake
    def _(*args):
        return None

    # Kept, and kept in order, by every compiler; before CustomOpDef.register_effect,
    # effects were registered on the operator overload.
    if hasattr(op, "register_effect"):
        op.register_effect(EffectType.ORDERED)
    else:  # pragma: no cover - torch releases before register_effect
        from torch._higher_order_ops.effects import _register_effectful_op

        _register_effectful_op(op._opoverload, EffectType.ORDERED)
    return op


def mark(function, code):
    """Tell dynamo to run ``code`` (installed on ``function``) without tracing it.

    The fallback when this torch cannot trace captures (see ``prepare``).
    """
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:
        return False
    eval_frame.skip_code(code)
    if not getattr(function, _MARK, False):
        setattr(function, _MARK, True)
        setattr(function, _MESSAGE, (
            "visualizer's get_local is capturing from {0}, which therefore runs eagerly, "
            "outside the compiled graph (this torch has no effectful custom operators). "
            "With fullgraph=True, stop capturing first (get_local.deactivate() or "
            "get_local.unwatch), or compile without fullgraph to capture from the "
            "compiled model".format(function.__qualname__)))
        function.__dict__[_OURS] = True
    return True


def unmark(function):
    """Undo ``mark`` on ``function`` (only what we set)."""
    if function.__dict__.pop(_OURS, False):
        function.__dict__.pop(_MARK, None)
        function.__dict__.pop(_MESSAGE, None)


class Compilers(Extension):
    """What torch's compilers need from one capture state, as an extension of it.

    torch.compile: every code under capture is noted (``note_code``) so that
    frames compiled with it inlined are compiled again when it changes
    (``recompile``), and rewritten code is made traceable (``prepare``) or,
    where this torch cannot, run outside the graph (``mark``), from the
    moment TorchDynamo is imported.  TorchScript: ``JitGuard`` warns while
    capturing.
    """

    def __init__(self, state):
        ref = weakref.ref(state)  # import callbacks hold this object: not the state
        self.jit = JitGuard(lambda function: ref() is not None and ref().is_captured(function))
        self.waiting = set()  # the modules an import callback waits for

    def start(self, state):
        if "torch" in sys.modules:
            self.jit.on()
        else:
            self.wait(state, "torch", self.torch_imported)
        self.follow_dynamo(state)

    def stop(self, state):
        self.jit.off()

    def target_made(self, target):
        note_code(target.code, target)
        self.follow_dynamo(target.state)

    def code_made(self, target, code):
        note_code(code, target)

    def installed(self, target, function):
        if dynamo_loaded():
            if not prepare(target, *target.recorders):
                mark(function, function.__code__)
            recompile(target)

    def removed(self, target, function):
        unmark(function)
        if dynamo_loaded():
            recompile(target)

    def wait(self, state, module, method):
        if module not in self.waiting:
            self.waiting.add(module)
            _imports.when_imported(module, _imports.weakly(state, method))

    def torch_imported(self, state, torch):
        self.waiting.discard("torch")
        if state.active:
            self.jit.on(torch)

    def follow_dynamo(self, state):
        """Follow torch.compile now if TorchDynamo is imported, else once it is."""
        if dynamo_loaded():
            watch_compiles()
        else:
            self.wait(state, "torch._dynamo", self.dynamo_imported)

    def dynamo_imported(self, state, module=None):
        """Prepare every installed rewritten code of ``state`` for torch.compile."""
        self.waiting.discard("torch._dynamo")
        watch_compiles()
        with state.lock:
            for target in list(state.targets.values()):
                if target.recorders is not None and prepare(target, *target.recorders):
                    continue
                for function in list(target.functions):
                    if state.target_of(function.__code__) is target and \
                            function.__code__ is not target.code:
                        mark(function, function.__code__)


class JitGuard:
    """While on, ``torch.jit.script`` and ``torch.jit.trace`` warn about captured code.

    ``captured(function)`` tells whether a plain function is under capture.
    """

    def __init__(self, captured):
        self.captured = captured
        self.saved = {}

    def on(self, torch=None):
        torch = torch or sys.modules.get("torch")
        jit = getattr(torch, "jit", None)
        if jit is None or self.saved:
            return
        for name, what in (("script", "compiles it to TorchScript"),
                           ("trace", "records a graph of one call")):
            original = getattr(jit, name)
            self.saved[name] = original
            setattr(jit, name, self._guard(original, name, what))

    def off(self):
        jit = getattr(sys.modules.get("torch"), "jit", None)
        for name, original in self.saved.items():
            if jit is not None and getattr(getattr(jit, name), "__wrapped__", None) is original:
                setattr(jit, name, original)
        self.saved = {}

    def _guard(self, original, name, what):
        guard = self

        @functools.wraps(original)
        def guarded(obj, *args, **kwargs):
            names = guard._captured_in(obj)
            if names:
                warnings.warn(
                    "torch.jit.{} {}, which then runs no Python code: calls to the "
                    "result capture nothing from {} (get_local captures only while "
                    "Python runs it{}). Capture from the eager model instead.".format(
                        name, what, ", ".join(sorted(names)),
                        "; this trace's own call is captured" if name == "trace" else ""),
                    CaptureWarning, stacklevel=2)
            return original(obj, *args, **kwargs)

        return guarded

    def _captured_in(self, obj):
        """Qualnames of captured functions that ``obj`` (module or function) runs."""
        functions = []
        modules = getattr(obj, "modules", None)
        if callable(modules):
            try:
                for module in modules():
                    functions.append(getattr(type(module), "forward", None))
            except Exception:  # not an nn.Module after all
                functions = []
        functions.append(getattr(obj, "__func__", obj))
        return {f.__qualname__ for f in functions
                if getattr(f, "__code__", None) is not None and self.captured(f)}


# -- kernel calls inside compiled graphs --------------------------------------------
#
# When dynamo traces the kernel seam, ``traced_call`` takes its place: at compile
# time it notes who makes the call (the stack of the frames dynamo is inlining,
# frozen: each frame's code and the locals ``kernel.locate`` reads) and the call's
# constant arguments, as a numbered site; the graph then calls the operator
# ``visualizer::attention_call`` with the call's tensors and the site's number.  At
# run time the operator rebuilds the call and hands it to the seam as an eager call
# (``kernel.deliver``), so the compiled model gives the maps, keys and sources of the
# eager one.  The kernel's own result is computed exactly as without capture.

_SITES = {}                # number -> _Site
_site_numbers = itertools.count(1)
_pending = []              # the site noted at compile time, until ``_take_site`` returns it
_grad_said = []


class _FrozenFrame:
    """What ``kernel.locate`` reads of a frame, kept from dynamo's trace of it.

    ``f_locals`` holds the frame's locals that were Python objects at compile
    time (modules, ints, ...), objects by weak reference where they can be.
    """

    __slots__ = ("f_code", "f_back", "_locals")
    frozen = True

    def __init__(self, code, values, back):
        self.f_code = code
        self.f_back = back
        self._locals = values

    @property
    def f_locals(self):
        values = {}
        for name, (weak, value) in self._locals.items():
            value = value() if weak else value
            if not weak or value is not None:
                values[name] = value
        return values


class _Site:
    """One kernel call site of a compiled graph: who calls, with which constant arguments."""

    __slots__ = ("frame", "make")

    def __init__(self, frame, make):
        self.frame = frame
        self.make = make


_CONSTANTS = (int, float, bool, str, bytes, type(None))


def _freeze_value(value):
    """``(weak, value)`` to keep of a local, or None when it is not worth keeping."""
    if isinstance(value, _CONSTANTS) or isinstance(value, tuple) and all(
            isinstance(item, _CONSTANTS) for item in value):
        return False, value
    try:
        return True, weakref.ref(value)
    except TypeError:
        return None


def _freeze(tx, skip):
    """The frames dynamo is inlining from ``tx`` outwards, frozen, minus the codes in ``skip``."""
    frames = []
    depth = 0
    while tx is not None and depth < kernel.MAX_DEPTH:
        code = tx.f_code
        if code not in skip:
            frames.append((code, tx))
        tx = getattr(tx, "parent", None)
        depth += 1
    frozen = None
    for code, tx in reversed(frames):
        kind, _, first = kernel.code_info(code)
        keep_all = kind == "adapter" or any(
            state.target_of(code) is not None for state in kernel.states())
        names = list(tx.symbolic_locals) if keep_all else [first] if first else []
        values = {}
        real = getattr(tx, "f_locals", None) if getattr(tx, "parent", None) is None else None
        for name in names:
            variable = tx.symbolic_locals.get(name)
            if variable is not None:
                value = _python_value(tx, variable)
            elif isinstance(real, dict) and name in real:
                # The frame dynamo compiles drops the locals it no longer needs: its real
                # ones hold them (the compiled module itself, often).
                value, variable = real[name], None
            else:
                continue
            if value is _NOTHING:
                continue
            kept = _freeze_value(value)
            if kept is not None:
                values[name] = kept
                if variable is not None:
                    _guard_identity(variable, value)
        frozen = _FrozenFrame(code, values, frozen)
    return frozen


_NOTHING = object()


def _python_value(tx, variable):
    """The Python object a dynamo variable stands for, or ``_NOTHING``."""
    try:
        value = variable.get_real_python_backed_value()
        if getattr(value, "__name__", None) != "NO_SUCH_SUBOBJ":
            return value
    except Exception:
        pass
    key = getattr(variable, "module_key", None)  # a module dynamo specialised on
    if key is not None:
        try:
            return tx.output.get_submodule(key)
        except Exception:
            pass
    return _NOTHING


def _guard_identity(variable, value):
    """Make the graph valid only for this module object (its maps name it as their source)."""
    torch = sys.modules["torch"]
    if not isinstance(value, torch.nn.Module):
        return
    source = getattr(variable, "source", None)
    if source is None:
        return
    try:
        from torch._dynamo.guards import GuardBuilder, install_guard

        install_guard(source.make_guard(GuardBuilder.ID_MATCH))
    except Exception:  # a torch whose guards changed: the graph is shared as before
        pass


def _make_sdpa(tensors, constants):
    mask = tensors[3] if len(tensors) > 3 else None
    return kernel.Call(tensors[0], tensors[1], tensors[2], mask, **constants)


def _make_computed(tensors, constants):
    return kernel.Computed(tensors[0], tensors[1], tensors[2], tensors[3], constants["name"])


def _note_site(ctx):
    """At compile time: note the site of the call being traced (``traced_call``'s kind)."""
    try:
        tx = ctx._i_will_not_complain_if_bc_breaks_InstructionTranslator()
        kind = tx.symbolic_locals["kind"].as_python_constant()
        if kind == "sdpa":
            constants = {}
            for name in ("dropout_p", "is_causal", "scale", "enable_gqa"):
                constants[name] = tx.symbolic_locals[name].as_python_constant()
            make = _make_sdpa
        else:  # maps the graph computes itself
            constants, make = {"name": kind}, _make_computed
        frame = _freeze(tx, _TRACED_CODES)

        def make(tensors, constants=constants, make=make):
            return make(tensors, constants)

        number = next(_site_numbers)
        _SITES[number] = _Site(frame, make)
        _pending.append(number)
    except Exception as exc:  # the call is left uncaptured, and that is said
        _pending.append(0)
        _uncaptured(exc)


def _take_site():
    """The number of the site ``_note_site`` just noted (a constant of the compiled graph)."""
    return _pending.pop() if _pending else 0


def _uncaptured(exc):
    if "site" not in _seam_warned:
        _seam_warned.add("site")
        warnings.warn(
            "visualizer: an attention kernel call inside a compiled graph could not be "
            "prepared for capture and captures nothing ({}: {}). Capture from the eager "
            "model.".format(type(exc).__name__, exc), CaptureWarning, stacklevel=2)


def traced_call(out, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                scale=None, enable_gqa=False):
    """What dynamo traces in place of the seam's capture: one call of the operator."""
    kind = "sdpa"  # noqa: F841 - read by _note_site at compile time
    _comptime(_note_site)
    site = _take_constant_site()
    if site:
        tensors = [query, key, value] if attn_mask is None else [query, key, value, attn_mask]
        _call_op(tensors, site)


def traced_flex_call(out, query, key, value, score_mod=None, block_mask=None, scale=None,
                     enable_gqa=False):
    """What dynamo traces in place of flex attention's capture: its maps, and the operator.

    The maps are computed in the graph (``flex.probabilities``, which dynamo
    traces with the call's ``score_mod`` and mask), all of them: ``score_mod``
    may read tensors that only the graph holds.
    """
    kind = "flex_attention"  # noqa: F841 - read by _note_site at compile time
    _comptime(_note_site)
    site = _take_constant_site()
    if site:
        call = _flex.FlexCall(query, key, value, score_mod, block_mask, scale, enable_gqa)
        _call_op([query, key, value, _flex.probabilities(call)], site)


def deliver_call(number, tensors):
    """Run time of ``visualizer::attention_call``: one kernel call of a compiled graph."""
    site = _SITES.get(number)
    if site is None or not kernel.serving():
        return
    try:
        if any(len(state.events) for state in kernel.states()):
            # Listeners may keep q, k and v; the compiled graph may reuse their buffers.
            tensors = [t.detach().clone() for t in tensors]
        call = site.make(tensors)
        if any(state.storage.grad for state in kernel.states()):
            # Leaves that ask for a gradient, as eager ones do; none reaches them (said below).
            with sys.modules["torch"].enable_grad():
                joins = kernel.deliver_traced(call, site.frame)
        else:
            joins = kernel.deliver_traced(call, site.frame)
    except Exception as exc:  # a capture must never break the model
        kernel.report(exc)
        return
    if joins and not _grad_said:
        _grad_said.append(True)
        warnings.warn(
            "visualizer: capture(grad=True) inside a compiled graph: the maps are captured "
            "but receive no gradient (the compiled graph's backward does not reach them). "
            "For relevance, capture from the eager model.", CaptureWarning, stacklevel=2)


_take_constant_site = _comptime = _call_op = _flex = None
_TRACED_CODES = frozenset()


def _prepare_traced_call(flex):
    """Make the seams call ``traced_call`` while dynamo traces them (once; False if it cannot)."""
    global _take_constant_site, _comptime, _call_op, _TRACED_CODES, _flex
    if _call_op is not None:
        return True
    support = _compile_support()
    if not support:
        return False
    _take_constant_site = sys.modules["torch"]._dynamo.assume_constant_result(_take_site)
    _comptime, _call_op = support.comptime, support.call_op
    _TRACED_CODES = frozenset(
        [traced_call.__code__, traced_flex_call.__code__,
         kernel.scaled_dot_product_attention.__code__] + flex.wrapper_codes())
    _flex = flex
    kernel.trace_with(traced_call)
    flex.trace_with(traced_flex_call)
    return True



