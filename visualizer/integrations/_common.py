"""What the libraries' modules share: a preset's shape, what counts as a softmax, watching them."""
from .. import _compat, _rewrite

__all__ = ["Preset", "is_softmax", "softmax_outputs", "watch_softmax_outputs"]


def is_softmax(name):
    """Whether a loaded name computes attention probabilities: a softmax, never a log-softmax.

    ``softmax`` (``x.softmax(-1)``, ``F.softmax``, ``torch.softmax``), an
    ``nn.Softmax`` attribute (``self.softmax(x)``) and library softmaxes
    whose names end so (DeBERTa's and SEW-D's ``XSoftmax.apply``).
    """
    lowered = name.lower()
    return lowered.endswith("softmax") and not lowered.endswith(("logsoftmax", "log_softmax"))


def softmax_outputs(code):
    """Return the locals ``code`` stores a softmax into, in order of first store.

    How eager attention keeps its probabilities (``attn = q @ k.T; attn =
    attn.softmax(-1)``, ``F.softmax(x, dim=-1).to(dtype)``); a softmax stored
    as an attribute (``self.softmax = nn.Softmax(-1)``) counts nothing.
    """
    return _rewrite.stored_after(code, is_softmax)


class Preset:
    """One family of ``get_local.watch_attention``: what it waits for and what it watches.

    ``waits_for``: the module whose import applies it (``None``: nothing to
    wait for); with ``submodules=True``, every submodule of that package as it
    is imported.  ``apply(get_local, module)`` watches what it needs and
    returns ``(functions, switches)``: the functions it put under capture and
    the ``(on, off)`` pairs it added, both undone by ``unwatch_attention``.
    ``path`` says what is watched, as ``watch_attention`` returns it; ``still``
    says what is captured anyway when ``apply`` fails.
    """

    def __init__(self, family, path, waits_for=None, apply=None, submodules=False, still=""):
        self.family = family
        self.path = path
        self.waits_for = waits_for
        self.apply = apply
        self.submodules = submodules
        self.still = still


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
                                                attention=True, collect=is_softmax))
    return watched
