"""transformers: what the kernel seam needs to know, and its eager-only models.

transformers 5.x computes attention with the function that
``config._attn_implementation`` names: ``'sdpa'`` by default, which calls the
kernel (``integrations/sdpa_attention.py``), or the ``eager_attention_forward``
of each modeling module.  So:

* default (sdpa) models are captured at the kernel seam, under the
  ``__qualname__`` of their attention class (``'BertSelfAttention.forward'``),
  outputs untouched.  For a one-token decoding step with a mask,
  ``sdpa_attention_forward`` packs grouped-query heads into the query axis
  (``pack_gqa``: the kernel sees ``(batch, kv_heads, n_rep, dim)``);
  ``_sdpa_adapter`` unpacks them, so captures are ``(batch, heads, 1, keys)``.
* models that run eager (those without an sdpa path, or built with
  ``attn_implementation='eager'``) are captured from their module's
  ``eager_attention_forward`` (variable ``attn_weights``, source: the
  attention module), for every modeling module, as it is imported.
* ``get_local.watch('...modeling_bert.eager_attention_forward', 'attn_weights')``
  on a default (sdpa) model: that function never runs, so the seam hands it
  the kernel's probabilities, from the calls whose attention module's class
  is defined in that modeling module.
* attention classes that compute attention in their own methods (all of
  transformers 4.x; in 5.x BLOOM, XLNet, GIT's text attention, ...): each
  attention class's methods are watched for every softmax
  result they store (``attention_probs``, ``attn_prob``; ConvBERT's
  attention beside its span-based convolution kernel's softmax; DeBERTa's
  and SEW-D's ``XSoftmax``), under the method's qualname; 4.x SDPA classes
  call the kernel themselves.  Those that merge the heads into the batch axis
  (FSMT, MVP, XGLM, Table Transformer, ViTDet, Mask2Former's decoder; every
  BART-era class of 4.x) store ``(batch x heads, queries, keys)`` and return
  it split for ``output_attentions``: their maps are split the same way, by
  the module's ``num_heads`` and the batch size in ``bsz`` or ``batch_size``
  (``BATCH_NAMES``; see ``integrations.heads_apart``).
* continuous batching (``model.generate_batch``, ``transformers serve``):
  every forward packs the tokens of several requests into one batch row,
  ``cu_seq_lens_q``/``cu_seq_lens_k`` mark where each request's queries and
  keys (its paged cache, read back) start, and an additive block-diagonal
  mask keeps them apart.  On CPU it runs ``'sdpa'`` (one kernel call per
  layer) or ``'paged|eager'`` (``eager_attention_forward`` is switched to
  it: ``eager_paged_attention_forward``, one softmax per layer).  Both are
  split per request (``packed_requests``): each request's map, its query
  rows over its own keys, ``(1, heads, queries, keys)``, goes under the key
  tagged with its request id (``_state.request_key``:
  ``'LlamaAttention.forward[req_0]'`` from the kernel,
  ``'eager_paged_attention_forward[req_0]'`` from the eager path), so
  ``visualizer.generation.steps_by_module(model, cache, request='req_0')``
  stitches one request's steps as it does ``generate()``'s.  Where the
  requests cannot be told apart, the packed map is kept whole and a
  ``CaptureWarning`` says so.  The flash paths (``flash_attention_2`` and
  kin, GPU only) never reach the kernel and are not captured.
"""
import sys
import threading
import warnings

from .. import _imports
from .._errors import CaptureWarning
from .._state import Parts
from . import kernel
from ._common import Preset, watch_softmax_outputs

__all__ = ["BATCH_NAMES", "EAGER_PAGED_MODULE", "PACKAGE", "PRESET", "SDPA_MODULE",
           "adapt_sdpa", "batch_requests", "is_modeling_module", "on_sdpa_module",
           "packed_requests", "shape_eager_paged", "wait_for_adapters", "watch_eager_paged",
           "watch_modeling_module"]

PACKAGE = "transformers"
SDPA_MODULE = PACKAGE + ".integrations.sdpa_attention"
EAGER_PAGED_MODULE = PACKAGE + ".integrations.eager_paged"
# The locals its attention classes keep the batch size in (``bsz * self.num_heads``).
BATCH_NAMES = ("bsz", "batch_size")


def adapt_sdpa(frame, call, state):
    """Give a kernel call made by ``sdpa_attention_forward`` its model-level shape and owner.

    A call of a continuous batch comes back as one call per request (its
    query rows, its keys and values, its block of the mask; see
    ``packed_requests``), which the seam captures under tagged keys.
    """
    local = frame.f_locals
    q = call.query
    q_length = local.get("q_length")
    if q_length == 1 and q.dim() == 4 and q.shape[2] > 1:
        # pack_gqa: head h = g * n_rep + r sits at [g, r]; put the heads back.
        batch, groups, n_rep, dim = q.shape
        mask = call.attn_mask
        if mask is not None and mask.dim() == 4 and mask.shape[1] == groups and \
                mask.shape[2] == n_rep:
            mask = mask.reshape(mask.shape[0], groups * n_rep, 1, mask.shape[-1])
        call = call.replace(query=q.reshape(batch, groups * n_rep, 1, dim), attn_mask=mask,
                            enable_gqa=True)
    module = local.get("module")
    kwargs = local.get("kwargs")
    if isinstance(kwargs, dict) and kwargs.get("cu_seq_lens_q") is not None:
        parts = packed_requests(frame, kwargs, module, call.query.shape[-2],
                                call.key.shape[-2], "sdpa_attention_forward")
        if parts is not None:
            return [_request_call(call, request, rows, keys)
                    for request, rows, keys in parts], None
        return call, None
    modeling = sys.modules.get(type(module).__module__) if module is not None else None
    eager = getattr(modeling, "eager_attention_forward", None)
    code = getattr(eager, "__code__", None)
    if code is not None:
        target = state.target_of(code)
        if target is not None and target.explicit and target.names == ("attn_weights",):
            return call, (target, module)
    return call, None


def _request_call(call, request, rows, keys):
    """The part of a packed kernel call that belongs to one request."""
    (q0, q1), (k0, k1) = rows, keys
    mask = call.attn_mask
    if mask is not None and mask.dim() >= 2:
        mask = mask[..., q0:q1, :] if mask.shape[-2] > 1 else mask
        mask = mask[..., k0:k1] if mask.shape[-1] > 1 else mask
    return call.replace(query=call.query[..., q0:q1, :], key=call.key[..., k0:k1, :],
                        value=call.value[..., k0:k1, :], attn_mask=mask, request=request)


def shape_eager_paged(maps, source, frame):
    """The ``shape`` of ``eager_paged_attention_forward``'s ``attn_weights``: split per request.

    Returns ``_state.Parts``: each request's query rows over its own keys
    (``packed_requests``), or the packed maps as they are where the
    requests cannot be told apart (a warning says so).
    """
    if frame is None or getattr(maps, "ndim", 0) < 2:
        return maps
    local = frame.f_locals
    parts = packed_requests(frame, local.get("kwargs"), source, maps.shape[-2], maps.shape[-1],
                            "eager_paged_attention_forward")
    if parts is None:
        return maps
    return Parts((request, maps[..., q0:q1, k0:k1]) for request, (q0, q1), (k0, k1) in parts)


# Frames looked at above an attention function for the continuous batch running it.
_MAX_BATCH_DEPTH = 64


def batch_requests(frame):
    """The ids of the requests of the continuous batch whose forward runs ``frame``, or None.

    In packed order.  transformers' ``ModelRunner`` (and the
    ``ContinuousBatchProcessor`` above it) keep the batch being computed in
    ``inputs_and_outputs``: its ``requests_in_batch``, or those of the
    current pair of the asynchronous batching's two.  The request ids are
    nowhere else: the attention function gets only the cumulated lengths.
    """
    depth = 0
    while frame is not None and depth < _MAX_BATCH_DEPTH:
        if "continuous_batching" in frame.f_code.co_filename:
            ios = getattr(frame.f_locals.get("self"), "inputs_and_outputs", None)
            if ios is not None:
                requests = getattr(ios, "requests_in_batch", None)
                if requests is None:  # ContinuousBatchingAsyncIOs
                    try:
                        pair = ios.io_pairs[ios.current_pair]
                    except (AttributeError, IndexError, TypeError):
                        return None
                    requests = getattr(getattr(pair, "host_io", None), "requests_in_batch", None)
                if requests is None:
                    return None
                return [getattr(getattr(r, "state", r), "request_id", None) for r in requests]
        frame = frame.f_back
        depth += 1
    return None


def _lengths(value):
    """A 1-D tensor (or list) of cumulated lengths as a list of ints, or None."""
    tolist = getattr(value, "tolist", None)
    value = tolist() if tolist is not None else value
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value):
        return list(value)
    return None


def packed_requests(frame, kwargs, module, rows, keys, where):
    """Where each request of a continuous batch sits in a packed attention call.

    Returns ``[(request id, (first row, end row), (first key, end key)),
    ...]`` from the call's ``cu_seq_lens_q`` and ``cu_seq_lens_k`` (per
    layer type, where the model has several) and the request ids of the
    batch (``batch_requests``), for the requests with queries in this call.
    ``rows`` and ``keys`` are the call's query and key counts.  None when the
    call is not of a continuous batch; None too, with a warning once per
    function, when it is but its requests cannot be told apart.
    """
    if not isinstance(kwargs, dict) or kwargs.get("cu_seq_lens_q") is None:
        return None
    cu_q = _lengths(kwargs.get("cu_seq_lens_q"))
    cu_k = kwargs.get("cu_seq_lens_k")
    if isinstance(cu_k, dict):  # one per layer type, before the paged cache picks this layer's
        layer_type = None
        types = getattr(getattr(module, "config", None), "layer_types", None)
        index = getattr(module, "layer_idx", None)
        if isinstance(types, (list, tuple)) and isinstance(index, int) and index < len(types):
            layer_type = types[index]
        cu_k = cu_k.get(layer_type) if layer_type in cu_k else (
            next(iter(cu_k.values())) if len(cu_k) == 1 else None)
    cu_k = _lengths(cu_k)
    requests = batch_requests(frame)
    reason = None
    if cu_q is None or cu_k is None or len(cu_q) != len(cu_k) or len(cu_q) < 2:
        reason = "cu_seq_lens_q/cu_seq_lens_k missing or of different lengths"
    elif requests is None:
        reason = "the batch's request ids were not found above the call"
    elif cu_q[-1] > rows or cu_k[-1] > keys:
        reason = "the cumulated lengths ({} queries, {} keys) exceed the call's ({}, {})".format(
            cu_q[-1], cu_k[-1], rows, keys)
    elif any(cu_q[i + 1] > cu_q[i] for i in range(len(requests), len(cu_q) - 1)):
        reason = "{} sequences with queries for {} requests".format(len(cu_q) - 1, len(requests))
    if reason is not None:
        _warn_packed(where, reason)
        return None
    return [(requests[i], (cu_q[i], cu_q[i + 1]), (cu_k[i], cu_k[i + 1]))
            for i in range(min(len(requests), len(cu_q) - 1)) if cu_q[i + 1] > cu_q[i]]


_packed_warned = set()
_packed_lock = threading.Lock()


def _warn_packed(where, reason, stacklevel=4):
    """Say once per function that its continuous-batching maps cannot be split per request."""
    with _packed_lock:
        if where in _packed_warned:
            return
        _packed_warned.add(where)
    if "not captured" in reason:
        what = "{}: {}.".format(where, reason)
    else:
        what = (
            "{} computed the attention of a continuous batch (generate_batch) as one packed "
            "call, and its requests could not be told apart ({}): its maps are stored packed, "
            "every request's rows and keys glued together in one block-diagonal map.".format(
                where, reason))
    warnings.warn(
        "visualizer: {} To get one map per request, run each request alone through "
        "model.generate(), or use a transformers release whose continuous batching "
        "visualizer knows (5.23 to 5.25).".format(what), CaptureWarning, stacklevel=stacklevel)


def watch_eager_paged(get_local):
    """Watch ``eager_paged_attention_forward`` (``'paged|eager'``), split per request; once.

    Returns the functions watched: none when its module is not imported yet
    or the function is watched already.
    """
    module = sys.modules.get(EAGER_PAGED_MODULE)
    function = getattr(module, "eager_paged_attention_forward", None)
    for _ in range(10):  # 5.23 wraps it in @torch.compiler.disable
        inner = getattr(function, "__wrapped__", None)
        if inner is None:
            break
        function = inner
    code = getattr(function, "__code__", None)
    if code is None or get_local._state.target_of(code) is not None:
        return []
    if "attn_weights" not in code.co_varnames:
        _warn_packed("eager_paged_attention_forward",
                     "this release's eager_paged_attention_forward keeps no attn_weights, so "
                     "its 'paged|eager' maps are not captured at all", stacklevel=2)
        return []
    return [get_local._watch(function, ("attn_weights",), source="module", explicit=False,
                             attention=True, shape=shape_eager_paged)]


def watch_modeling_module(get_local, module):
    """Watch one modeling module's eager attention; return the functions watched."""
    watched = []
    eager = getattr(module, "eager_attention_forward", None)
    if getattr(eager, "__code__", None) is not None and \
            "attn_weights" in eager.__code__.co_varnames:
        watched.append(get_local._watch(eager, ("attn_weights",), source="module",
                                        explicit=False, attention=True))
    # Attention classes that compute their own softmax: every class of modules
    # without a module-level eager function (transformers 4.x, and 5.x models
    # such as BLOOM and XLNet), and those beside it (GIT's text attention, the
    # BigBird-Pegasus encoder's full attention).  Classes that dispatch to
    # eager_attention_forward store no softmax and are left alone.
    return watched + watch_softmax_outputs(get_local, module, batch_names=BATCH_NAMES)


_adapters_waiting = []


def wait_for_adapters():
    """Register the kernel adapters when (if) transformers' sdpa module is imported, once."""
    if not _adapters_waiting:
        _adapters_waiting.append(True)
        _imports.when_imported(SDPA_MODULE, on_sdpa_module)


def on_sdpa_module(module):
    """Register the adapter for ``sdpa_attention_forward`` (when its module is imported)."""
    function = getattr(module, "sdpa_attention_forward", None)
    if getattr(function, "__code__", None) is not None:
        kernel.adapter(function.__code__, adapt_sdpa)


def is_modeling_module(name):
    """Whether ``name`` is a transformers modeling module (``transformers.models.x.modeling_x``)."""
    parts = name.split(".")
    return len(parts) == 4 and parts[:2] == [PACKAGE, "models"] and \
        parts[3].startswith("modeling_") and \
        not parts[3].startswith(("modeling_tf_", "modeling_flax_"))


def _apply(get_local, module):
    if not is_modeling_module(module.__name__):
        return (), ()
    # modeling_utils imports the paged eager function before any modeling module
    return watch_eager_paged(get_local) + watch_modeling_module(get_local, module), ()


PRESET = Preset(
    "transformers", "transformers.models.*.modeling_*.eager_attention_forward",
    waits_for=PACKAGE + ".models", submodules=True, apply=_apply,
    still="its sdpa path is still captured at the kernel. To capture its eager path, watch "
          "the function that computes it with get_local.watch('module.function', 'variable').")
