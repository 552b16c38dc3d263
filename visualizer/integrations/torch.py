"""torch: ``nn.MultiheadAttention`` and the transformer layers built on it.

While capturing, each module takes the path it would take without capture, so
its output keeps every bit, and its maps are taken where that path allows:

* the Python path with ``need_weights=False`` (what ``nn.TransformerEncoderLayer``,
  ``nn.TransformerDecoderLayer`` and open_clip ask for) calls the kernel, and
  the seam captures that call;
* ``need_weights=True, average_attn_weights=False`` returns the weights per
  head: they are the maps (but in training with dropout, where they are
  after dropout);
* everything else makes no kernel call: the native fast path for inference
  (``torch._native_multi_head_attention``, one fused operator), weights
  averaged over heads, ``nn.TransformerEncoderLayer``'s fused layer
  (``torch._transformer_encoder_layer_fwd``, which never calls the attention
  module) and ``nn.TransformerEncoder``'s nested tensors.  There the maps are
  computed beside the module, from its own in-projection of the inputs it saw
  and its masks merged as its Python path merges them (``attention_call``),
  by ``kernel.probabilities``: ``softmax(q kᵀ · scale + mask)``.

Maps are ``(batch, heads, queries, keys)`` (batch 1 for unbatched input),
under ``'MultiheadAttention.forward'`` with the attention module as source.
Rows where every key is masked are zeros, as in the kernel (torch's own
weights have NaN there).  Nested tensors (``nn.TransformerEncoder`` given a
``src_key_padding_mask`` in inference) hold no padding tokens and the output
is zeros there: in the maps, their rows and columns are zeros, and the maps
are as long as the encoder's input.  The fast path ignores ``is_causal``
without a mask, and so do the maps.
"""
import inspect
import sys
import threading

from . import kernel
from ._common import Preset

__all__ = ["PRESET", "attention_call", "multihead_forward", "encoder_layer_forward",
           "encoder_forward", "watch_multihead"]

# Per thread: .forwards, MultiheadAttention forwards run (a fused encoder layer runs
# none); .length, the padded length of the nested tensors an encoder is running.
_thread = threading.local()


def attention_call(attn, query, key, value=None, key_padding_mask=None, attn_mask=None):
    """Return the kernel call that ``attn`` (an ``nn.MultiheadAttention``) makes for these inputs.

    What its Python path hands ``scaled_dot_product_attention``, per head:
    ``q``, ``k`` (and ``v`` when ``value`` is given, else None) from its
    in-projection (``in_proj_weight``, or ``q_proj_weight``/``k_proj_weight``/
    ``v_proj_weight`` when ``kdim``/``vdim`` differ, and ``in_proj_bias``),
    ``bias_k``/``bias_v`` and a zero key appended for ``add_bias_kv`` and
    ``add_zero_attn``, and one additive mask: ``attn_mask`` (``(L, S)`` or
    ``(batch · heads, L, S)``) plus ``key_padding_mask`` (``(batch, S)``),
    boolean masks meaning masked where True (as ``F._canonical_mask`` reads
    them).  The inputs are laid out as the module takes them
    (``batch_first``, unbatched ``(L, E)``, nested tensors, whose missing
    tokens are masked as keys and as queries).
    """
    torch = sys.modules["torch"]
    linear = torch.nn.functional.linear
    missing_keys = missing_queries = None
    if query.is_nested:  # the fast path takes them for self-attention only: query is key
        same = (key is query, value is query)
        query, missing_queries = _padded(torch, query)
        if same[0]:
            key, missing_keys = query, missing_queries
        if same[1]:
            value = query
    if key.is_nested:
        key, missing_keys = _padded(torch, key)
    if value is not None and value.is_nested:
        value = _padded(torch, value)[0]
    if query.dim() == 2:  # unbatched: one sequence, batch_first does not apply
        query, key = query.unsqueeze(0), key.unsqueeze(0)
        value = None if value is None else value.unsqueeze(0)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif not attn.batch_first:
        query, key = query.transpose(0, 1), key.transpose(0, 1)
        value = None if value is None else value.transpose(0, 1)
    batch, length, embed = query.shape
    heads, dim = attn.num_heads, attn.head_dim
    if attn._qkv_same_embed_dim:
        weights = attn.in_proj_weight.chunk(3)
    else:
        weights = (attn.q_proj_weight, attn.k_proj_weight, attn.v_proj_weight)
    biases = (None,) * 3 if attn.in_proj_bias is None else attn.in_proj_bias.chunk(3)
    q = linear(query, weights[0], biases[0])
    k = linear(key, weights[1], biases[1])
    v = None if value is None else linear(value, weights[2], biases[2])
    masks = []  # additive, (batch or 1, heads or 1, L, S)
    if attn_mask is not None:
        attn_mask = _additive(torch, attn_mask, q.dtype)
        masks.append(attn_mask.reshape((1, 1) + attn_mask.shape if attn_mask.dim() == 2
                                       else (batch, heads) + attn_mask.shape[-2:]))
    if key_padding_mask is not None:
        masks.append(_additive(torch, key_padding_mask, q.dtype).reshape(batch, 1, 1, -1))
    if missing_keys is not None:
        masks.append(_additive(torch, missing_keys, q.dtype).view(batch, 1, 1, -1))
    extra = 0  # keys appended after the input's
    if attn.bias_k is not None:
        k = torch.cat([k, attn.bias_k.expand(batch, 1, embed)], dim=1)
        v = None if v is None else torch.cat([v, attn.bias_v.expand(batch, 1, embed)], dim=1)
        extra += 1
    q = q.reshape(batch, length, heads, dim).transpose(1, 2)
    k = k.reshape(batch, -1, heads, dim).transpose(1, 2)
    v = None if v is None else v.reshape(batch, -1, heads, dim).transpose(1, 2)
    if attn.add_zero_attn:
        k = torch.cat([k, k.new_zeros(batch, heads, 1, dim)], dim=2)
        v = None if v is None else torch.cat([v, v.new_zeros(batch, heads, 1, dim)], dim=2)
        extra += 1
    if extra:  # the appended keys are never masked
        masks = [torch.nn.functional.pad(m, (0, extra)) for m in masks]
    if missing_queries is not None:  # a missing query attends to nothing: a row of zeros
        masks.append(_additive(torch, missing_queries, q.dtype).view(batch, 1, -1, 1))
    mask = None
    for m in masks:
        mask = m if mask is None else mask + m
    return kernel.Call(q, k, v, attn_mask=mask)


def _additive(torch, mask, dtype):
    """A mask as ``F._canonical_mask`` makes it: added to the scores, -inf where True."""
    if mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        mask, float("-inf"))


def _padded(torch, nested):
    """A nested tensor ``(batch, ragged, E)`` padded with zeros, and where it is padding (True).

    As long as the nested tensors of the running ``nn.TransformerEncoder``
    (its input's length), else as its longest sequence.
    """
    parts = nested.unbind()
    lengths = [part.shape[0] for part in parts]
    longest = max([getattr(_thread, "length", None) or 0] + lengths)
    padded = torch.nested.to_padded_tensor(nested, 0.0, (len(parts), longest) +
                                           tuple(parts[0].shape[1:]))
    missing = torch.arange(longest, device=padded.device)[None, :] >= torch.tensor(
        lengths, device=padded.device)[:, None]
    return padded, missing


def _beside(state, target, attn, query, key, value, key_padding_mask, attn_mask, norm=None):
    """Capture the maps of one call of ``attn`` into ``target``, computed from its inputs.

    ``norm``: a module that makes the attention's input from ``query`` (a
    ``norm_first`` layer's ``norm1``; self-attention).  Nothing is computed
    when nothing would keep or hear it; in-projection and maps have no
    autograd graph unless the storage is ``'graph'``.
    """
    storage = state.storage
    listened = len(state.events)
    if storage.kind == "none" and not listened:
        return
    torch = sys.modules["torch"]
    try:
        with torch.set_grad_enabled(storage.kind == "graph"):
            if norm is not None:
                query = key = value = norm(query)
            call = attention_call(attn, query, key, value if listened else None,
                                  key_padding_mask, attn_mask)
        state.capture_call(target.keys[0], target.qualname, attn, call, (target, None, attn))
    except Exception as exc:  # a capture must never break the model
        state.capture_failed(target, exc)


def _forwards():
    return getattr(_thread, "forwards", 0)


def _tensor_type():
    return sys.modules["torch"].Tensor


def _same_names(forward, original):
    forward.__qualname__ = original.__qualname__
    forward.__name__ = original.__name__
    forward.__doc__ = original.__doc__
    forward.__module__ = original.__module__
    forward.__wrapped__ = original
    return forward


def multihead_forward(original, state, owner):
    """Build the ``MultiheadAttention.forward`` installed while capturing.

    It calls ``original`` with the caller's arguments, unchanged, so the
    caller gets exactly what torch returns, from the path torch chooses
    (the fast path included), and captures the maps into ``owner()`` (the
    target of this function): torch's weights bound to ``attn_output_weights``
    when they are per head, nothing when the Python path called the kernel
    (the seam took that call), else the maps computed beside it.
    """
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        if kernel.compiling():
            return original(self, *args, **kwargs)
        seen = kernel.calls_seen()
        _thread.forwards = _forwards() + 1
        result = original(self, *args, **kwargs)
        if kernel.calls_seen() != seen or not isinstance(result[0], _tensor_type()):
            return result  # the seam took the kernel call; or a tracer's proxies
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        weights = result[1]
        if call["need_weights"] and not call["average_attn_weights"] and weights is not None \
                and not (self.training and self.dropout > 0):
            per_head = weights if weights.dim() == 4 else weights.unsqueeze(0)
            attn_output_weights = per_head  # noqa: F841 - the rewritten code reads it at return
            return result
        _beside(state, owner(), self, call["query"], call["key"], call["value"],
                call["key_padding_mask"], call["attn_mask"])
        return result

    return _same_names(forward, original)


def encoder_layer_forward(original, state, owner):
    """Build the ``TransformerEncoderLayer.forward`` installed while capturing.

    When the layer's fused path ran (no ``MultiheadAttention.forward`` ran
    inside it), the maps of ``self.self_attn`` are computed beside it for the
    layer's input (``norm1`` of it when ``norm_first``) and masks.
    """
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        if kernel.compiling():
            return original(self, *args, **kwargs)
        before = _forwards()
        result = original(self, *args, **kwargs)
        if _forwards() == before and isinstance(result, _tensor_type()) and \
                isinstance(self.self_attn, sys.modules["torch"].nn.MultiheadAttention):
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            call = bound.arguments
            src = call["src"]
            _beside(state, owner(), self.self_attn, src, src, src,
                    call["src_key_padding_mask"], call["src_mask"],
                    self.norm1 if self.norm_first else None)
        return result

    return _same_names(forward, original)


def encoder_forward(original):
    """Build the ``TransformerEncoder.forward`` installed while capturing.

    It tells the maps of its layers how long its nested tensors are once
    padded: as long as its input, as torch pads its output.
    """
    def forward(self, src, *args, **kwargs):
        saved = getattr(_thread, "length", None)
        # Nested tensors are made for batch-first input only: its length is dimension 1.
        _thread.length = src.shape[1] if isinstance(src, _tensor_type()) and \
            not src.is_nested and src.dim() == 3 else None
        try:
            return original(self, src, *args, **kwargs)
        finally:
            _thread.length = saved

    return _same_names(forward, original)


def watch_multihead(get_local, torch):
    """Watch ``nn.MultiheadAttention`` and the encoder layers that fuse it, on every path.

    Returns ``(functions, switches)`` for ``visualizer.presets``: the
    ``MultiheadAttention.forward`` installed while capturing (its target keeps
    the maps), and the switch that installs it and the encoder's and encoder
    layer's forwards when capture starts, and puts torch's back when it stops.
    """
    state = get_local._state
    nn = torch.nn
    target = None

    def owner():
        return target

    replacements = {}
    for cls, build in ((nn.MultiheadAttention, multihead_forward),
                       (nn.TransformerEncoderLayer, encoder_layer_forward),
                       (nn.TransformerEncoder, encoder_forward)):
        original = vars(cls)["forward"]
        replacements[cls] = build(original) if build is encoder_forward else build(
            original, state, owner)
    attention = replacements[nn.MultiheadAttention]
    target = state.register(attention, ("attn_output_weights",), "self", explicit=False,
                            attention=True)
    saved = {}

    def on():
        for cls, replacement in replacements.items():
            saved[cls] = vars(cls)["forward"]
            cls.forward = replacement

    def off():
        for cls, replacement in replacements.items():
            if vars(cls).get("forward") is replacement:
                cls.forward = saved.get(cls, replacement.__wrapped__)

    return [attention], [(on, off)]


# Waits for ``torch`` itself: its submodules are imported while torch's
# __init__ runs, when torch.nn's transformer modules do not exist yet.
PRESET = Preset("torch", "torch.nn.MultiheadAttention.forward", waits_for="torch",
                apply=watch_multihead)
