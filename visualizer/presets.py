"""Watch the attention of every model, unedited: ``get_local.watch_attention()``.

Nothing is imported here: each family applies when its library is imported
by your code (or at once if it already is).  The families:

=============  ==============================================================
``'kernel'``   every call of ``torch.nn.functional.scaled_dot_product_attention``
               (timm's fused attention, transformers' default ``sdpa``,
               ``nn.MultiheadAttention``, diffusers, your own modules): its
               probabilities, under the ``__qualname__`` of the nearest
               ``nn.Module`` method that called it (``'Attention.forward'``,
               ``'BertSelfAttention.forward'``, ``'LlamaAttention.forward'``),
               source that module.  The model runs its own kernel; outputs
               are bit for bit those of a run without capture.  See
               ``visualizer.integrations.kernel``.
``'transformers'`` models that run eager attention: each modeling module's
               ``eager_attention_forward`` (``attn_weights``, key
               ``'eager_attention_forward'``, source the attention module), as
               the module is imported; 4.x: ``<Family>SelfAttention.forward``
               (``attention_probs``).
``'timm'``     the eager paths of timm's attention classes: in every timm
               module, every softmax result each class's methods store, as
               it is stored (``attn`` of ``Attention``, Swin, CaiT before its
               talking heads, ConViT, DaViT, EfficientFormer, each head of
               EfficientViT's loop, Halo, ...), under the method's
               qualname; on a fused path the kernel calls inside the same
               method supply its maps.
``'torch'``    ``nn.MultiheadAttention``: its fast path, a native kernel that
               runs no Python, is off while capturing; calls that ask for
               weights keep them per head (``attn_output_weights``, key
               ``'MultiheadAttention.forward'``), averaged for the caller as
               torch does.
=============  ==============================================================

Every family also turns the kernel seam on: the families above are what the
seam cannot see.  Nothing is switched to an eager path, so a model keeps its
output; the one exception is the MHA fast path, whose results can differ
from the Python path's in the last bits.
"""
import warnings
import weakref

from . import _imports
from ._errors import CaptureWarning, VisualizerTypeError, VisualizerValueError
from .integrations import timm as _timm
from .integrations import torch as _torch_integration
from .integrations import transformers as _transformers

__all__ = ["FAMILIES", "TRANSFORMERS_FAMILIES", "Watch", "watch_attention", "unwatch_attention"]


class Watch:
    """One function to watch: its module, qualname, variables and overrides."""

    def __init__(self, module, qualname, names=(), overrides=None, source=None, family=""):
        self.module = module
        self.qualname = qualname
        self.names = tuple(names)
        self.overrides = overrides
        self.source = source
        self.family = family

    @property
    def path(self):
        return "{}.{}".format(self.module, self.qualname)

    def __repr__(self):
        return "Watch({!r}, {})".format(self.path, ", ".join(map(repr, self.names)))


# transformers families checked in the tests against output_attentions under
# eager, on their default (sdpa) path and on eager; every other modeling
# module is watched the same way.
TRANSFORMERS_FAMILIES = ("bert", "roberta", "distilbert", "vit", "gpt2", "llama", "mistral",
                         "qwen2", "t5", "clip")

# Each family is a list of entries: "kernel", "transformers", "torch", or a
# list of alternative Watch objects for one function (the first that matches
# the installed code is used; a trailing None means "nothing to do if none
# matches", otherwise a mismatch is warned about).
FAMILIES = {
    "kernel": ["kernel"],
    "timm": ["timm"],
    "transformers": ["transformers"],
    "torch": ["torch"],
}


class _Applied:
    """What one ``watch_attention`` call set up, so it can be undone."""

    def __init__(self):
        self.functions = []
        self.callbacks = []
        self.switches = []


_applied = weakref.WeakKeyDictionary()  # get_local -> _Applied


def watch_attention(get_local, families=None):
    """Watch the attention of every model of the chosen families (default: all).

    Returns the dotted paths that are watched now or will be when imported.
    ``families`` limits it to some of ``FAMILIES`` (``'kernel'``, ``'timm'``,
    ``'transformers'``, ``'torch'``; one name or a list); each turns the
    kernel seam on.  Calling it again changes nothing.
    """
    if isinstance(families, str):
        families = [families]
    if families is not None and not isinstance(families, (list, tuple, set, frozenset)):
        raise VisualizerTypeError(
            "watch_attention takes a list of families such as ['timm'], got {} {!r}".format(
                type(families).__name__, families))
    chosen = list(FAMILIES) if families is None else list(families)
    unknown = [f for f in chosen if f not in FAMILIES]
    if unknown:
        raise VisualizerValueError(
            "watch_attention: unknown families {}; known: {}".format(
                ", ".join(map(repr, unknown)), ", ".join(map(repr, FAMILIES))))
    applied = _applied.setdefault(get_local, _Applied())
    get_local._state.kernel = True
    ref = weakref.ref(get_local)  # waiting callbacks must not keep get_local alive
    paths = []
    for family in chosen:
        for entry in FAMILIES[family]:
            if entry == "kernel":
                paths.append("torch.nn.functional.scaled_dot_product_attention")
                continue
            if entry == "torch":
                paths.append("torch.nn.MultiheadAttention.forward")
                callback, module = _torch_callback(ref, applied), "torch"
            elif entry == "transformers":
                paths.append("transformers.models.*.modeling_*.eager_attention_forward")
                callback, module = _transformers_callback(ref, applied), None
            elif entry == "timm":
                paths.append("timm.*: the softmax output of each attention class")
                callback, module = _timm_callback(ref, applied), None
            else:
                first = next(w for w in entry if w is not None)
                paths.append(first.path)
                callback = _alternatives_callback(ref, applied, entry)
                module = first.module
            if any(getattr(cb, "preset", None) == callback.preset for cb in applied.callbacks):
                continue  # watching twice changes nothing
            applied.callbacks.append(callback)
            if module is None:
                _imports.when_submodules_imported(
                    "transformers.models" if entry == "transformers" else "timm", callback)
            else:
                _imports.when_imported(module, callback)
    return paths


def unwatch_attention(get_local):
    """Undo ``watch_attention``: original code back, nothing left waiting, seam off."""
    applied = _applied.pop(get_local, None)
    get_local._state.kernel = False
    if applied is None:
        return
    for callback in applied.callbacks:
        _imports.cancel(callback)
    for on, off in applied.switches:
        get_local._state.remove_switch(on, off)
    for function in applied.functions:
        get_local._state.unregister(function)


def _alternatives_callback(ref, applied, alternatives):
    def apply(module):
        get_local = ref()
        if get_local is None:
            return
        errors = []
        for watch in alternatives:
            if watch is None:
                return
            try:
                function = get_local._watch(watch.path, watch.names, source=watch.source,
                                            overrides=watch.overrides, explicit=False,
                                            attention=True)
            except (ValueError, TypeError) as exc:
                errors.append(str(exc))
                continue
            applied.functions.append(function)
            return
        warnings.warn(
            "visualizer: the {} attention preset does not match the installed {} ({}), so "
            "its attention is not captured. Watch the function that computes it yourself "
            "with get_local.watch('module.Class.method', 'variable').".format(
                alternatives[0].path, alternatives[0].family, "; ".join(errors)),
            CaptureWarning, stacklevel=2)

    apply.preset = tuple(w.path if w is not None else None for w in alternatives)
    return apply


def _library_callback(ref, applied, preset, watch_module, still):
    """The callback of a library's preset: ``watch_module(get_local, module)`` for each
    module of the library as it is imported; if that fails, a warning says what is
    still captured (``still``) and the functions watched so far stay watched."""
    def apply(module):
        get_local = ref()
        if get_local is None:
            return
        try:
            applied.functions.extend(watch_module(get_local, module))
        except (ValueError, TypeError) as exc:
            warnings.warn("visualizer: the eager attention of {} cannot be watched ({}); {}"
                          .format(module.__name__, exc, still), CaptureWarning, stacklevel=2)

    apply.preset = preset
    return apply


def _transformers_callback(ref, applied):
    def watch_module(get_local, module):
        if not _transformers.is_modeling_module(module.__name__):
            return []
        return _transformers.watch_modeling_module(get_local, module)

    return _library_callback(
        ref, applied, "transformers", watch_module,
        "its sdpa path is still captured at the kernel. To capture its eager path, watch the "
        "function that computes it with get_local.watch('module.function', 'variable').")


def _timm_callback(ref, applied):
    return _library_callback(ref, applied, "timm", _timm.watch_module,
                             "its fused path is still captured at the kernel.")


def _torch_callback(ref, applied):
    # Waits for ``torch`` itself: its submodules are imported while torch's
    # __init__ runs, when torch.backends does not exist yet.
    def apply(torch):
        get_local = ref()
        if get_local is None:
            return
        mha = torch.nn.MultiheadAttention
        original = vars(mha)["forward"]
        replacement = _torch_integration.multihead_forward(original)
        get_local._state.register(replacement, ("attn_output_weights",), "self",
                                  explicit=False, attention=True)
        applied.functions.append(replacement)
        saved = {}

        def on():
            saved["forward"] = vars(mha)["forward"]
            saved["fastpath"] = torch.backends.mha.get_fastpath_enabled()
            mha.forward = replacement
            torch.backends.mha.set_fastpath_enabled(False)

        def off():
            if vars(mha).get("forward") is replacement:
                mha.forward = saved.get("forward", original)
            torch.backends.mha.set_fastpath_enabled(saved.get("fastpath", True))

        applied.switches.append((on, off))
        get_local._state.add_switch(on, off)

    apply.preset = "torch"
    return apply
