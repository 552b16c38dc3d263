"""Where captures come from in code we do not own: one module per library.

* ``kernel``: the seam every library shares, torch's
  ``scaled_dot_product_attention``; captures each call's probabilities.
* ``transformers``: how its sdpa integration reshapes the kernel's input,
  and its eager-only models.
* ``timm``: timm's attention classes that never reach the kernel.
* ``torch``: ``nn.MultiheadAttention``'s fast path and its own weights.
* ``compile``: what torch's compilers (``torch.compile``, TorchScript) need
  from capture: rewritten code they can trace, and recompiling when it changes.

Nothing here imports a library: each module acts when the library is
imported by the user's code (``visualizer._imports``).  The next library is
one new module, and an entry in ``visualizer.presets.FAMILIES`` if it needs a
preset.
"""
from .. import _compat, _imports

__all__ = ["wait_for_adapters", "watch_softmax_outputs"]

_adapters_waiting = False


def watch_softmax_outputs(get_local, module, named=True):
    """Watch the eager attention of ``module``'s attention classes; return the functions.

    In each class defined in ``module`` whose name says attention (``attn``,
    ``attention``; every class with ``named=False``), every method that stores a softmax into a local
    (``_rewrite.softmax_outputs``) is watched, as a preset, for every softmax
    result it stores, as it is stored: ``attn`` of timm's ``Attention.forward``,
    ``attention_probs`` of BLOOM, ``attn_prob`` of XLNet's ``rel_attn_core``,
    each head of EfficientViT's loop over heads, CaiT's probabilities before
    the talking heads mix them, both softmaxes of ConViT's gated attention.
    The cache key is the method's qualname.  On a fused path nothing is
    stored and the kernel calls made inside the method supply its maps.
    """
    from .._rewrite import softmax_outputs

    watched = []
    for cls in list(vars(module).values()):
        if not isinstance(cls, type) or cls.__module__ != module.__name__:
            continue
        lowered = cls.__name__.lower()
        if named and "attention" not in lowered and "attn" not in lowered:
            continue
        for function in list(vars(cls).values()):
            # the function a decorator wraps (transformers' @deprecate_kwarg, ...)
            for _ in range(10):
                inner = getattr(function, "__wrapped__", None)
                if inner is None:
                    break
                function = inner
            code = getattr(function, "__code__", None)
            if code is None or not callable(function) or code.co_flags & _compat.CO_NOT_PLAIN:
                continue  # not a plain function (generators and coroutines are refused)
            names = softmax_outputs(code)
            if names:
                watched.append(get_local._watch(function, (names[0],), explicit=False,
                                                attention=True, collect=True))
    return watched


def wait_for_adapters():
    """Register each library's kernel adapters when (if) the library is imported."""
    global _adapters_waiting
    if _adapters_waiting:
        return
    _adapters_waiting = True
    from . import transformers

    _imports.when_imported(transformers.SDPA_MODULE, transformers.on_sdpa_module)
