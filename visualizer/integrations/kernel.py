"""The kernel seam: the attention of every model, taken where torch computes it.

Every attention that timm, transformers (``attn_implementation='sdpa'``, their
default), torch's own ``nn.MultiheadAttention`` and most hand-written modules
compute goes through one function, ``torch.nn.functional.
scaled_dot_product_attention``.  Its fused kernels never materialise the
probabilities, so nothing in Python ever holds them.  While capture is on,
``install`` puts ``scaled_dot_product_attention`` below in its place (in
``torch.nn.functional`` and in every module namespace that imported the name
itself); it runs torch's own kernel and returns exactly its result, so a
model's output is bit for bit what it would have been, and beside it computes
the probabilities as the kernel defines them::

    softmax(q kᵀ · scale + mask)

with ``is_causal`` (top-left aligned when query and key lengths differ),
boolean and additive masks with broadcasting, ``scale``, grouped-query
attention (``enable_gqa`` or a single key/value head) and, in training,
the probabilities before dropout (the kernel's dropout mask is random and
never leaves it).  Rows where every key is masked are zeros, as in the
kernel.  They are computed only when something wants them: the cache, a
listener of ``AttentionEvent`` reading its matrix, or a watched function
whose variable the fused path never bound.

Each call is captured under the ``__qualname__`` of the nearest method of a
``torch.nn.Module`` on the call stack (``'Attention.forward'``,
``'LlamaAttention.forward'``), with that module as its source, so
``get_local.by_module`` names it.  Libraries that reshape the kernel's input
for speed register an adapter here (``adapter``) that gives the kernel call
back its model-level meaning, e.g. transformers' ``pack_gqa``.

When capture is off, ``torch.nn.functional.scaled_dot_product_attention`` is
torch's own object again, everywhere it was replaced.  Inside
``torch.compile``d graphs the seam captures too: dynamo traces a call of an
operator beside the kernel, which hands the call to the seam at run time as
if it were eager, with the keys and sources the eager model gives
(``integrations.compile``: ``trace_with``, ``deliver_traced``).  A reference bound elsewhere (an attribute such as
``self.attn_fn = F.scaled_dot_product_attention`` made at import) is not
replaced.  Other attention functions go in and out with the seam through
``also_patch`` (a ``Patch`` each): ``integrations.flex`` serves flex attention.
"""
import sys
import threading
import types
import warnings
import weakref

from .. import _compat, _imports, attention
from .._errors import CaptureWarning
from .._state import Extension, request_key
from ._common import Preset, head_count, warn_unsplit

__all__ = ["Seam", "install", "uninstall", "adapter", "AttentionCall", "Call", "Patch",
           "also_patch", "deliver", "deliver_traced", "trace_with", "states", "report",
           "code_info", "Computed", "exporting",
           "probabilities", "reduced",
           "reduce_map", "calls_seen", "compiling", "leaf_probabilities", "map_gradient", "join",
           "PRESET"]

NAME = "scaled_dot_product_attention"

# The 'kernel' family: every kernel call nothing else takes is kept (the seam is
# in place whenever capture is on; nothing to wait for).
PRESET = Preset("kernel", "torch.nn.functional.scaled_dot_product_attention")
MAX_DEPTH = 48  # frames looked at above a kernel call

_lock = threading.RLock()
_states = weakref.WeakSet()  # active states the seam serves
_serving = ()                # the same, as weak references: what each call iterates
_original = None             # torch's own function (``_SDPA.original``, read on every call)
_adapters = {}               # id(code) -> (code, adapt(frame, call, state) -> (call, owner))
_code_info = {}              # id(code) -> (code, kind, qualname, first argument)
_failed = set()
_thread = threading.local()  # .calls: kernel calls this thread made while the seam served


class AttentionCall:
    """What every attention call that ``State.capture_call`` takes does besides its maps.

    A subclass names its arguments in ``__slots__`` (its constructor takes
    them by those names) and defines ``probabilities(queries, heads, grad)``;
    the leaf for ``join`` and the reductions come from there.
    """

    __slots__ = ()
    # Whether ``probabilities`` returns a tensor nothing else holds or writes, no view of
    # a larger one: storage may then keep it without a copy (``Storage.convert_owned``).
    owns_maps = False

    def replace(self, **changes):
        """A copy with some arguments changed."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return type(self)(**fields)

    def leaf_probabilities(self, queries=None, heads=None):
        """The probabilities as a leaf that ``join`` gives its gradient (see there)."""
        return leaf_probabilities(self, queries, heads)

    def reduced(self, reduce, queries=None, heads=None, grad=False, running=None, owner=None):
        """A reduction of this call's probabilities, never computed in full (see ``reduced``)."""
        return reduced(self, reduce, queries, heads, grad, running, owner)


class Call(AttentionCall):
    """The arguments of one kernel call, by name (what ``State.capture_call`` takes)."""

    __slots__ = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                 "enable_gqa", "request")
    name = NAME
    owns_maps = True  # ``probabilities`` computes a new tensor each time

    def __init__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False, request=None):
        self.query = query
        self.key = key
        self.value = value
        self.attn_mask = attn_mask
        self.dropout_p = dropout_p
        self.is_causal = is_causal
        self.scale = scale
        self.enable_gqa = enable_gqa
        # The request of a packed batch this part of a call belongs to (see ``adapter``).
        self.request = request

    def probabilities(self, queries=None, heads=None, grad=False):
        """The attention probabilities of this call (see ``probabilities``)."""
        return probabilities(self, queries, heads, grad)


class Computed(AttentionCall):
    """A call whose full probabilities were computed already (inside a compiled graph).

    ``integrations.compile`` gives flex attention's calls of a compiled graph
    this way: the graph computes the maps beside the kernel.  The same
    interface as ``Call``; selections are slices of ``probs``.
    """

    __slots__ = ("query", "key", "value", "probs", "name")
    attn_mask = None

    def __init__(self, query, key, value, probs, name):
        self.query = query
        self.key = key
        self.value = value
        self.probs = probs
        self.name = name

    def probabilities(self, queries=None, heads=None, grad=False):
        """The probabilities of the rows ``queries`` and the heads ``heads`` (all by default)."""
        torch = sys.modules["torch"]
        probs = self.probs if grad else self.probs.detach()
        for selection, axis, what in ((heads, -3, "heads"), (queries, -2, "queries")):
            if selection is not None:
                picked = attention.positions(selection, probs.shape[axis], what)
                if picked != list(range(probs.shape[axis])):
                    probs = probs.index_select(axis, torch.tensor(picked, device=probs.device))
        return probs


def probabilities(call, queries=None, heads=None, grad=False):
    """Return ``softmax(q kᵀ · scale + mask)`` of a kernel call, as the kernel defines it.

    ``queries`` keeps only those query rows and ``heads`` only those heads
    (an int, a slice or a sequence of ints; negative ints count from the end),
    computed from the selected rows of ``q`` and the selected heads, never
    from the whole matrix.  The result has the query's dtype (computed in
    float32 for float16 and bfloat16) and shape ``(..., heads, queries, keys)``.
    ``grad`` keeps it attached to the autograd graph.
    """
    torch = sys.modules["torch"]
    if bool(grad) == torch.is_grad_enabled():
        return _probabilities(torch, call, queries, heads)
    with torch.set_grad_enabled(bool(grad)):
        return _probabilities(torch, call, queries, heads)


def _probabilities(torch, call, queries, heads):
    q, k, mask = call.query, call.key, call.attn_mask
    length = q.shape[-2]
    head_index = group = k_heads = None  # (``_grouped_matmul`` reads the heads' layout itself)
    if heads is not None:
        q, k, head_index, group, _, k_heads = _pick_heads(torch, q, k, heads)
    rows = None  # the query positions kept, when not all
    if queries is not None:
        q, rows = _pick_rows(torch, q, queries)
    dtype = q.dtype
    work = torch.float32 if dtype is torch.float16 or dtype is torch.bfloat16 else dtype
    scale = call.scale
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if work is not dtype:
        q, k = q.to(work), k.to(work)
    scores = _grouped_matmul(torch, q, k, group, k_heads, scale)
    if call.is_causal:
        device = q.device
        positions = torch.arange(length, device=device) if rows is None else torch.tensor(
            rows, device=device)
        allowed = positions[:, None] >= torch.arange(k.shape[-2], device=device)[None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if rows is not None and mask.dim() >= 2 and mask.shape[-2] == length != 1:
            mask = mask[..., rows, :]
        if head_index is not None and mask.dim() >= 3 and mask.shape[-3] != 1:
            mask = mask.index_select(-3, head_index)
        if mask.dtype is torch.bool:
            scores = torch.where(mask, scores, float("-inf"))  # one op, not ~mask + fill
        else:
            scores = scores + mask.to(work)
    safe = getattr(torch, "_safe_softmax", None)
    if mask is None:
        # No row can be masked whole (causal rows keep their first key): the plain
        # softmax, about 1.8 x faster on CPU than the safe one (ViT-S: 2.9 against 5.1 ms).
        probs = torch.softmax(scores, -1)
    elif safe is not None:
        probs = safe(scores, -1)
    else:  # pragma: no cover - torch before 2.5: fully masked rows are zeros there too
        probs = torch.softmax(scores, -1).nan_to_num(0.0)
    return probs if probs.dtype is dtype else probs.to(dtype)


def _pick_heads(torch, q, k, heads):
    """``(q, k, head_index, group, q_heads, k_heads)``: the heads ``heads`` picks of a call.

    ``k`` is the key or the value (``(..., k_heads, S, D)``).  ``group`` is the
    number of query heads that read each key head (grouped-query attention),
    1 once the keys have been picked head by head; ``head_index`` is None when
    every head is kept.
    """
    q_heads = q.shape[-3] if q.dim() >= 3 else 1
    k_heads = k.shape[-3] if k.dim() >= 3 else 1
    group = q_heads // k_heads if k_heads not in (1, q_heads) and q_heads % k_heads == 0 else 1
    head_index = None
    if heads is not None and q.dim() >= 3:
        picked = attention.positions(heads, q_heads, "heads")
        if picked != list(range(q_heads)):
            head_index = torch.tensor(picked, dtype=torch.long, device=q.device)
            q = q.index_select(-3, head_index)
            if group > 1:  # query head h reads key head h // group
                k = k.index_select(-3, torch.div(head_index, group, rounding_mode="floor"))
                group = 1
            elif k_heads == q_heads:
                k = k.index_select(-3, head_index)
    return q, k, head_index, group, q_heads, k_heads


def _pick_rows(torch, q, queries):
    """``(q, rows)``: the query rows ``queries`` picks (``rows`` None when all are kept)."""
    length = q.shape[-2]
    if type(queries) is int and -length <= queries < length:  # one row, the common case
        if length == 1:
            return q, None
        first = queries % length
        return q.narrow(-2, first, 1), [first]
    picked = attention.positions(queries, length, "queries")
    if picked == list(range(length)):
        return q, None
    first = picked[0]
    if picked == list(range(first, first + len(picked))):
        return q.narrow(-2, first, len(picked)), picked  # a view: no index, no copy
    return q.index_select(-2, torch.tensor(picked, dtype=torch.long, device=q.device)), picked


def _grouped_matmul(torch, a, b, group=None, k_heads=None, scale=1.0):
    """``a @ bᵀ · scale`` per head, ``group`` query heads sharing each of ``b``'s ``k_heads``.

    ``a`` is ``(..., q_heads, L, D)`` and ``b`` ``(..., k_heads, S, D)`` (a
    key or a value, not transposed); ``group`` and ``k_heads`` as
    ``_pick_heads`` gives them (read from the shapes when None).  ``b`` is
    never repeated: the rows of the query heads that read one head of ``b``
    are stacked, ``(n · kv, group · L, D) @ (n · kv, D, S)``, one plain
    batched matmul with ``scale`` as its factor (``baddbmm``: on a decoding
    step about a third of a broadcast matmul after a multiplication).
    Shapes that broadcast against each other take ``matmul``.
    """
    shape, b_shape = a.shape, b.shape
    if len(shape) >= 3 and len(b_shape) == len(shape) and shape[:-3] == b_shape[:-3]:
        per_head = shape[-3] // b_shape[-3]  # ``group``, or 1 once heads were picked
        if per_head * b_shape[-3] == shape[-3]:
            depth, keys = shape[-1], b_shape[-2]
            out = torch.baddbmm(_zero(torch, a), a.reshape(-1, per_head * shape[-2], depth),
                                b.reshape(-1, keys, depth).transpose(1, 2), beta=0,
                                alpha=scale)
            return out.view(*shape[:-1], keys)  # (a Size + a tuple costs 1.4 us more)
    if group is None:
        _, _, _, group, _, k_heads = _pick_heads(torch, a, b, None)
    b = b.transpose(-2, -1)
    if group == 1:
        out = torch.matmul(a, b)
    else:
        out = torch.matmul(a.reshape(shape[:-3] + (k_heads, group * shape[-2], shape[-1])), b)
        out = out.reshape(shape[:-3] + (k_heads * group, shape[-2], b.shape[-1]))
    return out if scale == 1.0 else out * scale


_zeros = {}  # (dtype, device) -> a zero-dimensional tensor: ``baddbmm``'s ignored input


def _zero(torch, like):
    """A zero-dimensional tensor of ``like``'s dtype and device.

    Kept for the next call when ``like`` is a plain tensor outside a compiler's
    tracing (never a fake tensor or a subclass, whose mode must make its own).
    """
    if type(like) is not torch.Tensor or torch.compiler.is_compiling():
        return like.new_zeros(())
    found = _zeros.get((like.dtype, like.device))
    if found is None:
        found = _zeros[(like.dtype, like.device)] = like.new_zeros(())
    return found


# -- installing the seam --------------------------------------------------------------


class Seam(Extension):
    """The seam as an extension of one capture state: in place while the state captures.

    Before torch is imported there is nothing to replace: the seam waits for
    the import (``visualizer._imports``) and goes in then, if still capturing.
    """

    def __init__(self):
        self.waiting = False

    def start(self, state):
        torch = sys.modules.get("torch")
        if torch is not None and hasattr(torch, "nn") and hasattr(torch.nn, "functional"):
            install(state)
        elif not self.waiting:
            self.waiting = True
            _imports.when_imported("torch", _imports.weakly(state, self.torch_imported))

    def torch_imported(self, state, torch):
        self.waiting = False
        if state.active:
            install(state)

    def stop(self, state):
        uninstall(state)
        state.drop_supplied()


def install(state):
    """Serve ``state`` from now on; put the seam in place if it is not (torch must be imported)."""
    global _is_compiling, _Tensor, _Module, _serving
    with _lock:
        _states.add(state)
        _serving = tuple(weakref.ref(s) for s in _states)
        _patch()
        torch = sys.modules.get("torch")
        if torch is not None:  # read once here, not on every call
            _is_compiling = getattr(getattr(torch, "compiler", None), "is_compiling",
                                    _is_compiling)
            _Tensor = torch.Tensor
            _Module = torch.nn.Module


def uninstall(state):
    """Stop serving ``state``; when no state is left, torch's own function goes back everywhere."""
    global _serving
    with _lock:
        _states.discard(state)
        _serving = tuple(weakref.ref(s) for s in _states)
        if not len(_states):
            _unpatch()


def installed():
    """Whether ``torch.nn.functional.scaled_dot_product_attention`` is the seam now."""
    functional = sys.modules.get("torch.nn.functional")
    return functional is not None and getattr(functional, NAME, None) is scaled_dot_product_attention


def serving():
    """Whether some active capture is served by the seam now."""
    return any(state.active for state in list(_states))


def original():
    """torch's own ``scaled_dot_product_attention`` (None before torch was seen)."""
    return _original


def _patch():
    global _original
    first = _SDPA.original is None
    if not _SDPA.patch():
        return
    if first:
        _original = _SDPA.original
        _script_as_the_kernel()
    for patch in _PATCHES:
        patch.patch()


def _script_as_the_kernel():
    """Make TorchScript compile a call of the seam as the kernel's own operator.

    ``torch.jit.script`` resolves ``F.scaled_dot_product_attention`` when it
    compiles a model; meeting the seam (a Python function taking ``*args``) it
    would fail.  Registered like torch's own function, the scripted model calls
    ``aten::scaled_dot_product_attention`` and captures nothing, as TorchScript
    never runs Python (``integrations.compile.JitGuard`` says so).
    """
    builtins = sys.modules.get("torch.jit._builtins")
    register = getattr(builtins, "_register_builtin", None)
    if register is not None:
        try:
            register(scaled_dot_product_attention, "aten::scaled_dot_product_attention")
        except Exception:  # pragma: no cover - a torch whose jit tables changed
            pass


def _unpatch():
    _SDPA.unpatch()
    for patch in _PATCHES:
        patch.unpatch()


class Patch:
    """One library function replaced by ``wrapper`` while the seam is in place.

    The function is replaced in its ``module`` and in every module namespace
    that imported it by name (``from torch.nn.functional import
    scaled_dot_product_attention``), except torch's private modules, ours and
    those starting with one of ``skip``.  With ``compiled``, a global that
    holds ``torch.compile(function)`` is replaced too, by ``compiled(that
    global)``.  ``patch()`` returns False while ``module`` is not imported
    (nothing to replace yet).  The seam's own patches are ``kernel``'s SDPA
    and those given to ``also_patch``.
    """

    def __init__(self, module, name, wrapper, skip=(), compiled=None):
        self.module = module
        self.name = name
        self.wrapper = wrapper
        self.skip = ("torch._", "visualizer.") + tuple(skip)
        self.compiled = compiled
        self.original = None  # the library's own function, once seen
        self.holders = []     # (namespace, name, what it held, what replaces it)
        self.scanned = {}     # module name -> module, namespaces already looked through
        self.mark = None      # (module count, last module's name, its id) at the last scan

    def patch(self):
        """Put the wrappers in place everywhere the original is bound; False if not importable yet."""
        current = getattr(sys.modules.get(self.module), self.name, None)
        if current is None:
            return False
        if self.original is None:
            self.original = current
        self.scan()
        for namespace, name, original, wrapper in self.holders:
            if namespace.get(name) is original:
                namespace[name] = wrapper
        return True

    def unpatch(self):
        """Put the originals back wherever a wrapper is."""
        if self.original is None:
            return
        self.scan()  # modules imported while capturing may hold the wrapper
        for namespace, name, original, wrapper in self.holders:
            if namespace.get(name) is wrapper:
                namespace[name] = original

    def scan(self):
        """Note each global that holds the original or the wrapper, in modules not seen yet."""
        modules = sys.modules
        # Nothing imported or re-imported since the last scan (an import, or a module
        # deleted and imported again, changes the last entry): nothing new to look at.
        last = next(reversed(modules), None)
        mark = (len(modules), last, id(modules.get(last)))
        if mark == self.mark:
            return
        original, wrapper, skip = self.original, self.wrapper, self.skip
        for name, module in list(modules.items()):
            if module is None or self.scanned.get(name) is module:
                continue
            self.scanned[name] = module
            if name.startswith(skip):
                continue
            namespace = getattr(module, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for attr, value in list(namespace.items()):
                if value is original or value is wrapper:
                    self.holders.append((namespace, attr, original, wrapper))
                elif self.compiled is not None and type(value) is types.FunctionType and \
                        value.__dict__.get("_torchdynamo_orig_callable") is original:
                    self.holders.append((namespace, attr, value, self.compiled(value)))
        self.mark = mark


_PATCHES = []  # more functions that the seam replaces while it is in place (``also_patch``)


def also_patch(patch):
    """Put ``patch`` (a ``Patch``) in and out with the seam: another attention function served.

    ``integrations.flex`` gives flex attention this way; its wrappers deliver
    their calls with ``deliver``.  Applied now if the seam is in place.
    """
    with _lock:
        if patch not in _PATCHES:
            _PATCHES.append(patch)
        if len(_states):
            patch.patch()


def adapter(code, adapt):
    """Give calls made from ``code`` (a frame on the stack above the kernel) to ``adapt``.

    ``adapt(frame, call, state)`` returns ``(call, owner)``: the call as the
    model means it (e.g. transformers' packed grouped-query heads unpacked),
    and ``None`` or ``(target, source)``, a watched function to capture the
    probabilities into instead of the kernel's own key.  A call that packs
    several requests (continuous batching) may come back as a list of calls,
    one per request, each with its ``request`` set: each is captured under
    ``_state.request_key(key, request)`` (the watched function's ``owner``
    and ``capture(grad=True)`` do not apply to them).
    """
    _adapters[id(code)] = (code, adapt)


# -- the seam itself ------------------------------------------------------------------


def scaled_dot_product_attention(query, key, value, *args, **kwargs):
    """torch's ``scaled_dot_product_attention``, also giving its probabilities to visualizer.

    Returns exactly what torch's own function returns for these arguments
    (that function computes it); see ``visualizer.integrations.kernel``.
    """
    out = _original(query, key, value, *args, **kwargs)
    if _is_compiling():
        if _traced is not None and not exporting():
            _traced(out, query, key, value, *args, **kwargs)
        return out
    if isinstance(out, _Tensor):  # not while torch.fx traces (a Proxy)
        _thread.calls = getattr(_thread, "calls", 0) + 1
        try:
            joins = _seen(sys._getframe(1), Call(query, key, value, *args, **kwargs))
            if joins:
                return join(out, joins)
        except Exception as exc:  # a capture must never break the model
            report(exc)
    return out


_SDPA = Patch("torch.nn.functional", NAME, scaled_dot_product_attention)
_is_compiling = bool     # torch.compiler.is_compiling, once torch is seen (bool() is False)
_Tensor = ()             # torch.Tensor, once torch is seen (nothing is an instance of ())
_Module = None           # torch.nn.Module, the same


def deliver(frame, call, out):
    """Give ``call``, made by the code of ``frame``, to every active capture; return ``out``.

    For the wrappers of other attention functions (``also_patch``): ``call``
    has the interface of ``Call`` and ``out`` is the attention output that
    torch computed, returned as it is, or joined to the maps under
    ``capture(grad=True)`` (see ``join``).  A capture that fails warns once
    and never breaks the model.
    """
    _thread.calls = getattr(_thread, "calls", 0) + 1
    try:
        joins = _seen(frame, call)
        if joins:
            return join(out, joins)
    except Exception as exc:  # a capture must never break the model
        report(exc)
    return out


_traced = None  # what dynamo traces in place of a capture (``integrations.compile``)


def trace_with(function):
    """Have the seam call ``function(out, query, key, value, ...)`` while dynamo traces it.

    ``integrations.compile.traced_call`` puts a call of its operator in the
    graph there, which captures at run time (see ``deliver_traced``).
    """
    global _traced
    _traced = function


def exporting():
    """Whether ``torch.export`` is tracing the code running now (nothing is captured there)."""
    compiler = getattr(sys.modules.get("torch"), "compiler", None)
    is_exporting = getattr(compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


def states():
    """The capture states the seam serves now."""
    return list(_states)


def deliver_traced(call, frame):
    """Capture ``call``, made below ``frame`` (a frame, or one frozen at compile time).

    Returns the maps a ``grad=True`` capture would join to the call's output
    (see ``join``), or None.  A frozen frame (``integrations.compile``) is
    not running: a watched function that takes the call gets its maps now.
    """
    _thread.calls = getattr(_thread, "calls", 0) + 1
    return _seen(frame, call)


def compiling():
    """Whether torch's compilers are tracing the code running now (capture passes through)."""
    torch = sys.modules.get("torch")
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return is_compiling is not None and is_compiling()


def calls_seen():
    """How many kernel calls this thread has made through the seam while it served a capture.

    A library's module that captures a forward's maps itself where no kernel
    call is made (``integrations.torch``) compares the count before and after
    the forward, to leave the maps to the seam where it took them.
    """
    return getattr(_thread, "calls", 0)


def report(exc):
    """Warn once per distinct error that capturing a kernel call failed (the model runs on)."""
    seen = (type(exc).__name__, str(exc))
    if seen in _failed:
        return
    _failed.add(seen)
    warnings.warn(
        "visualizer: capturing an attention kernel call failed and that call recorded "
        "nothing: {}: {}".format(type(exc).__name__, exc), CaptureWarning, stacklevel=3)


def _seen(frame, call):
    """Deliver a call to every active state; return the maps that must join the graph."""
    joins = None
    for ref in _serving:
        state = ref()
        if state is not None and state.active:
            joined = _deliver(state, frame, call)
            if joined is not None:
                joins = (joins or []) + [joined]
    return joins


def code_info(code):
    """Return (kind, qualname, first argument) of a code object: 'adapter', 'method' or 'other'."""
    entry = _code_info.get(id(code))
    if entry is not None and entry[0] is code:
        return entry[1:]
    if id(code) in _adapters and _adapters[id(code)][0] is code:
        kind = "adapter"
    elif code.co_argcount >= 1 and not code.co_filename.replace("\\", "/").endswith(
            "torch/nn/modules/module.py"):
        kind = "method"
    else:
        kind = "other"
    info = (kind, _compat.code_qualname(code), code.co_varnames[0] if code.co_argcount else None)
    if kind == "method" and info[1] is not None and not _in_class(info[1]):
        info = ("other",) + info[1:]
    _code_info[id(code)] = (code,) + info
    return info


def _in_class(qualname):
    parts = qualname.split(".")
    return len(parts) >= 2 and parts[-2] != "<locals>"


def locate(frame, call, state):
    """Find who a kernel call belongs to, walking up from its caller's ``frame``.

    Returns ``(call, owner, key, qualname, source)``: the call after any
    adapter, ``owner`` a ``(target, frame or None, source)`` when a watched
    function takes the probabilities, and otherwise the key (the qualname of
    the nearest method of an ``nn.Module``, or the kernel's name) and source.
    """
    module_type = _Module or sys.modules["torch"].nn.Module
    depth = 0
    while frame is not None and depth < MAX_DEPTH:
        code = frame.f_code
        kind, qualname, first = code_info(code)
        target = state.target_of(code)
        if target is not None and target.takes_calls():
            return call, (target, frame, None), None, None, None
        if kind == "adapter":
            call, owner = _adapters[id(code)][1](frame, call, state)
            if owner is not None:
                return call, (owner[0], None, owner[1]), None, None, None
        elif kind == "method":
            owner_object = frame.f_locals.get(first)
            if isinstance(owner_object, module_type):
                if qualname is None:  # before 3.11
                    qualname = _compat.code_qualname(code, owner_object)
                    if qualname is not None:
                        _code_info[id(code)] = (code, kind, qualname, first)
                if qualname is not None and _in_class(qualname):
                    return call, None, qualname, qualname, owner_object
        frame = frame.f_back
        depth += 1
    return call, None, call.name, call.name, None


def _deliver(state, frame, call):
    call, owner, key, qualname, source = locate(frame, call, state)
    if isinstance(call, list):  # one call per request of a packed batch (see ``adapter``)
        for part in call:
            state.capture_call(request_key(key, part.request), qualname, source, part)
        return None
    if owner is not None and getattr(owner[1], "frozen", False):
        target, frozen, _ = owner
        owner = (target, None, frozen.f_locals.get(target.source) if target.source else None)
    if call.query.dim() == 3:
        call = _heads_apart(call, owner, source, qualname)
    return state.capture_call(key, qualname, source, call, owner)


# -- gradients of the maps (``capture(grad=True)``) -----------------------------------

def leaf_probabilities(call, queries=None, heads=None):
    """The probabilities of a call as a leaf of the autograd graph, to be ``join``-ed.

    Computed from the call's tensors without autograd (so no gradient ever
    reaches ``q`` or ``k`` through them) and marked ``requires_grad`` when
    gradients are enabled: ``join`` then makes the loss reach them.
    """
    maps = call.probabilities(queries, heads, grad=False)
    if sys.modules["torch"].is_grad_enabled() and maps.is_floating_point():
        maps.requires_grad_(True)
    return maps


def map_gradient(call, grad_out, queries=None, heads=None):
    """Return ``d loss / d probabilities`` of a kernel call from ``d loss / d output``.

    The kernel's output is ``dropout(P) @ v``, so ``d loss / d P`` is
    ``grad_out @ vᵀ`` (row by row and head by head; each query head reads its
    key/value head under grouped-query attention), exactly what autograd
    gives an eager ``P @ v``.  With dropout in training it is the gradient of
    the map after dropout, whose mask the kernel keeps to itself.
    ``queries`` and ``heads`` pick rows and heads as ``probabilities`` does.
    ``grad_out`` may have the kernel's own shape when an adapter reshaped the
    call (transformers' packed grouped-query heads): it is read in the
    call's shape, ``(..., heads, queries, value dim)``.
    """
    return _map_gradient(sys.modules["torch"], grad_out, call.value, call.query.shape, queries,
                         heads)


def _map_gradient(torch, grad_out, v, shape, queries, heads):
    grad = grad_out.reshape(shape[:-1] + grad_out.shape[-1:])
    grad, v, _, group, _, v_heads = _pick_heads(torch, grad, v, heads)
    if queries is not None:
        grad, _ = _pick_rows(torch, grad, queries)
    dtype = grad.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    return _grouped_matmul(torch, grad.to(work), v.to(work), group,
                           v_heads).to(dtype)


def join(out, joins):
    """Return ``out`` (bit for bit) with each joined map made a leaf the loss reaches.

    ``joins`` holds ``(call, maps, queries, heads)`` from ``State.capture_call``.
    The result is a copy of ``out`` made by ``_Join``: its backward passes the
    gradient of the output on to the kernel untouched, so every other gradient
    is what it would be without capture, and gives each map
    ``map_gradient(call, grad)`` as its ``.grad``.  (A copy, not ``out``
    itself: autograd forbids changing in place an input a custom function
    returned as it is, and a model may change its attention output in place.)
    """
    global _dropout_said
    torch = sys.modules["torch"]
    maps = [entry for entry in joins if entry[1].requires_grad]
    if not maps or not torch.is_grad_enabled():
        return out
    if not _dropout_said and any(call.dropout_p for call, _, _, _ in maps):
        _dropout_said = True
        warnings.warn(
            "visualizer: capture(grad=True) of an attention kernel that runs dropout (the model "
            "is in training mode): each map is the probabilities before dropout and its .grad "
            "the gradient of the map after dropout, whose mask the kernel keeps to itself. For "
            "relevance, call model.eval() first", CaptureWarning, stacklevel=3)
    return _join_function().apply(out, tuple(maps), *[entry[1] for entry in maps])


_dropout_said = False


_Join = None


def _join_function():
    """The autograd function of ``join`` (made on first use: torch is imported by then)."""
    global _Join
    if _Join is None:
        torch = sys.modules["torch"]

        class _Join(torch.autograd.Function):
            @staticmethod
            def forward(ctx, out, joins, *maps):
                # the shapes and selections only: the call's q, k and mask are not kept
                ctx.joins = [(call.query.shape, queries, heads)
                             for call, _, queries, heads in joins]
                ctx.save_for_backward(*[call.value for call, _, _, _ in joins])
                return out.clone()

            @staticmethod
            def backward(ctx, grad):
                grads = [_map_gradient(torch, grad, value, shape, queries, heads)
                         for (shape, queries, heads), value in zip(ctx.joins, ctx.saved_tensors)]
                return (grad, None) + tuple(grads)

    return _Join


def _heads_apart(call, owner, source, qualname):
    """A call made with heads merged into the batch axis, its heads split from the batch.

    timm's SAM ViT calls the kernel with ``(batch x heads, tokens, dim)``.
    Its probabilities get the layout of every other call, ``(batch, heads,
    queries, keys)``, so that ``heads=`` and the reductions see heads, not
    samples: by the calling module's head count (``integrations.head_count``)
    where it divides the first axis (a module of several heads that calls the
    kernel with no heads axis merges them: the kernel takes heads itself).
    Otherwise the call is left as it is, and ``integrations.warn_unsplit``
    says so once.
    """
    module = source
    if owner is not None:
        target, owner_frame, module = owner
        if module is None and owner_frame is not None and target.source is not None:
            module = owner_frame.f_locals.get(target.source)
        qualname = target.qualname
    q, k, v, mask = call.query, call.key, call.value, call.attn_mask
    merged = q.shape[0]
    heads = head_count(module)
    fits = k.dim() == 3 and v.dim() == 3 and k.shape[0] == merged == v.shape[0] and (
        mask is None or mask.dim() < 3 or mask.shape[-3] == 1 or
        mask.dim() == 3 and mask.shape[0] == merged)
    if heads is None or merged % heads or not fits:
        warn_unsplit(qualname, module, (merged, q.shape[1], k.shape[1]))
        return call
    batch = merged // heads
    if mask is not None and mask.dim() == 3 and mask.shape[0] != 1:
        mask = mask.reshape(batch, heads, mask.shape[1], mask.shape[2])
    return call.replace(query=q.reshape(batch, heads, q.shape[1], q.shape[2]),
                        key=k.reshape(batch, heads, k.shape[1], k.shape[2]),
                        value=v.reshape(batch, heads, v.shape[1], v.shape[2]), attn_mask=mask)


# -- reductions at compute time (``reduce=``) ------------------------------------------

# The reductions themselves are in visualizer.attention; __all__ names these two here.
REDUCTIONS = attention.REDUCTIONS
reduce_map = attention.reduce_map
# The seam's own block size: query rows computed at once, so (..., heads, 256, keys) at most.
ROWS_PER_CHUNK = attention.ROWS_PER_CHUNK


def reduced(call, reduce, queries=None, heads=None, grad=False, running=None, owner=None,
            rows_per_chunk=None):
    """Return a reduction of a kernel call's probabilities, computed ``rows_per_chunk`` rows at a time.

    Each block of query rows is computed as ``probabilities`` does, reduced
    and dropped, so the full ``(..., heads, queries, keys)`` matrix never
    exists at once.  ``reduce`` (``'head_mean'``, ``'received'`` or
    ``'rollout'``), ``queries``, ``running`` and ``owner`` are as for
    ``visualizer.attention.reduce_rows``; ``heads`` are picked before.
    The result is float32 for float16/bfloat16 inputs, else the query's dtype.
    """
    return attention.reduce_rows(lambda rows: call.probabilities(rows, heads, grad),
                                 call.query.shape[-2], call.key.shape[-2], reduce, queries,
                                 running, owner, rows_per_chunk or ROWS_PER_CHUNK, call.query)
