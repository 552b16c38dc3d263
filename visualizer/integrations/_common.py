"""What the libraries' modules share: a preset's shape, what counts as a softmax, watching them."""
import threading
import warnings

from .. import _compat, _rewrite
from .._errors import CaptureWarning

__all__ = ["HEAD_COUNTS", "Preset", "head_count", "heads_apart", "is_softmax", "softmax_outputs",
           "split_heads", "warn_unsplit", "watch_softmax_outputs"]


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


# How attention modules spell their head count (torch, timm: num_heads; transformers:
# num_heads, num_attention_heads, n_heads, n_head; some: heads).
HEAD_COUNTS = ("num_heads", "num_attention_heads", "n_heads", "n_head", "heads")

_warned = set()  # the functions whose maps could not be split, warned about once
_warned_lock = threading.Lock()


def head_count(module):
    """Return the number of heads an attention module says it has, or None."""
    for name in HEAD_COUNTS:
        value = getattr(module, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def split_heads(maps, heads, batch):
    """Return a 3-D map ``(batch x heads, queries, keys)`` as ``(batch, heads, queries, keys)``.

    A map whose first axis is ``batch`` alone is one head's (a loop over
    heads): ``(batch, 1, queries, keys)``.  Returns None where the first axis
    is neither (nothing to go by), and any map but a 3-D one as it is.
    """
    if getattr(maps, "ndim", None) != 3:
        return maps
    first, queries, keys = maps.shape
    if heads is None or batch is None:
        return None
    if first == batch * heads:
        return maps.reshape(batch, heads, queries, keys)
    if first == batch:
        return maps.reshape(batch, 1, queries, keys)
    return None


def warn_unsplit(where, module, shape):
    """Say once per function that its maps keep a layout without a heads axis."""
    with _warned_lock:
        if where in _warned:
            return
        _warned.add(where)
    owner = type(module).__name__ if module is not None else "its module"
    warnings.warn(
        "visualizer: {} computes its attention as {}, without a heads axis, and visualizer "
        "cannot tell its batch from its heads there ({} heads: {}): its maps are stored as "
        "computed, so the views read that first axis as heads. If it merges batch and heads, "
        "reshape in get_local.capture(transform={{key: lambda m: m.reshape(batch, heads, "
        "*m.shape[1:])}}).".format(where, tuple(shape), owner, head_count(module)),
        CaptureWarning, stacklevel=3)


def heads_apart(function, batch_names):
    """The ``shape`` of a preset watching ``function``: heads split from the batch axis.

    Several libraries' eager attention computes every head of every sample in
    one batched matmul, the heads merged into the batch axis (BART-era
    transformers: FSMT, MVP, XGLM, DETR's kin; ViTDet; timm's BoTNet and SAM),
    and returns or shows the maps split.  A 3-D map is split by the head count
    of the call's ``self`` (``head_count``) and the batch size the function
    holds in its local named one of ``batch_names`` (``bsz``, ``B``) when it
    returns; where either is missing, or the first axis is neither batch x
    heads nor batch, the map is kept and ``warn_unsplit`` says so.
    """
    where = function.__qualname__

    def shape(maps, source, frame):
        if getattr(maps, "ndim", None) != 3:
            return maps
        batch = None
        if frame is not None:
            local = frame.f_locals
            for name in batch_names:
                value = local.get(name)
                if isinstance(value, int) and not isinstance(value, bool):
                    batch = value
                    break
        split = split_heads(maps, head_count(source), batch)
        if split is None:
            warn_unsplit(where, source, maps.shape)
            return maps
        return split

    return shape


def watch_softmax_outputs(get_local, module, named=True, batch_names=()):
    """Watch the eager attention of ``module``'s attention classes; return the functions.

    In each class defined in ``module`` whose name says attention (``attn``,
    ``attention``; every class with ``named=False``), every method that stores a softmax into a local
    (``_rewrite.softmax_outputs``) is watched, as a preset, for every softmax
    result it stores, as it is stored: ``attn`` of timm's ``Attention.forward``,
    ``attention_probs`` of BLOOM, ``attn_prob`` of XLNet's ``rel_attn_core``,
    each head of EfficientViT's loop over heads, CaiT's probabilities before
    the talking heads mix them, both softmaxes of ConViT's gated attention.
    The cache key is the method's qualname.  Where a method multiplies the
    values (``attn @ v``) by a map it mixed from its softmaxes, or from what
    a sibling method returns (``_rewrite.applied_maps``), that map is kept
    too, as ``@`` takes it, under ``'<qualname>.applied'``: ConViT's gated
    map (``GPSA.forward.applied``, its two softmaxes under
    ``GPSA.get_attention``), CaiT's and EfficientFormerV2's map after the
    talking heads (``TalkingHeadAttn.forward.applied``), the differential
    map of ``DiffAttention``.  On a fused path nothing is
    stored and the kernel calls made inside the method supply its maps.
    A 3-D map is stored as ``(batch, heads, queries, keys)``: its heads split
    from the batch axis by the head count of the call's ``self`` and the batch
    size in the local that ``batch_names`` names (``heads_apart``).
    """
    watched = []
    for cls in list(vars(module).values()):
        if not isinstance(cls, type) or cls.__module__ != module.__name__:
            continue
        lowered = cls.__name__.lower()
        if named and "attention" not in lowered and "attn" not in lowered:
            continue
        functions = [f for f in map(_plain_function, list(vars(cls).values())) if f is not None]
        mixes = _mixes(functions)
        for function in functions:
            code = function.__code__
            names = softmax_outputs(code) or _rewrite.applied_maps(code, is_softmax, mixes)
            if names:
                watched.append(get_local._watch(function, (names[0],), explicit=False,
                                                attention=True, collect=is_softmax,
                                                shape=heads_apart(function, batch_names),
                                                mixes=mixes))
    return watched


def _plain_function(function):
    """The plain function under a class attribute's decorators, or None."""
    for _ in range(10):  # the function a decorator wraps (transformers' @deprecate_kwarg, ...)
        inner = getattr(function, "__wrapped__", None)
        if inner is None:
            break
        function = inner
    code = getattr(function, "__code__", None)
    if code is None or not callable(function) or code.co_flags & _compat.CO_NOT_PLAIN:
        return None  # not a plain function (generators and coroutines are refused)
    return function


def _mixes(functions):
    """``{method name: SOFTMAX or MIXED}`` for the methods that return a map (ConViT's
    ``get_attention``), so that a sibling storing their result knows what it holds."""
    mixes = {}
    for function in functions:
        try:
            returned = _rewrite.returned_map(function.__code__, is_softmax)
        except _rewrite.UnreadableCode:
            continue
        if returned is not None:
            mixes[function.__name__] = returned
    return mixes
