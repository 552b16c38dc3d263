"""Where captures come from in code we do not own: one module per library.

This package plugs into the core (``visualizer._state.PLUGINS`` names it):
``plug_in(state)`` tells the state what computes attention (a softmax) and
adds the kernel seam and the compilers' support as extensions.  Each
library's module defines its ``watch_attention`` family as ``PRESET``;
``presets()`` gathers them, in the order of ``FAMILY_MODULES``.

* ``kernel``: the seam every library shares, torch's
  ``scaled_dot_product_attention``; captures each call's probabilities.
* ``transformers``: how its sdpa integration reshapes the kernel's input,
  and its eager-only models.
* ``timm``: timm's attention classes that never reach the kernel.
* ``torch``: ``nn.MultiheadAttention`` and the encoder layers that fuse it,
  whose fast paths make no kernel call: maps computed beside them.
* ``compile``: what torch's compilers (``torch.compile``, TorchScript) need
  from capture: rewritten code they can trace, and recompiling when it changes.

Nothing here imports a library: each module acts when the library is
imported by the user's code (``visualizer._imports``).  The next library is
one new module that registers a ``Preset`` if it needs one.
"""
from .. import _imports, _rewrite

__all__ = ["FAMILY_MODULES", "Preset", "is_softmax", "plug_in", "presets", "softmax_outputs",
           "wait_for_adapters", "watch_softmax_outputs"]

_adapters_waiting = False


def plug_in(state):
    """Extend a capture state with what the libraries need (``visualizer._state.PLUGINS``)."""
    from . import compile, kernel

    state.attention_marks.append(is_softmax)
    state.extend(kernel.Seam())
    state.extend(compile.Compilers(state))


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


# The modules here that define a ``PRESET``, in the order ``watch_attention`` applies them.
FAMILY_MODULES = ("kernel", "timm", "transformers", "torch")


def presets():
    """Return ``{family: Preset}`` of every module in ``FAMILY_MODULES`` (none imports its library)."""
    import importlib

    found = {}
    for name in FAMILY_MODULES:
        preset = importlib.import_module("{}.{}".format(__name__, name)).PRESET
        found[preset.family] = preset
    return found


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
            if code is None or not callable(function) or code.co_flags & 0x2A0:
                continue  # not a plain function (generators and coroutines are refused)
            names = softmax_outputs(code)
            if names:
                watched.append(get_local._watch(function, (names[0],), explicit=False,
                                                attention=True, collect=is_softmax))
    return watched


def wait_for_adapters():
    """Register each library's kernel adapters when (if) the library is imported."""
    global _adapters_waiting
    if _adapters_waiting:
        return
    _adapters_waiting = True
    from . import transformers

    _imports.when_imported(transformers.SDPA_MODULE, transformers.on_sdpa_module)
