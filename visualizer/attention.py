"""The mathematics of attention maps, once: NumPy conversion, selections, reductions, rollout, grids.

Every other module that needs one of these calls it here; none keeps a copy.
An attention map is ``(..., heads, queries, keys)``: row ``i`` of a head is
how query ``i`` shares its attention over the keys.

Neither NumPy nor torch is imported with this module (the core imports it):
NumPy is imported by the functions that need it, and torch is never imported
at all.  A torch tensor is recognised by its type subclassing
``sys.modules['torch'].Tensor``.  The functions that take both arrays and
tensors (``select``, ``reduce_map``, ``reduce_rows``, ``rollout_step``,
``rownorm``) use what the two share (indexing, ``@``, ``mean``/``sum`` over
an axis) and four calls that differ (``_NumPy``, ``_Torch``), so the
capture-time reductions of the kernel seam and the NumPy rollout of the
figures run the same formulas, and a tensor stays on its device and in the
autograd graph.

>>> import numpy as np
>>> one = np.full((2, 3, 3), 1 / 3)         # 2 heads, 3 tokens
>>> reduce_map(one, "head_mean").shape
(3, 3)
>>> patch_grid(5)                           # CLS + a 2x2 grid of patches
((2, 2), 1)
"""
import math
import sys
import warnings

from ._errors import VisualizerTypeError, VisualizerValueError

__all__ = [
    "is_tensor", "to_numpy", "tensor_to_numpy", "owned_to_numpy", "as_array", "sample_maps",
    "why_not_maps",
    "check_selection", "positions", "select",
    "REDUCTIONS", "ROWS_PER_CHUNK", "check_reduce", "reduce_map", "reduce_rows",
    "rownorm", "rollout_step", "rollout",
    "MAX_PREFIX_TOKENS", "positive_pair", "parse_grid", "patch_grid",
]


# ---------------------------------------------------------------------------
# Tensors and NumPy
# ---------------------------------------------------------------------------

# Types known not to be tensors; the recorder's fast path (``_state``) looks here first.
plain_types = set()
_tensor_types = set()


def is_tensor(value):
    """Return True if ``value`` is a torch tensor (without importing torch).

    The answer is remembered per type, so the common case costs one lookup.
    """
    tp = type(value)
    if tp in plain_types:
        return False
    if tp in _tensor_types:
        return True
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(tp, type) and issubclass(tp, torch.Tensor):
        _tensor_types.add(tp)
        return True
    plain_types.add(tp)
    return False


def tensor_to_numpy(tensor):
    """Return a detached CPU NumPy copy of ``tensor``; float16 and bfloat16 become float32.

    NumPy has no bfloat16, hence the float32.  A tensor on the meta device has
    no data to copy and is returned detached.
    """
    import torch  # only reached with a tensor in hand, so torch is imported already

    t = tensor.detach()
    if t.device.type == "meta":
        return t  # shapes without data (timm builds models there): nothing to copy
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    if torch.jit.is_tracing():
        # Our copy is not part of the model: torch.jit.trace must not warn that
        # it "might cause the trace to be incorrect".
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            return _cpu_copy(t)
    return _cpu_copy(t)


def _cpu_copy(t):
    # .numpy() shares memory with a CPU tensor that the model may still change
    # in place after returning, so keep a copy nothing else can write to.
    if t.device.type == "cpu":
        return t.numpy().copy()
    return t.cpu().numpy()


def owned_to_numpy(tensor):
    """``tensor_to_numpy`` of a tensor nothing else holds or writes (a map the seam computed).

    On the CPU it is NumPy's view of the tensor, not a copy: the tensor is
    no view of a larger one and no model can change it in place.
    """
    torch = sys.modules["torch"]
    dtype = tensor.dtype
    if tensor.is_cpu and not tensor.requires_grad and dtype is not torch.float16 and \
            dtype is not torch.bfloat16 and not torch.jit.is_tracing():
        return tensor.numpy()
    return tensor_to_numpy(tensor)


def to_numpy(value):
    """Return ``value`` as the default storage keeps it: a tensor as ``tensor_to_numpy``, else as is."""
    if is_tensor(value):
        return tensor_to_numpy(value)
    return value


def as_array(value, what="attention", dtype="float64"):
    """Return ``value`` (an array, a torch tensor or nested lists) as a NumPy array of ``dtype``.

    ``dtype=None`` keeps the value's own dtype.  ``what`` names the value in
    the ``VisualizerTypeError`` raised when NumPy cannot read it.
    """
    import numpy as np

    try:
        return np.asarray(to_numpy(value), dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise VisualizerTypeError(
            "expected {} as a NumPy array, a torch tensor or nested lists of numbers, "
            "got {}: {}".format(what, type(value).__name__, exc)) from None


def why_not_maps(array, sample=0):
    """Return None if ``array`` holds square attention maps with sample ``sample``, else why not.

    Square maps: ``(batch, heads, N, N)``, ``(heads, N, N)`` or ``(N, N)`` of
    numbers, what the figures and the pages of self-attention draw.
    """
    if not hasattr(array, "ndim"):
        return "a {}, not an array".format(type(array).__name__)
    if array.ndim not in (2, 3, 4):
        return "shape {}, not (batch, heads, N, N), (heads, N, N) or (N, N)".format(
            tuple(array.shape))
    if array.shape[-1] != array.shape[-2] or array.size == 0:
        return "shape {}: the last two sizes are not one N x N map".format(tuple(array.shape))
    if array.dtype.kind not in "fiub":
        return "dtype {}, not numbers".format(array.dtype)
    if array.ndim == 4 and not -array.shape[0] <= sample < array.shape[0]:
        return "a batch of {}, which has no sample {}".format(array.shape[0], sample)
    return None


def sample_maps(value, sample=0, square=True, what="attention", dtype="float64"):
    """Return one sample's attention maps as a ``(heads, queries, keys)`` NumPy array.

    Takes ``(N, N)`` (one head), ``(heads, Nq, Nk)`` or ``(batch, heads, Nq,
    Nk)`` (``sample`` picks one; negative counts from the end).  ``square``
    asks for as many queries as keys.  Empty maps, NaN and inf are refused.
    """
    import numpy as np

    arr = as_array(value, what, dtype)
    if arr.ndim == 4:
        if not -arr.shape[0] <= sample < arr.shape[0]:
            raise VisualizerValueError(
                "sample={} is out of range for {} of shape {} (a batch of {}): pass sample "
                "between 0 and {}".format(sample, what, tuple(arr.shape), arr.shape[0],
                                          arr.shape[0] - 1))
        arr = arr[sample]
    elif arr.ndim == 2:
        arr = arr[None]
    elif arr.ndim != 3:
        raise VisualizerValueError(
            "expected {} of shape (heads, tokens, tokens) or (batch, heads, tokens, tokens), "
            "got shape {}".format(what, tuple(arr.shape)))
    if square and arr.shape[-1] != arr.shape[-2]:
        raise VisualizerValueError(
            "expected {} of shape (heads, tokens, tokens) with as many queries as keys, "
            "got shape {}".format(what, tuple(arr.shape)))
    if arr.size == 0:
        raise VisualizerValueError(
            "expected non-empty {}, got shape {}".format(what, tuple(arr.shape)))
    if not np.all(np.isfinite(arr)):
        bad = tuple(int(i) for i in np.argwhere(~np.isfinite(arr))[0])
        raise VisualizerValueError(
            "{} contains NaN or inf (first at index {} of shape {}): pass probabilities "
            "after softmax, with masked rows removed".format(what, bad, tuple(arr.shape)))
    return arr


class _NumPy:
    """What ``reduce_rows`` and ``rollout_step`` need beyond what arrays and tensors share."""

    @staticmethod
    def work(x):
        # float16 is summed in float32, as torch does; integers become float64.
        import numpy as np

        return x.astype(np.result_type(x.dtype, np.float32), copy=False)

    @staticmethod
    def empty(like, shape):
        import numpy as np

        return np.empty(shape, dtype=like.dtype)

    @staticmethod
    def arange(like, start, stop):
        import numpy as np

        return np.arange(start, stop)

    @staticmethod
    def where(condition, x, y):
        import numpy as np

        return np.where(condition, x, y)


class _Torch:
    """As ``_NumPy``, for tensors: on the tensor's device, in the autograd graph."""

    @staticmethod
    def work(x):
        torch = sys.modules["torch"]
        if x.dtype in (torch.float16, torch.bfloat16):
            return x.to(torch.float32)
        return x

    @staticmethod
    def empty(like, shape):
        return like.new_empty(shape)

    @staticmethod
    def arange(like, start, stop):
        return sys.modules["torch"].arange(start, stop, device=like.device)

    @staticmethod
    def where(condition, x, y):
        return sys.modules["torch"].where(condition, x, y)


def _backend(x):
    return _Torch if is_tensor(x) else _NumPy


# ---------------------------------------------------------------------------
# Selections: queries= and heads=
# ---------------------------------------------------------------------------

def check_selection(selection, what):
    """Return a ``queries=`` or ``heads=`` option checked: None, an int, a slice or a tuple of ints.

    A list or range becomes a tuple (hashable, unchangeable); anything else
    raises ``VisualizerTypeError`` with examples of what works.
    """
    if selection is None or isinstance(selection, slice):
        return selection
    if isinstance(selection, int) and not isinstance(selection, bool):
        return selection
    if isinstance(selection, (list, tuple, range)):
        items = list(selection)
        if items and all(isinstance(i, int) and not isinstance(i, bool) for i in items):
            return tuple(items)
    raise VisualizerTypeError(
        "{0} must be an int, a slice or a non-empty sequence of ints (e.g. {0}=-1, "
        "{0}=slice(0, 4), {0}=[0, 5]), got {1} {2!r}".format(
            what, type(selection).__name__, selection))


def positions(selection, size, what):
    """Return the positions (non-negative ints, in order given) that ``selection`` picks of ``size``.

    ``selection`` is an int, a slice or a sequence of ints; negative ints
    count from the end.  ``what`` (``'queries'`` or ``'heads'``) names it in
    the ``IndexError`` raised for a position out of range.
    """
    if isinstance(selection, slice):
        return list(range(size))[selection]
    picked = [selection] if isinstance(selection, int) else list(selection)
    out = []
    for i in picked:
        if not -size <= i < size:
            raise IndexError("{}={!r}: position {} is out of range for {} {}".format(
                what, selection, i, size, "heads" if what == "heads" else "queries"))
        out.append(i % size)
    return out


def select(value, queries=None, heads=None):
    """Pick query rows and heads of an attention map ``(..., heads, queries, keys)``.

    An int keeps its axis (``queries=-1`` gives one row, not none).  A NumPy
    array or a torch tensor; a value of fewer than 2 dimensions is returned as
    it is, and ``heads`` needs 3.
    """
    if getattr(value, "ndim", 0) < 2:
        return value
    if queries is not None:
        value = value[..., positions(queries, value.shape[-2], "queries"), :]
    if heads is not None and value.ndim >= 3:
        value = value[..., positions(heads, value.shape[-3], "heads"), :, :]
    return value


# ---------------------------------------------------------------------------
# Reductions: reduce=
# ---------------------------------------------------------------------------

REDUCTIONS = ("head_mean", "received", "rollout")
ROWS_PER_CHUNK = 256  # query rows reduced at once: the largest block is (..., heads, 256, keys)


def check_reduce(reduce, optional=False):
    """Return ``reduce`` if it names one of ``REDUCTIONS`` (or is None, when ``optional``).

    Raises ``VisualizerValueError`` listing the choices otherwise.
    """
    if reduce in REDUCTIONS or (optional and reduce is None):
        return reduce
    raise VisualizerValueError("reduce must be {}one of {}, got {!r}".format(
        "None or " if optional else "", ", ".join(map(repr, REDUCTIONS)), reduce))


def reduce_map(value, reduce, queries=None, heads=None, running=None, owner=None,
               rows_per_chunk=None):
    """Return ``reduce_rows`` of an attention map ``(..., heads, queries, keys)`` held in full.

    ``value`` is a NumPy array or a torch tensor (anything else is read by
    NumPy), and the result is of the same kind; ``heads`` are picked first.
    A map without a heads axis counts as one head.
    """
    if not is_tensor(value):
        import numpy as np

        value = np.asarray(value)
    if value.ndim < 3:
        value = value[..., None, :, :]
    if heads is not None:
        value = value[..., positions(heads, value.shape[-3], "heads"), :, :]
    return reduce_rows(lambda rows: value[..., rows, :], value.shape[-2], value.shape[-1],
                       reduce, queries, running, owner, rows_per_chunk, value)


def reduce_rows(rows_of, length, keys, reduce, queries=None, running=None, owner=None,
                rows_per_chunk=None, like=None):
    """Return a reduction of attention over ``length`` queries, ``rows_per_chunk`` rows at a time.

    ``rows_of(rows)`` gives the maps ``(..., heads, len(rows), keys)`` of some
    query rows (``rows`` a slice or a list of positions); each block is
    reduced and dropped, so the full matrix never exists at once.  ``like``
    (a map or the query: an array or a tensor) says which kind the result is.
    ``reduce`` is one of:

    * ``'head_mean'``: the mean over the heads, ``(..., queries, keys)``;
    * ``'received'``: the attention each key receives, the sum over the
      (selected) query rows, ``(..., heads, keys)``;
    * ``'rollout'``: attention rollout (Abnar & Zuidema, 2020) through this
      call, ``(..., queries, keys)``: ``R = Â @ R_before`` with
      ``Â = rownorm(0.5 · mean_heads(A) + 0.5 · I)`` (``rollout_step``) and
      ``R_before`` the rollout of the previous call of the same forward (the
      identity for its first call).  ``running`` (a dict, kept by the
      storage) holds ``R_before``; a forward is a run of calls in which no
      ``owner`` (the attention module) repeats and the token count stays the
      same, so the rollout starts again when a module already in it is
      called again.  ``queries`` picks rows of the result, not of the
      layer's attention.

    The result is float32 for float16/bfloat16 maps, else of their dtype.
    """
    check_reduce(reduce)
    chunk = rows_per_chunk or ROWS_PER_CHUNK
    xp = _backend(like)
    picked = positions(queries, length, "queries") if queries is not None else None
    if reduce == "rollout":
        return _rollout_rows(xp, rows_of, length, keys, picked, running, owner, chunk, like)
    rows = picked if picked is not None else range(length)
    out = None
    for start in range(0, len(rows), chunk):
        block = rows_of(_rows(rows, start, chunk))
        if block.ndim < 3:  # no heads axis: one head
            block = block[..., None, :, :]
        block = xp.work(block)
        if reduce == "head_mean":
            part = block.mean(-3)
            if out is None:  # filled in place: no second copy of the result for a concatenation
                out = xp.empty(part, part.shape[:-2] + (len(rows), keys))
            out[..., start:start + part.shape[-2], :] = part
        else:
            summed = block.sum(-2)
            out = summed if out is None else out + summed
        del block
    return out


def _rows(rows, start, chunk):
    if isinstance(rows, range):
        return slice(start, min(start + chunk, len(rows)))
    return rows[start:start + chunk]


def _rollout_rows(xp, rows_of, length, keys, picked, running, owner, chunk, like):
    if length != keys:
        raise VisualizerValueError(
            "reduce='rollout' needs self-attention over the same tokens ({} queries against "
            "{} keys here: cross-attention or decoding with a KV cache); capture the maps "
            "and use visualizer.plotting.attention_rollout on the layers you want".format(
                length, keys))
    if running is None:
        running = {}
    before = running.get("matrix")
    seen = running.setdefault("owners", set())
    token = id(owner) if owner is not None else None
    if before is not None and (token is None or token in seen):
        before = None  # a new forward begins
    matrix = None
    for start in range(0, length, chunk):
        stop = min(start + chunk, length)
        block = rows_of(slice(start, stop))
        if block.ndim < 3:
            block = block[..., None, :, :]
        fused = xp.work(block).mean(-3)
        del block
        if start == 0 and before is not None and (
                before.shape[:-2] != fused.shape[:-2] or before.shape[-1] != length):
            before = None  # other inputs: a new forward
        rows = rollout_step(fused, before, start)
        if matrix is None:
            matrix = xp.empty(rows, rows.shape[:-2] + (length, length))
        matrix[..., start:stop, :] = rows
    if before is None:
        seen.clear()
    running["matrix"] = matrix
    seen.add(token)
    if picked is None:
        return matrix
    return matrix[..., picked, :]


# ---------------------------------------------------------------------------
# Rollout (Abnar & Zuidema, 2020)
# ---------------------------------------------------------------------------

def rownorm(rows):
    """Return ``rows`` (``(..., N)``) divided by their sums; a row summing to 0 or less stays as it is.

    Such a row has no attention to share; dividing it by its sum would give
    NaN or flip its signs.  A NumPy array or a torch tensor.
    """
    sums = rows.sum(-1)[..., None]
    return rows / _backend(rows).where(sums > 0, sums, 1.0)


def rollout_step(fused, before=None, start=0, residual=True):
    """Return rows of one layer's rollout: ``rownorm(0.5 · fused + 0.5 · I) @ before``.

    ``fused`` holds query rows ``start .. start + r`` of the layer's attention
    with its heads fused (``(..., r, N)``; all of them by default), and is not
    changed; ``before`` is the rollout of the layers below (``(..., N, N)``), or
    None below the first layer (the identity).  The identity stands for the
    residual connection; ``residual=False`` leaves it out.  A NumPy array or a
    torch tensor.
    """
    if residual:
        fused = fused * 0.5
        diagonal = _backend(fused).arange(fused, start, start + fused.shape[-2])
        fused[..., diagonal - start, diagonal] += 0.5
    rows = rownorm(fused)
    return rows if before is None else rows @ before


_FUSIONS = ("mean", "max", "min")


def rollout(layers, head_fusion="mean", discard_ratio=0.0, residual=True, each=False):
    """Return the attention rollout of ``layers``: ``Â_L @ ... @ Â_1``, a NumPy ``(..., N, N)``.

    ``layers`` holds each layer's maps ``(..., heads, N, N)`` in forward order
    (a list, or an array whose first axis is the layers).  Per layer, the
    heads are fused (``'mean'``, ``'max'`` or ``'min'``), the lowest
    ``discard_ratio`` of the fused weights of each ``N x N`` matrix are set to
    0, and ``rollout_step`` adds the residual and renormalises the rows.  Row
    ``i`` of the result is how much output token ``i`` of the last layer draws
    from each input token.  ``each=True`` returns the rollout after every
    layer, stacked on a first axis.  A layer that leaves rows with no
    attention (``residual=False`` and a high ``discard_ratio``) warns: those
    rows stay zero.

    >>> import numpy as np
    >>> rollout([np.full((2, 3, 3), 1 / 3)] * 2).sum(-1)
    array([1., 1., 1.])
    """
    import numpy as np

    if head_fusion not in _FUSIONS:
        raise VisualizerValueError(
            "unknown head_fusion {!r}: use 'mean', 'max' or 'min'".format(head_fusion))
    if not 0.0 <= discard_ratio < 1.0:
        raise VisualizerValueError(
            "expected discard_ratio in [0, 1), got {!r}".format(discard_ratio))
    result, every = None, []
    for i, layer in enumerate(layers):
        fused = getattr(np, head_fusion)(np.asarray(layer, dtype=np.float64), axis=-3)
        if discard_ratio > 0:
            fused = _discard(np, fused, discard_ratio)
        step = rollout_step(fused, residual=residual)
        empty = int(np.sum(step.sum(-1) <= 0))
        if empty:
            warnings.warn(
                "layer {} leaves {} rows with no attention after discard_ratio={}; they stay "
                "zero, so rollout rows will not sum to 1: lower discard_ratio or use "
                "residual=True".format(i, empty, discard_ratio), UserWarning, stacklevel=3)
        result = step if result is None else step @ result
        every.append(result)
    if result is None:
        raise VisualizerValueError("expected at least one layer of attention, got none")
    return np.stack(every) if each else result


def _discard(np, fused, ratio):
    """Set the lowest ``ratio`` of each ``N x N`` matrix's weights to 0 (ties: first ones first)."""
    flat = fused.reshape(fused.shape[:-2] + (-1,)).copy()
    k = int(flat.shape[-1] * ratio)
    if k:
        lowest = np.argsort(flat, axis=-1, kind="stable")[..., :k]
        np.put_along_axis(flat, lowest, 0.0, axis=-1)
    return flat.reshape(fused.shape)


# ---------------------------------------------------------------------------
# Patch grids
# ---------------------------------------------------------------------------

# Largest number of prefix tokens (CLS, distillation, registers) tried when
# the patch grid is inferred from the sequence length.
MAX_PREFIX_TOKENS = 16


def positive_pair(value, name, expected):
    """Return a pair of positive ints from an int (both the same) or a pair.

    ``name`` names the value and ``expected`` the forms accepted, in errors.
    """
    if isinstance(value, int) and not isinstance(value, bool) or _is_numpy_int(value):
        first = second = int(value)
    else:
        try:
            first, second = (int(v) for v in value)
        except (TypeError, ValueError):
            raise VisualizerTypeError(
                "expected {} as {}, got {!r}".format(name, expected, value)) from None
    if first <= 0 or second <= 0:
        raise VisualizerValueError("expected a positive {}, got {!r}".format(name, value))
    return first, second


def _is_numpy_int(value):
    np = sys.modules.get("numpy")
    return np is not None and isinstance(value, np.integer)


def parse_grid(grid):
    """Return ``(rows, cols)`` from an int (a square grid) or a ``(rows, cols)`` pair."""
    return positive_pair(grid, "patch grid", "an int or a (rows, cols) pair")


def patch_grid(num_tokens, grid=None, num_prefix_tokens=None):
    """Return ``((rows, cols), prefix)``: the patch grid of ``num_tokens`` tokens and the tokens before it.

    Patches are in row-major order after ``prefix`` tokens (CLS,
    distillation, registers).  With ``grid`` (an int for a square) the prefix
    is what is left over; with only ``num_prefix_tokens`` the rest must be a
    square; with neither, the smallest prefix (0, 1, ... up to
    ``MAX_PREFIX_TOKENS``) that leaves a square number of patches is taken.

    >>> patch_grid(197)                  # ViT-B/16 at 224: CLS + 14 x 14
    ((14, 14), 1)
    >>> patch_grid(21, grid=4)           # CLS + 4 registers + 4 x 4
    ((4, 4), 5)
    """
    if grid is not None:
        rows, cols = parse_grid(grid)
        prefix = num_tokens - rows * cols
        if prefix < 0:
            raise VisualizerValueError(
                "grid {}x{} has {} patches and does not fit attention over {} tokens: pass "
                "the patch grid of the model (image size // patch size)".format(
                    rows, cols, rows * cols, num_tokens))
        if num_prefix_tokens is not None and num_prefix_tokens != prefix:
            raise VisualizerValueError(
                "grid {}x{} and num_prefix_tokens={} need {} tokens, which does not fit "
                "attention over {} tokens: fix grid or num_prefix_tokens".format(
                    rows, cols, num_prefix_tokens, rows * cols + num_prefix_tokens, num_tokens))
        return (rows, cols), prefix
    if num_prefix_tokens is not None:
        if not 0 <= num_prefix_tokens < num_tokens:
            raise VisualizerValueError(
                "num_prefix_tokens={} does not fit attention over {} tokens".format(
                    num_prefix_tokens, num_tokens))
        candidates = [num_prefix_tokens]
    else:
        candidates = range(0, min(MAX_PREFIX_TOKENS, num_tokens - 1) + 1)
    for prefix in candidates:
        side = math.isqrt(num_tokens - prefix)
        if side * side == num_tokens - prefix:
            return (side, side), prefix
    if num_prefix_tokens is not None:
        raise VisualizerValueError(
            "cannot infer a square patch grid from {} tokens minus {} prefix tokens ({} "
            "patches): pass grid=(rows, cols)".format(
                num_tokens, num_prefix_tokens, num_tokens - num_prefix_tokens))
    raise VisualizerValueError(
        "cannot infer a square patch grid from {} tokens: pass grid=(rows, cols) "
        "or num_prefix_tokens".format(num_tokens))
