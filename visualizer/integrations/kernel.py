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
torch's own object again, everywhere it was replaced.  The seam captures
nothing inside ``torch.compile``d graphs: there the wrapper passes straight
through to the kernel (see ``visualizer.integrations.compile`` for captures
that do work there).  A reference bound elsewhere (an attribute such as
``self.attn_fn = F.scaled_dot_product_attention`` made at import) is not
replaced.
"""
import sys
import threading
import warnings
import weakref

from .. import _compat, _imports
from .._errors import CaptureWarning, VisualizerValueError
from .._state import Extension
from . import Preset, head_count, warn_unsplit

__all__ = ["Seam", "install", "uninstall", "adapter", "Call", "probabilities", "reduced",
           "reduce_map", "PRESET"]

NAME = "scaled_dot_product_attention"

# The 'kernel' family: every kernel call nothing else takes is kept (the seam is
# in place whenever capture is on; nothing to wait for).
PRESET = Preset("kernel", "torch.nn.functional.scaled_dot_product_attention")
_MAX_DEPTH = 48  # frames looked at above a kernel call

_lock = threading.RLock()
_states = weakref.WeakSet()  # active states the seam serves
_original = None             # torch's own function
_holders = []                # namespaces (dicts) where we replaced it
_scanned = {}                # module name -> module, namespaces already looked through
_adapters = {}               # id(code) -> (code, adapt(frame, call, state) -> (call, owner))
_code_info = {}              # id(code) -> (code, kind, qualname, first argument)
_failed = set()


class Call:
    """The arguments of one kernel call, by name (what ``State.capture_call`` takes)."""

    __slots__ = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                 "enable_gqa")
    name = NAME

    def __init__(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                 scale=None, enable_gqa=False):
        self.query = query
        self.key = key
        self.value = value
        self.attn_mask = attn_mask
        self.dropout_p = dropout_p
        self.is_causal = is_causal
        self.scale = scale
        self.enable_gqa = enable_gqa

    def replace(self, **changes):
        """A copy with some arguments changed."""
        fields = {name: getattr(self, name) for name in self.__slots__}
        fields.update(changes)
        return Call(**fields)

    def probabilities(self, queries=None, heads=None, grad=False):
        """The attention probabilities of this call (see ``probabilities``)."""
        return probabilities(self, queries=queries, heads=heads, grad=grad)

    def reduced(self, reduce, queries=None, heads=None, grad=False, running=None, owner=None):
        """A reduction of this call's probabilities, never computed in full (see ``reduced``)."""
        return reduced(self, reduce, queries, heads, grad, running, owner)


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
    length, keys = q.shape[-2], k.shape[-2]
    device = q.device
    head_index = None
    q_heads = q.shape[-3] if q.dim() >= 3 else 1
    k_heads = k.shape[-3] if k.dim() >= 3 else 1
    group = q_heads // k_heads if k_heads not in (1, q_heads) and q_heads % k_heads == 0 else 1
    if heads is not None and q.dim() >= 3:
        picked = _positions(heads, q_heads, "heads")
        if picked != list(range(q_heads)):
            head_index = torch.tensor(picked, dtype=torch.long, device=device)
            q = q.index_select(-3, head_index)
            if group > 1:  # query head h reads key head h // group
                k = k.index_select(-3, torch.div(head_index, group, rounding_mode="floor"))
                group = 1
            elif k_heads == q_heads:
                k = k.index_select(-3, head_index)
    rows = None  # the query positions kept, when not all
    if queries is not None:
        picked = _positions(queries, length, "queries")
        if picked != list(range(length)):
            rows = picked
            first = picked[0]
            if picked == list(range(first, first + len(picked))):
                q = q.narrow(-2, first, len(picked))  # a view: no index, no copy
            else:
                q = q.index_select(-2, torch.tensor(picked, dtype=torch.long, device=device))
    dtype = q.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    scale = call.scale if call.scale is not None else q.shape[-1] ** -0.5
    q = q.to(work) * scale  # on q: fewer numbers than the scores
    k = k.to(work)
    if group > 1:
        # grouped-query attention without repeating k: (..., kv, group, L, D) @ (..., kv, 1, D, S)
        shape = q.shape
        scores = torch.matmul(q.reshape(shape[:-3] + (k_heads, group) + shape[-2:]),
                              k.unsqueeze(-3).transpose(-2, -1))
        scores = scores.reshape(shape[:-3] + (q_heads, shape[-2], keys))
    else:
        scores = torch.matmul(q, k.transpose(-2, -1))
    if call.is_causal:
        positions = torch.arange(length, device=device) if rows is None else torch.tensor(
            rows, device=device)
        allowed = positions[:, None] >= torch.arange(keys, device=device)[None, :]
        scores = scores.masked_fill(~allowed, float("-inf"))
    if mask is not None:
        if rows is not None and mask.dim() >= 2 and mask.shape[-2] == length != 1:
            mask = mask[..., rows, :]
        if head_index is not None and mask.dim() >= 3 and mask.shape[-3] != 1:
            mask = mask.index_select(-3, head_index)
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
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
    return probs.to(dtype)


def _positions(selection, size, what):
    """The positions (non-negative ints) ``selection`` picks out of ``size``."""
    if isinstance(selection, slice):
        return list(range(size))[selection]
    picked = [selection] if isinstance(selection, int) else list(selection)
    out = []
    for i in picked:
        if not -size <= i < size:
            raise IndexError("{}={!r}: position {} is out of range for {} {}".format(
                what, selection, i, size, "heads" if what == "heads" else "queries"))
        out.append(i % size)
    return out


def _index(torch, selection, size, device, what):
    """A LongTensor of the positions ``selection`` picks out of ``size``."""
    return torch.tensor(_positions(selection, size, what), dtype=torch.long, device=device)


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
    from . import wait_for_adapters

    wait_for_adapters()
    with _lock:
        _states.add(state)
        _patch()


def uninstall(state):
    """Stop serving ``state``; when no state is left, torch's own function goes back everywhere."""
    with _lock:
        _states.discard(state)
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
    functional = sys.modules.get("torch.nn.functional")
    current = getattr(functional, NAME, None)
    if current is None:
        return
    if _original is None:
        _original = current
        _script_as_the_kernel()
    _scan()
    for namespace, name in _holders:
        if namespace.get(name) is _original:
            namespace[name] = scaled_dot_product_attention


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
    if _original is None:
        return
    _scan()  # modules imported while capturing may hold the seam
    for namespace, name in _holders:
        if namespace.get(name) is scaled_dot_product_attention:
            namespace[name] = _original


def _scan():
    """Note each global that holds torch's function or the seam, in modules not seen yet.

    ``from torch.nn.functional import scaled_dot_product_attention`` binds
    the function in the importing module; those names are replaced too.
    torch's private modules (``torch._C._nn`` and the like) keep their own.
    """
    for name, module in list(sys.modules.items()):
        if module is None or _scanned.get(name) is module:
            continue
        _scanned[name] = module
        if name == __name__ or name.startswith(("torch._", "visualizer.")):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            if value is _original or value is scaled_dot_product_attention:
                _holders.append((namespace, attr))


def adapter(code, adapt):
    """Give calls made from ``code`` (a frame on the stack above the kernel) to ``adapt``.

    ``adapt(frame, call, state)`` returns ``(call, owner)``: the call as the
    model means it (e.g. transformers' packed grouped-query heads unpacked),
    and ``None`` or ``(target, source)``, a watched function to capture the
    probabilities into instead of the kernel's own key.
    """
    _adapters[id(code)] = (code, adapt)


# -- the seam itself ------------------------------------------------------------------


def scaled_dot_product_attention(query, key, value, *args, **kwargs):
    """torch's ``scaled_dot_product_attention``, also giving its probabilities to visualizer.

    Returns exactly what torch's own function returns for these arguments
    (that function computes it); see ``visualizer.integrations.kernel``.
    """
    out = _original(query, key, value, *args, **kwargs)
    if _compiling():
        return out
    if len(_states) and isinstance(out, _tensor_type()):  # not while torch.fx traces (Proxy)
        try:
            _seen(sys._getframe(1), Call(query, key, value, *args, **kwargs))
        except Exception as exc:  # a capture must never break the model
            _report(exc)
    return out


def _tensor_type():
    return sys.modules["torch"].Tensor


def _compiling():
    torch = sys.modules.get("torch")
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return is_compiling is not None and is_compiling()


def _report(exc):
    seen = (type(exc).__name__, str(exc))
    if seen in _failed:
        return
    _failed.add(seen)
    warnings.warn(
        "visualizer: capturing an attention kernel call failed and that call recorded "
        "nothing: {}: {}".format(type(exc).__name__, exc), CaptureWarning, stacklevel=3)


def _seen(frame, call):
    for state in list(_states):
        if state.active:
            _deliver(state, frame, call)


def _info(code):
    """(kind, qualname, first argument) of a code object: 'adapter', 'method' or 'other'."""
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
    module_type = sys.modules["torch"].nn.Module
    depth = 0
    while frame is not None and depth < _MAX_DEPTH:
        code = frame.f_code
        kind, qualname, first = _info(code)
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
    return call, None, NAME, NAME, None


def _deliver(state, frame, call):
    call, owner, key, qualname, source = locate(frame, call, state)
    if call.query.dim() == 3:
        call = _heads_apart(call, owner, source, qualname)
    state.capture_call(key, qualname, source, call, owner)


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

REDUCTIONS = ("head_mean", "received", "rollout")
ROWS_PER_CHUNK = 256  # query rows computed at once: the largest block is (..., heads, 256, keys)


def reduced(call, reduce, queries=None, heads=None, grad=False, running=None, owner=None,
            rows_per_chunk=None):
    """Return a reduction of a kernel call's probabilities, computed ``rows_per_chunk`` rows at a time.

    The full ``(..., heads, queries, keys)`` matrix never exists at once:
    each block of query rows is computed (as ``probabilities`` does), reduced
    and dropped.  ``reduce`` is one of:

    * ``'head_mean'``: the mean over the (selected) heads, ``(..., queries, keys)``;
    * ``'received'``: the attention each key receives, the sum over the
      (selected) query rows, ``(..., heads, keys)``;
    * ``'rollout'``: attention rollout (Abnar & Zuidema, 2020) through this
      call, ``(..., queries, keys)``: ``R = Â @ R_before`` with
      ``Â = rownorm(0.5 · mean_heads(A) + 0.5 · I)`` and ``R_before`` the
      rollout of the previous call of the same forward (the identity for its
      first call).  ``running`` (a dict, kept by the storage) holds
      ``R_before``; a forward is a run of calls in which no ``owner`` (the
      attention module) repeats and the token count stays the same, so the
      rollout starts again when a module already in it is called again.
      ``queries`` picks rows of the result, not of the layer's attention.

    The result is float32 for float16/bfloat16 inputs, else the query's dtype.
    """
    rows_of = (lambda rows: probabilities(call, rows, heads, grad))
    return _reduce(rows_of, call.query.shape[-2], call.key.shape[-2], reduce, queries,
                   running, owner, rows_per_chunk or ROWS_PER_CHUNK, call.query)


def reduce_map(value, reduce, queries=None, heads=None, running=None, owner=None):
    """Return ``reduced`` for an attention map ``(..., heads, queries, keys)`` computed in full."""
    torch = sys.modules["torch"]
    if not isinstance(value, torch.Tensor):
        value = torch.as_tensor(value)
    if value.dim() < 3:
        value = value.unsqueeze(-3)
    if heads is not None:
        value = value.index_select(-3, _index(torch, heads, value.shape[-3], value.device,
                                              "heads"))

    def rows_of(rows):
        return value.index_select(-2, _index(torch, rows, value.shape[-2], value.device,
                                             "queries"))

    return _reduce(rows_of, value.shape[-2], value.shape[-1], reduce, queries, running, owner,
                   ROWS_PER_CHUNK, value)


def _reduce(rows_of, length, keys, reduce, queries, running, owner, chunk, like):
    torch = sys.modules["torch"]
    if reduce not in REDUCTIONS:
        raise VisualizerValueError("reduce must be one of {}, got {!r}".format(
            ", ".join(map(repr, REDUCTIONS)), reduce))
    dtype = like.dtype
    work = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    picked = _index(torch, queries, length, like.device, "queries").tolist() \
        if queries is not None else None
    if reduce == "rollout":
        return _rollout(torch, rows_of, length, keys, picked, running, owner, chunk, work,
                        like.device)
    rows = picked if picked is not None else range(length)
    out = None
    for start in range(0, len(rows), chunk):
        block = rows_of(_rows(rows, start, chunk))
        if block.dim() < 3:  # no heads axis: one head
            block = block.unsqueeze(-3)
        block = block.to(work)
        if reduce == "head_mean":
            part = block.mean(-3)
            if out is None:  # filled in place: no second copy of the result for a cat
                out = part.new_empty(part.shape[:-2] + (len(rows), keys))
            out[..., start:start + part.shape[-2], :] = part
        else:
            summed = block.sum(-2)
            out = summed if out is None else out + summed
        del block
    return out


def _rows(rows, start, chunk):
    if isinstance(rows, range):
        return slice(start, min(start + chunk, len(rows)))
    return rows[start:start + chunk]


def _rollout(torch, rows_of, length, keys, picked, running, owner, chunk, work, device):
    if length != keys:
        raise VisualizerValueError(
            "reduce='rollout' needs self-attention over the same tokens ({} queries against "
            "{} keys here: cross-attention or decoding with a KV cache); capture the maps "
            "and use visualizer.plotting.attention_rollout on the layers you want".format(
                length, keys))
    if running is None:
        running = {}
    before = running.get("matrix")
    seen = running.setdefault("owners", set())
    token = id(owner) if owner is not None else None
    if before is not None and (token is None or token in seen):
        before = None  # a new forward begins
    matrix = None
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        block = rows_of(slice(start, stop))
        if block.dim() < 3:
            block = block.unsqueeze(-3)
        fused = block.to(work).mean(-3) * 0.5
        del block
        if start == 0 and before is not None and (
                before.shape[:-2] != fused.shape[:-2] or before.shape[-1] != length):
            before = None  # other inputs: a new forward
        diagonal = torch.arange(start, stop, device=device)
        fused[..., diagonal - start, diagonal] += 0.5
        fused = fused / fused.sum(-1, keepdim=True)
        rows = fused if before is None else torch.matmul(fused, before)
        if matrix is None:
            matrix = rows.new_empty(rows.shape[:-2] + (length, length))
        matrix[..., start:stop, :] = rows
    if before is None:
        seen.clear()
    running["matrix"] = matrix
    seen.add(token)
    if picked is None:
        return matrix
    return matrix.index_select(-2, torch.tensor(picked, dtype=torch.long, device=device))
