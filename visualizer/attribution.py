"""Relevance from attention maps and their gradients: what made a prediction, not where it looked.

Capture the maps of one forward pass with their gradients, back-propagate a
score, and pass the maps, in layer order, to these functions::

    from visualizer import get_local, attribution
    get_local.watch_attention()
    with get_local.capture(grad=True) as cache:
        logits = model(x)
    logits[0, logits[0].argmax()].backward()      # the score to explain
    maps = cache['Attention.forward']             # (B, H, T, T) each, with .grad
    R = attribution.relevance(maps)               # (B, T, T)
    R[:, 0, 1:]                                   # a ViT's patch relevance for its class

The methods, each from its paper, with ``A`` a layer's probabilities
``(B, H, T, T)``, ``∇A`` its gradient and ``(x)⁺`` the positive part:

* ``relevance``: Chefer, Gur and Wolf, "Generic Attention-model
  Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers"
  (ICCV 2021), the self-attention rule: ``R = I``; for each layer
  ``Ā = mean_h((∇A ⊙ A)⁺)`` and ``R ← R + Ā R``.  Row ``i`` of ``R`` is the
  relevance of every input token for output token ``i``: ``R[:, 0, 1:]`` for a
  ViT's CLS decision, ``R[:, -1]`` for a decoder's next token.
* ``encoder_decoder_relevance``: the same paper's rules for a decoder's
  cross-attention over an encoder (eqs. 6 to 10), for T5, BART, Whisper, DETR.
* ``attention_times_gradient``: each layer's ``Ā = mean_h((∇A ⊙ A)⁺)`` alone,
  the gradient-weighted attention the rule accumulates (the "GAE" layer term;
  the last layer's is the "Attn×Grad" baseline of the paper's comparisons).
* ``gradient_rollout``: attention rollout (below) of the layers' ``Ā``
  instead of their plain head mean, as in Jacob Gildenblat's "vit-explain"
  (2020), which is widely compared with; here the positive part is taken
  per head before the mean, as in ``Ā``.
* ``rollout``: attention rollout, Abnar and Zuidema, "Quantifying Attention
  Flow in Transformers" (ACL 2020): ``rownorm(mean_h(A) + I)`` multiplied
  through the layers; needs no gradient.  The mathematics is
  ``visualizer.attention.rollout``; this applies it per sample.

Maps are torch tensors with ``.grad`` (``capture(grad=True)``), or any arrays
with their gradients given as ``grads=``.  Results are torch tensors
(detached, on the maps' device) for tensors, NumPy arrays otherwise, in
float32 at least.

What is not here: the paper's rule for co-attention between two streams that
attend to each other (LXMERT's eq. 11 with ``R^{qs} ≠ 0``), and its LRP
variant (relevance propagated through the layers instead of the plain map,
the CVPR 2021 paper), which needs the model's layers, not only its maps.
"""
import sys
from typing import Any, Dict, List, Optional, Sequence

from ._errors import VisualizerTypeError, VisualizerValueError

__all__ = ["relevance", "attention_times_gradient", "gradient_rollout", "rollout",
           "encoder_decoder_relevance"]


def relevance(maps: Sequence[Any], grads: Optional[Sequence[Any]] = None) -> Any:
    """Return Chefer et al.'s relevance ``R`` (ICCV 2021), ``(B, T, T)``, of self-attention maps.

    ``maps`` holds one model's attention maps ``(B, H, T, T)`` (or
    ``(H, T, T)``, giving ``(T, T)``) in layer order, from one forward pass,
    each with the gradient of the explained score: tensors with ``.grad``
    (``get_local.capture(grad=True)`` and ``score.backward()``), or arrays
    with ``grads`` in the same order.  ``R = I``; for each layer
    ``Ā = mean_h((∇A ⊙ A)⁺)`` and ``R ← R + Ā R``.  Row ``i`` is the
    relevance of each input token for output token ``i``.

    >>> import numpy as np
    >>> maps = [np.full((1, 2, 3, 3), 1 / 3)] * 2
    >>> relevance(maps, grads=[np.ones((1, 2, 3, 3))] * 2)[0, 0]
    array([2., 1., 1.], dtype=float32)
    """
    layers = attention_times_gradient(maps, grads)
    hat = _accumulate(layers, "relevance")
    return hat + _backend_of(hat).eye(hat.shape[-1], hat)


def attention_times_gradient(maps: Sequence[Any],
                             grads: Optional[Sequence[Any]] = None) -> List[Any]:
    """Return each layer's gradient-weighted attention ``Ā = mean_h((∇A ⊙ A)⁺)``, ``(B, T, S)``.

    The term Chefer et al. (ICCV 2021) accumulate into ``relevance``: where a
    layer attends and raising that attention raises the score.  Arguments as
    ``relevance``; cross-attention maps (``S`` keys, ``T`` queries) are fine.

    >>> import numpy as np
    >>> attention_times_gradient([np.eye(2)[None]], grads=[-np.eye(2)[None]])[0]
    array([[0., 0.],
           [0., 0.]])
    """
    return [_weighted(backend, a, g) for backend, a, g in _pairs(maps, grads, "maps")]


def gradient_rollout(maps: Sequence[Any], grads: Optional[Sequence[Any]] = None, *,
                     discard_ratio: float = 0.0) -> Any:
    """Return the attention rollout of the layers' gradient-weighted attention, ``(B, T, T)``.

    Each layer's ``Ā = mean_h((∇A ⊙ A)⁺)`` (``attention_times_gradient``)
    takes the place of its head mean in ``rollout``: ``rownorm(Ā + I)``
    multiplied through the layers, first layer first, the lowest
    ``discard_ratio`` of each ``Ā`` set to 0 (Gildenblat's "vit-explain",
    2020).  Arguments as ``relevance``.
    """
    layers = attention_times_gradient(maps, grads)
    return _rollout([_heads_axis(layer) for layer in layers], "mean", discard_ratio,
                    "gradient_rollout")


def rollout(maps: Sequence[Any], *, head_fusion: str = "mean",
            discard_ratio: float = 0.0) -> Any:
    """Return the attention rollout (Abnar & Zuidema, 2020) of each sample, ``(B, T, T)``.

    ``visualizer.attention.rollout`` for every sample of maps
    ``(B, H, T, T)`` in layer order (``(H, T, T)`` gives ``(T, T)``); no
    gradient needed.  Beside ``relevance`` for comparison.
    """
    _check_list(maps, "maps")
    return _rollout(list(maps), head_fusion, discard_ratio, "rollout")


def encoder_decoder_relevance(encoder: Sequence[Any], decoder: Sequence[Any],
                              cross: Sequence[Any]) -> Dict[str, Any]:
    """Return Chefer et al.'s relevances (ICCV 2021) for an encoder-decoder transformer.

    ``encoder`` holds the encoder's self-attention maps ``(B, H, S, S)``,
    ``decoder`` the decoder's self-attention ``(B, H, T, T)`` and ``cross``
    its cross-attention over the encoder ``(B, H, T, S)``, one of each per
    decoder layer, all in layer order and with ``.grad``.  The rules of the
    paper's section 3 for two modalities where only the decoder attends to
    the encoder (its rule 11 then adds nothing):

    * ``R_ss`` of the encoder: the self-attention rule (``relevance``);
    * per decoder layer, self-attention: ``R_tt ← R_tt + Ā R_tt`` and
      ``R_ts ← R_ts + Ā R_ts`` (eqs. 6-7);
    * then cross-attention: ``R_ts ← R_ts + R̄_ttᵀ Ā R̄_ss`` (eq. 10), with
      ``R̄ = (R - I)`` row-normalised, plus ``I`` (eqs. 8-9; a row of
      ``R - I`` that sums to 0 stays 0).

    Returns ``{'encoder': R_ss (B, S, S), 'decoder': R_tt (B, T, T),
    'cross': R_ts (B, T, S)}``: row ``t`` of ``'cross'`` is the relevance of
    each input token for output token ``t``, of ``'decoder'`` that of the
    output tokens before it.
    """
    for value, what in ((encoder, "encoder"), (decoder, "decoder"), (cross, "cross")):
        _check_list(value, what)
    if len(decoder) != len(cross):
        raise VisualizerValueError(
            "encoder_decoder_relevance needs one cross-attention map per decoder "
            "self-attention map (one of each per decoder layer), got {} and {}".format(
                len(decoder), len(cross)))
    hat_ss = _accumulate(attention_times_gradient(encoder), "encoder_decoder_relevance")
    selfs = attention_times_gradient(decoder)
    _check_self_attention(selfs, "encoder_decoder_relevance")
    crosses = attention_times_gradient(cross)
    backend = _backend_of(selfs[0])
    t, s = crosses[0].shape[-2], crosses[0].shape[-1]
    if hat_ss.shape[-1] != s or selfs[0].shape[-1] != t:
        raise VisualizerValueError(
            "the cross-attention maps are {} queries by {} keys, but the decoder has {} tokens "
            "and the encoder {}: pass maps of the same forward pass".format(
                t, s, selfs[0].shape[-1], hat_ss.shape[-1]))
    hat_tt = backend.zeros(selfs[0])  # R_tt - I
    r_ts = backend.zeros(crosses[0])
    r_ss_bar = _normalised(backend, hat_ss)
    for self_map, cross_map in zip(selfs, crosses):
        hat_tt = hat_tt + self_map + self_map @ hat_tt    # eq. 6
        r_ts = r_ts + self_map @ r_ts                     # eq. 7
        # eq. 10 (rule 11 adds Ā R_st: R_st is 0, as the encoder never attends to the decoder)
        r_ts = r_ts + backend.transpose(_normalised(backend, hat_tt)) @ cross_map @ r_ss_bar
    return {"encoder": hat_ss + backend.eye(s, hat_ss),
            "decoder": hat_tt + backend.eye(t, hat_tt), "cross": r_ts}


# -- the pieces ------------------------------------------------------------------------

def _weighted(backend, a, g):
    """``mean_h((∇A ⊙ A)⁺)``: one copy, for every method here."""
    return backend.positive(g * a).mean(-3)


def _accumulate(layers, what):
    """``R - I`` after ``R = I``; ``R ← R + Ā R`` through ``layers`` (the self-attention rule).

    Kept as ``R̂ = R - I`` (``R̂ ← R̂ + Ā + Ā R̂``): the same numbers, without
    subtracting 1 from diagonals of ``1 + 1e-6`` in float32 where ``R̄``
    needs ``R - I`` (``encoder_decoder_relevance``).
    """
    _check_self_attention(layers, what)
    hat = None
    for layer in layers:
        hat = layer if hat is None else hat + layer + layer @ hat
    return hat


def _check_self_attention(layers, what):
    """Raise unless ``layers`` are self-attention of one forward pass: ``(B, T, T)``, one T."""
    n = layers[0].shape[-1]
    for i, layer in enumerate(layers):
        if layer.shape[-2] != layer.shape[-1] or layer.shape[-1] != n:
            raise VisualizerValueError(
                "{} needs the self-attention maps of one forward pass, all (B, H, T, T) with "
                "the same T; layer {} has {} queries over {} keys (layer 0: {} tokens). "
                "Cross-attention: use encoder_decoder_relevance; decoding with a KV cache: "
                "explain one forward pass over the whole sequence".format(
                    what, i, layer.shape[-2], layer.shape[-1], n))


def _normalised(backend, hat):
    """``R̄`` from ``R̂ = R - I``: rows over their sums (a row summing to 0 stays 0), plus ``I``.

    (Chefer et al.'s code divides 0 by 0 there and zeroes every NaN of the update.)
    """
    sums = hat.sum(-1)[..., None]
    return backend.where(sums > 0, hat / backend.where(sums > 0, sums, 1.0), 0.0) + \
        backend.eye(hat.shape[-1], hat)


def _heads_axis(layer):
    """A ``(B, T, T)`` layer as maps of one head, ``(B, 1, T, T)``."""
    return layer[..., None, :, :]


def _rollout(layers, head_fusion, discard_ratio, what):
    """``visualizer.attention.rollout`` (its one copy) of every sample, as the maps came."""
    import numpy as np

    from . import attention

    first = layers[0]
    shape = getattr(first, "shape", None)
    if shape is None or len(shape) not in (3, 4):
        raise VisualizerValueError(
            "{} needs maps (B, H, T, T) or (H, T, T) in layer order, got {}".format(
                what, "shape {}".format(tuple(shape)) if shape is not None else
                type(first).__name__))
    out = attention.rollout([attention.as_array(layer, what) for layer in layers],
                            head_fusion=head_fusion, discard_ratio=discard_ratio)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(first, torch.Tensor):
        dtype = first.dtype if first.dtype == torch.float64 else torch.float32
        return torch.as_tensor(out, dtype=dtype, device=first.device)
    return out.astype(np.float64 if first.dtype == np.float64 else np.float32)


# -- inputs ----------------------------------------------------------------------------

def _check_list(maps, what):
    if isinstance(maps, dict) or not isinstance(maps, (list, tuple)):
        raise VisualizerTypeError(
            "{} must be a list of per-layer attention maps in layer order, got {}: for "
            "get_local.by_module(...) pass [values[0] for values in by_module.values()], "
            "for a cache pass cache[key]".format(what, type(maps).__name__))
    if not maps:
        raise VisualizerValueError(
            "{} is empty: capture the model's attention first (get_local.capture(grad=True)) "
            "and pass its maps in layer order".format(what))


def _pairs(maps, grads, what):
    """``[(backend, map, gradient)]``, checked, detached, in float32 at least."""
    _check_list(maps, what)
    if grads is None:
        grads = []
        for i, value in enumerate(maps):
            grad = getattr(value, "grad", None)
            if grad is None:
                raise VisualizerValueError(
                    "{} layer {} has no gradient (.grad is None): capture with "
                    "get_local.capture(grad=True), call backward() on the score to explain, "
                    "then pass the maps; or pass grads= with arrays".format(what, i))
            grads.append(grad)
    else:
        _check_list(grads, "grads")
        if len(grads) != len(maps):
            raise VisualizerValueError(
                "got {} gradients for {} maps: pass one per layer, in the same order".format(
                    len(grads), len(maps)))
    out = []
    for i, (value, grad) in enumerate(zip(maps, grads)):
        backend = _backend_of(value)
        a, g = backend.array(value), backend.array(grad, like=value)
        if tuple(a.shape) != tuple(g.shape) or a.ndim not in (3, 4):
            raise VisualizerValueError(
                "{} layer {}: a map of shape {} and a gradient of shape {}; both must be "
                "(B, H, T, S) or (H, T, S)".format(what, i, tuple(a.shape), tuple(g.shape)))
        out.append((backend, a, g))
    return out


class _NumPy:
    """The few operations that differ between NumPy and torch, for NumPy."""

    @staticmethod
    def array(value, like=None):
        import numpy as np

        value = np.asarray(value)
        return value.astype(np.float64 if value.dtype == np.float64 else np.float32)

    @staticmethod
    def positive(x):
        import numpy as np

        return np.maximum(x, 0)

    @staticmethod
    def eye(n, like):
        import numpy as np

        return np.eye(n, dtype=like.dtype)

    @staticmethod
    def zeros(like):
        import numpy as np

        return np.zeros(like.shape, dtype=like.dtype)

    @staticmethod
    def transpose(x):
        return x.swapaxes(-1, -2)

    @staticmethod
    def where(condition, x, y):
        import numpy as np

        return np.where(condition, x, y)


class _Torch:
    """The same, for torch tensors: detached, on their device."""

    @staticmethod
    def array(value, like=None):
        torch = sys.modules["torch"]
        value = torch.as_tensor(value, device=like.device if like is not None else None)
        value = value.detach()
        return value if value.dtype == torch.float64 else value.float()

    @staticmethod
    def positive(x):
        return x.clamp(min=0)

    @staticmethod
    def eye(n, like):
        return sys.modules["torch"].eye(n, dtype=like.dtype, device=like.device)

    @staticmethod
    def zeros(like):
        return sys.modules["torch"].zeros_like(like)

    @staticmethod
    def transpose(x):
        return x.transpose(-1, -2)

    @staticmethod
    def where(condition, x, y):
        torch = sys.modules["torch"]
        return torch.where(condition, x, torch.as_tensor(y, dtype=x.dtype, device=x.device))


def _backend_of(value):
    torch = sys.modules.get("torch")
    return _Torch if torch is not None and isinstance(value, torch.Tensor) else _NumPy
