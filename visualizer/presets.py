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
``'torch'``    ``nn.MultiheadAttention`` and the layers built on it
               (``nn.TransformerEncoderLayer``, ``nn.TransformerEncoder``):
               each keeps the path torch chooses, its native fast path and
               nested tensors included; where that path calls no kernel,
               the maps are computed beside it from the module's own
               in-projection and masks (key ``'MultiheadAttention.forward'``,
               source the attention module).  See
               ``visualizer.integrations.torch``.
=============  ==============================================================

The kernel seam is in place whenever capture is on; every family also keeps
the kernel calls that no watched function takes, under the calling module's
method.  Nothing is switched to an eager path, so a model keeps its output,
bit for bit.  Every map a family delivers is ``(batch, heads, queries, keys)``,
heads merged into the batch axis by the model's code split apart (see
``visualizer.integrations.heads_apart``).  Each family is a ``Preset`` defined
by its library's module in ``visualizer.integrations``.
"""
import warnings
import weakref

from . import _imports
from ._errors import CaptureWarning, VisualizerTypeError, VisualizerValueError
from .integrations import presets as _presets

__all__ = ["FAMILIES", "watch_attention", "unwatch_attention"]

FAMILIES = tuple(_presets())  # the family names, in the order they apply


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
    ``'transformers'``, ``'torch'``; one name or a list); each keeps the
    kernel calls that no watched function takes.  Calling it again changes
    nothing.
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
    get_local._state.keep_calls = True
    paths = []
    for family in chosen:
        preset = _presets()[family]
        paths.append(preset.path)
        if preset.waits_for is None or \
                any(cb.preset is preset for cb in applied.callbacks):
            continue  # nothing to wait for, or watching twice changes nothing
        callback = _callback(weakref.ref(get_local), applied, preset)
        applied.callbacks.append(callback)
        if preset.submodules:
            _imports.when_submodules_imported(preset.waits_for, callback)
        else:
            _imports.when_imported(preset.waits_for, callback)
    return paths


def unwatch_attention(get_local):
    """Undo ``watch_attention``: original code back, nothing left waiting, switches off."""
    applied = _applied.pop(get_local, None)
    get_local._state.keep_calls = False
    if applied is None:
        return
    for callback in applied.callbacks:
        _imports.cancel(callback)
    for on, off in applied.switches:
        get_local._state.remove_switch(on, off)
    for function in applied.functions:
        get_local._state.unregister(function)


def _callback(ref, applied, preset):
    """The import callback of one family: ``preset.apply`` for each module it waits for.

    If that fails, a warning says what is still captured (``preset.still``) and
    what was watched so far stays watched.  ``ref`` is a weak reference to the
    ``get_local``: a callback waiting for an import must not keep it alive.
    """
    def apply(module):
        get_local = ref()
        if get_local is None:
            return
        try:
            functions, switches = preset.apply(get_local, module)
        except (ValueError, TypeError) as exc:
            warnings.warn("visualizer: the eager attention of {} cannot be watched ({}); {}"
                          .format(module.__name__, exc, preset.still), CaptureWarning,
                          stacklevel=2)
            return
        applied.functions.extend(functions)
        for on, off in switches:
            applied.switches.append((on, off))
            get_local._state.add_switch(on, off)

    apply.preset = preset
    return apply
