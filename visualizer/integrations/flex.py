"""Flex attention: torch's ``flex_attention`` captured beside its kernel, like the SDPA seam.

``torch.nn.attention.flex_attention.flex_attention(q, k, v, score_mod,
block_mask, scale, enable_gqa, ...)`` computes attention whose scores a
Python ``score_mod`` changes and whose keys a ``BlockMask`` (built from a
``mask_mod``) hides; its kernels never materialise the probabilities.
While capture is on, the kernel seam (``integrations.kernel``) also puts
``flex_attention`` below in its place, in torch's module and in every module
namespace that imported the name, and transformers'
``compile_friendly_flex_attention`` (what ``attn_implementation=
'flex_attention'`` calls: it runs a ``torch.compile``d flex attention that
the first wrapper would never see).  Each wrapper returns exactly what the
function it replaces returns (the output, and the log-sum-exp or
``AuxOutput`` when asked for) and gives the call's probabilities to
visualizer, computed as torch's own reference implementation
(``torch._higher_order_ops.flex_attention.math_attention``, what
``flex_attention`` runs on CPU without ``torch.compile``) defines them::

    scores = (q kᵀ) · scale                          in float32 (float64 for float64)
    scores = where(mask_mod(b, h, q_idx, kv_idx), score_mod(scores, b, h, q_idx, kv_idx), -inf)
    probabilities = safe_softmax(scores)             fully masked rows are zeros

with ``score_mod`` and ``mask_mod`` vectorised by torch's own helper
(``_vmap_for_bhqkv``) and given the real head and query indices even when
``heads=`` or ``queries=`` keep only some (``h`` the query head under
grouped-query attention).  The block mask's sparsity (which blocks are
computed at all) is not applied: torch's reference ignores it too, and a
``BlockMask`` made by ``create_block_mask`` lists every block that its
``mask_mod`` leaves a key in.  Not the kernel's log-sum-exp: on CPU
``flex_attention`` computes none unless asked (``return_aux``), and asking
changes the kernel that inductor compiles.

Calls are captured in the layout ``(batch, heads, queries, keys)`` under
the ``__qualname__`` of the nearest ``nn.Module`` method on the stack
(``'LlamaAttention.forward'``), or ``'flex_attention'`` outside any module.
Inside a ``torch.compile``d graph the wrappers capture too: the graph
computes the probabilities as above beside the kernel (all of them: the
selections and reductions of the capture apply at run time) and hands them
to visualizer through ``integrations.compile``'s operator.
"""
import math
import sys

from .. import _imports
from . import kernel

__all__ = ["NAME", "FlexCall", "capture", "compile_friendly_flex_attention",
           "compiled_flex_attention", "flex_attention",
           "install", "probabilities", "trace_with", "wrapper_codes", "COMPILED_MESSAGE"]

NAME = "flex_attention"
TORCH_MODULE = "torch.nn.attention.flex_attention"
TRANSFORMERS_MODULE = "transformers.integrations.flex_attention"
# flex_attention's positional parameters after query, key and value (torch 2.5 to 2.14).
_POSITIONAL = ("score_mod", "block_mask", "scale", "enable_gqa", "return_lse", "kernel_options")

COMPILED_MESSAGE = (
    "visualizer: torch.compile compiled {} with flex attention while capture is on, and this "
    "torch has no effectful custom operators: inside its compiled graphs flex attention "
    "captures nothing (the compiled model runs torch's kernel as it is). Capture from the eager model: for transformers, a model built with "
    "attn_implementation='flex_attention' and not compiled captures its maps (it compiles "
    "flex attention itself, which visualizer sees through), or build it with "
    "attn_implementation='eager' or 'sdpa'.")


class FlexCall(kernel.AttentionCall):
    """The arguments of one flex attention call, with the interface of ``kernel.Call``.

    ``State.capture_call`` takes it: ``probabilities``, ``leaf_probabilities``
    and ``reduced`` compute the maps on demand (see ``probabilities`` here).
    Built from tensors and Python objects only (``score_mod`` and the
    ``BlockMask``), so that a compiled graph could build it at run time.
    """

    __slots__ = ("query", "key", "value", "score_mod", "block_mask", "scale", "enable_gqa")
    name = NAME
    dropout_p = 0.0  # flex attention has no dropout (``kernel.join`` reads it)
    attn_mask = None

    def __init__(self, query, key, value, score_mod=None, block_mask=None, scale=None,
                 enable_gqa=False):
        self.query = query
        self.key = key
        self.value = value
        self.score_mod = score_mod
        self.block_mask = block_mask
        self.scale = scale
        self.enable_gqa = enable_gqa

    def probabilities(self, queries=None, heads=None, grad=False):
        """The attention probabilities of this call (see ``probabilities``)."""
        return probabilities(self, queries=queries, heads=heads, grad=grad)


def probabilities(call, queries=None, heads=None, grad=False):
    """Return the probabilities of a flex attention call, ``score_mod`` and ``mask_mod`` applied.

    As torch's reference implementation computes them (see the module's
    docstring); ``queries`` and ``heads`` keep only those query rows and
    heads (an int, a slice or a sequence of ints), computed from the selected
    rows and heads alone.  Shape ``(batch, heads, queries, keys)``, the
    query's dtype; rows where ``mask_mod`` hides every key are zeros.
    ``grad`` keeps the result attached to the autograd graph.

    >>> probs = FlexCall(q, k, v, score_mod=bias).probabilities(heads=0)  # doctest: +SKIP
    """
    torch = sys.modules["torch"]
    if bool(grad) == torch.is_grad_enabled():
        return _probabilities(torch, call, queries, heads)
    with torch.set_grad_enabled(bool(grad)):
        return _probabilities(torch, call, queries, heads)


def _probabilities(torch, call, queries, heads):
    from torch._dynamo._trace_wrapped_higher_order_op import TransformGetItemToIndex
    from torch.nn.attention.flex_attention import _vmap_for_bhqkv, noop_mask

    q, k = call.query, call.key
    dtype, device = q.dtype, q.device
    q_heads, length, keys = q.shape[-3], q.shape[-2], k.shape[-2]
    scale = call.scale if call.scale is not None else 1.0 / math.sqrt(q.shape[-1])
    q, k, head_index, group, _, k_heads = kernel._pick_heads(torch, q, k, heads)
    rows = None
    if queries is not None:
        q, rows = kernel._pick_rows(torch, q, queries)
    work = torch.float64 if dtype == torch.float64 else torch.float32
    # As _math_attention_inner: (q kᵀ) in the working precision, then the scale.
    scores = kernel._grouped_matmul(torch, q.to(work), k.to(work), group, k_heads) * scale
    b = torch.arange(scores.shape[0], device=device)
    h = head_index if head_index is not None else torch.arange(q_heads, device=device)
    m = torch.arange(length, device=device) if rows is None else torch.tensor(rows,
                                                                             device=device)
    n = torch.arange(keys, device=device)
    mask_mod = getattr(call.block_mask, "mask_mod", None)
    with TransformGetItemToIndex():  # lets score_mod and mask_mod index tensors by 0-d tensors
        if call.score_mod is not None:
            scores = _vmap_for_bhqkv(call.score_mod, prefix=(0,))(scores, b, h, m, n)
        if mask_mod is not None and mask_mod is not noop_mask:
            allowed = _vmap_for_bhqkv(mask_mod, prefix=())(b, h, m, n)
            scores = torch.where(allowed, scores, torch.tensor(-math.inf, dtype=scores.dtype,
                                                               device=device))
    return torch.ops.aten._safe_softmax(scores, -1).to(dtype)  # (dynamo traces the op)


def capture(frame, out, query, key, value, score_mod=None, block_mask=None, scale=None,
            enable_gqa=False):
    """Give one flex attention call to every active capture; return ``out`` as it was.

    ``frame`` is the frame of the code that called flex attention (where the
    search for its module starts); ``out`` is what flex attention returned: a
    tensor, or ``(tensor, lse)`` / ``(tensor, AuxOutput)``.  Under
    ``capture(grad=True)`` the output tensor comes back joined to the maps
    (``kernel.join``: the same values, a new tensor).
    """
    tensor = out[0] if isinstance(out, tuple) else out
    if not isinstance(tensor, sys.modules["torch"].Tensor):  # not while torch.fx traces
        return out
    call = FlexCall(query, key, value, score_mod, block_mask, scale, enable_gqa)
    joined = kernel.deliver(frame, call, tensor)
    if joined is tensor:
        return out
    return (joined,) + tuple(out[1:]) if isinstance(out, tuple) else joined


def flex_attention(query, key, value, *args, **kwargs):
    """torch's ``flex_attention``, also giving its probabilities to visualizer.

    Returns exactly what torch's own function returns for these arguments
    (that function computes it); see ``visualizer.integrations.flex``.
    """
    out = _TORCH.original(query, key, value, *args, **kwargs)
    if kernel.compiling():
        return _traced_arguments(out, query, key, value, args, kwargs)
    if not kernel.serving():
        return out
    return _capture_arguments(sys._getframe(1), out, query, key, value, args, kwargs)


def _named(args, kwargs):
    named = dict(zip(_POSITIONAL, args))
    named.update(kwargs)
    return named


def _capture_arguments(frame, out, query, key, value, args, kwargs):
    named = _named(args, kwargs)
    return capture(frame, out, query, key, value, named.get("score_mod"),
                   named.get("block_mask"), named.get("scale"), named.get("enable_gqa", False))


_traced = None  # what dynamo traces in place of a capture (``integrations.compile``)


def trace_with(function):
    """Have the wrappers call ``function(out, query, key, value, score_mod, block_mask, scale,
    enable_gqa)`` while dynamo traces them (``integrations.compile.traced_flex_call``)."""
    global _traced
    _traced = function


def _traced_arguments(out, query, key, value, args, kwargs):
    if _traced is not None and not kernel.exporting():
        named = _named(args, kwargs)
        _traced(out, query, key, value, named.get("score_mod"), named.get("block_mask"),
                named.get("scale"), named.get("enable_gqa", False))
    return out


def compiled_flex_attention(compiled):
    """The wrapper of ``compiled``, a ``torch.compile(flex_attention)`` a module keeps as a global.

    torchtune and gpt-fast compile flex attention once at import
    (``flex_attention_compiled = torch.compile(flex_attention)``); such a
    global is replaced by this while capture is on.  It returns exactly what
    ``compiled`` returns and captures the call like ``flex_attention``.
    """
    def flex_attention_compiled(query, key, value, *args, **kwargs):
        out = compiled(query, key, value, *args, **kwargs)
        if kernel.compiling():
            return _traced_arguments(out, query, key, value, args, kwargs)
        if not kernel.serving():
            return out
        return _capture_arguments(sys._getframe(1), out, query, key, value, args, kwargs)

    flex_attention_compiled.__wrapped__ = compiled
    return flex_attention_compiled


def compile_friendly_flex_attention(query, key, value, training=False, **kwargs):
    """transformers' ``compile_friendly_flex_attention``, also giving the probabilities to visualizer.

    transformers runs flex attention through a ``torch.compile`` of it made
    once (``WrappedFlexAttention``), which no wrapper of ``flex_attention``
    would reach; this one sits where transformers calls it and returns
    exactly what it returns.
    """
    out = _TRANSFORMERS.original(query, key, value, training=training, **kwargs)
    if kernel.compiling():
        return _traced_arguments(out, query, key, value, (), kwargs)
    if not kernel.serving():
        return out
    return capture(sys._getframe(1), out, query, key, value, kwargs.get("score_mod"),
                   kwargs.get("block_mask"), kwargs.get("scale"), kwargs.get("enable_gqa", False))


# transformers' module binds torch's flex_attention to compile it once: left alone, since
# compile_friendly_flex_attention, its only caller, is served itself.
_TORCH = kernel.Patch(TORCH_MODULE, NAME, flex_attention, skip=(TRANSFORMERS_MODULE,),
                      compiled=compiled_flex_attention)
_TRANSFORMERS = kernel.Patch(TRANSFORMERS_MODULE, "compile_friendly_flex_attention",
                             compile_friendly_flex_attention)
_installed = []


def wrapper_codes():
    """The code objects of the wrappers (frames the search for the calling module skips)."""
    return [flex_attention.__code__, compile_friendly_flex_attention.__code__,
            compiled_flex_attention(None).__code__, _traced_arguments.__code__]


def install():
    """Make the kernel seam serve flex attention too (once; modules imported later included)."""
    if _installed:
        return
    _installed.append(True)
    for patch in (_TORCH, _TRANSFORMERS):
        kernel.also_patch(patch)
        _imports.when_imported(patch.module, lambda module, patch=patch: kernel.also_patch(patch))

