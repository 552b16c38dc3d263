"""Watch the attention probabilities of well-known model families, unedited.

``get_local.watch_attention()`` applies every preset below whose library is
installed.  Nothing is imported: each preset waits until its module is
imported by your code (or applies at once if it already is).  While capture
is active the presets also make the modules take their eager path, and give
it back when capture stops:

========================  ================================================  ===============
family                    function (cache key)                              variable
========================  ================================================  ===============
timm ViT, DeiT, ...       ``timm.layers.attention.Attention.forward``       ``attn``
timm ViT with RoPE        ``timm.layers.attention.AttentionRope.forward``   ``attn``
timm BEiT                 ``timm.models.beit.Attention.forward``            ``attn``
timm EVA, EVA-02          ``timm.models.eva.EvaAttention.forward``          ``attn``
timm Swin                 ``timm.models.swin_transformer.WindowAttention``  ``attn``
timm Swin v2              ``timm.models.swin_transformer_v2.WindowAttention``  ``attn``
transformers 5.x BERT,    ``transformers.models.<family>.modeling_<family>  ``attn_weights``
RoBERTa, DistilBERT, ViT  .eager_attention_forward``
transformers 4.x BERT     ``...modeling_bert.BertSelfAttention.forward``    ``attention_probs``
torch                     ``torch.nn.MultiheadAttention.forward``           ``attn_output_weights``
========================  ================================================  ===============

How each family is made to show its probabilities while capturing:

* timm modules built with fused attention (the default) read
  ``self.fused_attn`` as False inside the watched forward; the module's own
  attribute is never changed, so it is fused again when capture stops.
* transformers 5.x: in the attention classes of the watched families and in
  transformers' mask builders (``transformers.masking_utils``),
  ``config._attn_implementation`` reads as ``'eager'``, so the eager function
  runs with an eager mask; the model and its config are not changed.  In
  4.x, where the SDPA class is chosen when the model is built, the SDPA
  self-attention falls back to its eager parent as it does for
  ``output_attentions=True``.
* ``nn.MultiheadAttention`` is asked for per-head weights on every call (its
  callers still get what they asked for: ``None`` for ``need_weights=False``,
  the head mean for ``average_attn_weights=True``), and PyTorch's fast path,
  which runs no Python code, is switched off
  (``torch.backends.mha.set_fastpath_enabled(False)``).

Captures of eager paths equal the fused results up to float rounding (about
1e-6); the attention is computed as the library's own eager code does.
"""
import inspect
import warnings
import weakref

from . import _imports
from ._errors import CaptureWarning, VisualizerTypeError, VisualizerValueError

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


def _timm(module, qualname, fused=True):
    return Watch(module, qualname, ("attn",), {"fused_attn": False} if fused else None,
                 family="timm")


_EAGER = {"_attn_implementation": "eager"}

# transformers 5.x builds attention masks here, in the format of the
# configured implementation; while capturing they are built as for eager.
_MASK_FUNCTIONS = ("create_causal_mask", "create_bidirectional_mask",
                   "create_sliding_window_causal_mask", "create_bidirectional_sliding_window_mask",
                   "create_chunked_causal_mask", "_preprocess_mask_arguments")

# transformers families whose eager attention we capture (tested against
# output_attentions); other families: get_local.watch their function yourself.
TRANSFORMERS_FAMILIES = ("bert", "roberta", "distilbert", "vit")


def _hf_mask(name):
    return [Watch("transformers.masking_utils", name, overrides=_EAGER,
                  family="transformers"), None]  # None: this transformers has no such function


# Each entry is a list of alternatives for one library version or another:
# the first that matches the installed code is used; a trailing None means
# "nothing to do if none matches", otherwise a mismatch is warned about.
FAMILIES = {
    "timm": [
        [_timm("timm.layers.attention", "Attention.forward")],
        [_timm("timm.layers.attention", "AttentionRope.forward")],
        [_timm("timm.models.beit", "Attention.forward")],
        [_timm("timm.models.eva", "EvaAttention.forward")],
        [_timm("timm.models.swin_transformer", "WindowAttention.forward")],
        [_timm("timm.models.swin_transformer_v2", "WindowAttention.forward", fused=False)],
    ],
    "transformers": [_hf_mask(name) for name in _MASK_FUNCTIONS] + [
        "transformers.models.{0}.modeling_{0}".format(f) for f in TRANSFORMERS_FAMILIES],
    "torch": ["torch"],
}


def _transformers_module(get_local, applied, module):
    """Watch one transformers modeling module, 5.x or 4.x style; return what was watched."""
    watched = []
    eager = getattr(module, "eager_attention_forward", None)
    if eager is not None:
        # 5.x: one module-level eager function, chosen at call time by
        # ``self.config._attn_implementation`` in the attention classes.
        watched.append(get_local.watch(eager, "attn_weights", source="module"))
        for cls in _classes_of(module):
            forward = vars(cls).get("forward")
            if forward is not None and "_attn_implementation" in _reads(forward):
                watched.append(get_local.watch(forward, overrides=_EAGER))
        if len(watched) == 1:
            raise VisualizerValueError(
                "no attention class of {} reads config._attn_implementation".format(
                    module.__name__))
    else:
        # 4.x: the eager class computes ``attention_probs``; the SDPA class,
        # chosen when the model is built, falls back to it when its
        # ``position_embedding_type`` is not absolute.
        prefix = module.__name__.rsplit("_", 1)[-1]
        for cls in _classes_of(module):
            if cls.__name__.lower() == prefix + "selfattention":
                watched.append(get_local.watch(vars(cls)["forward"], "attention_probs"))
            elif cls.__name__.lower() == prefix + "sdpaselfattention":
                watched.append(get_local.watch(
                    vars(cls)["forward"],
                    overrides={"position_embedding_type": "eager (visualizer)"}))
        if not watched:
            raise VisualizerValueError(
                "{} has neither eager_attention_forward nor a *SelfAttention class".format(
                    module.__name__))
    applied.functions.extend(watched)


def _classes_of(module):
    return [obj for obj in vars(module).values()
            if isinstance(obj, type) and obj.__module__ == module.__name__]


def _reads(function):
    from ._rewrite import loaded_attributes

    return loaded_attributes(function.__code__)


class _Applied:
    """What one ``watch_attention`` call set up, so it can be undone."""

    def __init__(self):
        self.functions = []
        self.callbacks = []
        self.switches = []


_applied = weakref.WeakKeyDictionary()  # get_local -> _Applied


def watch_attention(get_local, families=None):
    """Watch the attention of every supported family that is installed.

    Returns the dotted paths that are watched now or will be when imported.
    ``families`` limits it to some of ``FAMILIES`` (``'timm'``,
    ``'transformers'``, ``'torch'``; one name or a list).  Calling it again
    changes nothing.
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
    ref = weakref.ref(get_local)  # waiting callbacks must not keep get_local alive
    paths = []
    for family in chosen:
        for entry in FAMILIES[family]:
            if entry == "torch":
                paths.append("torch.nn.MultiheadAttention.forward")
                callback, module = _torch_callback(ref, applied), "torch"
            elif isinstance(entry, str):
                paths.append(entry + ".eager_attention_forward")
                callback, module = _module_callback(ref, applied, entry), entry
            else:
                first = next(w for w in entry if w is not None)
                paths.append(first.path)
                callback = _alternatives_callback(ref, applied, entry)
                module = first.module
            if any(getattr(cb, "preset", None) == callback.preset for cb in applied.callbacks):
                continue  # watching twice changes nothing
            applied.callbacks.append(callback)
            _imports.when_imported(module, callback)
    return paths


def unwatch_attention(get_local):
    """Undo ``watch_attention``: original code back, nothing left waiting."""
    applied = _applied.pop(get_local, None)
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
                function = get_local.watch(watch.path, *watch.names, source=watch.source,
                                           overrides=watch.overrides)
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


def _module_callback(ref, applied, name):
    def apply(module):
        get_local = ref()
        if get_local is None:
            return
        try:
            _transformers_module(get_local, applied, module)
        except (ValueError, TypeError) as exc:
            warnings.warn(
                "visualizer: the attention preset for {} does not match the installed "
                "transformers ({}), so its attention is not captured. Watch the function "
                "that computes it yourself with get_local.watch('module.Class.method', "
                "'variable').".format(name, exc), CaptureWarning, stacklevel=2)

    apply.preset = name
    return apply


def _torch_callback(ref, applied):
    # Waits for ``torch`` itself: its submodules are imported while torch's
    # __init__ runs, when torch.backends does not exist yet.
    def apply(torch):
        get_local = ref()
        if get_local is None:
            return
        mha = torch.nn.MultiheadAttention
        original = vars(mha)["forward"]
        replacement = _multihead_attention_forward(original)
        get_local._state.register(replacement, ("attn_output_weights",), "self")
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


def _multihead_attention_forward(original):
    """Build the ``MultiheadAttention.forward`` that presets install while capturing.

    It asks the original for per-head weights, keeps them in the local
    ``attn_output_weights`` (which get_local captures), and returns what the
    caller asked for.
    """
    signature = inspect.signature(original)

    def forward(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        call = bound.arguments
        need_weights = call["need_weights"]
        average = call.get("average_attn_weights", True)
        if call.get("is_causal") and call.get("attn_mask") is None:
            # PyTorch computes no weights for is_causal without a mask.
            return original(self, *args, **kwargs)
        call["need_weights"] = True
        call["average_attn_weights"] = False
        attn_output, attn_output_weights = original(**call)
        if not need_weights:
            return attn_output, None
        if average:
            return attn_output, attn_output_weights.mean(dim=1)
        return attn_output, attn_output_weights

    forward.__qualname__ = original.__qualname__
    forward.__name__ = original.__name__
    forward.__doc__ = original.__doc__
    forward.__module__ = original.__module__
    forward.__wrapped__ = original
    return forward
