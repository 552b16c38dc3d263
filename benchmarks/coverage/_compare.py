"""What "covered" means, the same for every library.

An architecture is covered when every attention map of the independent
reference equals (``allclose``, absolute 1e-5) some map captured from the
default model, and the default model's outputs under capture are
bit-identical (``torch.equal``) to its outputs without capture.

Two rules of :func:`match_maps` make "equals" exact about what a map is:

* shapes: a map counts only in the reference's own layout, with one
  exception: size-1 axes added or dropped (timm's GlobalContext ``(B, 1, HW)``
  captured as ``(B, 1, HW, 1)``: one axis holds no choice of order).  Heads
  merged into the batch axis, ``(B*H, N, M)`` for ``(B, H, N, M)``, do not
  match: the views read the first axis of a 3-D map as heads;
* scores: a reference map that is no probability distribution (a model
  returning its pre-softmax scores as attentions: SqueezeBERT, ProphetNet's
  encoder and cross attention) matches a captured map equal to its softmax
  over the last axis, computed by the harness in float64; rows masked whole
  (every score ``-inf`` or float32's minimum) must be zeros or uniform in the
  captured map.  The row of such an architecture says so.
"""
import collections

import numpy as np

__all__ = ["ATOL", "tensors_in", "captured_maps", "match_maps", "outputs_equal", "one_line"]

ATOL = 1e-5


def one_line(error, limit=300):
    """``'TypeError: message'`` on one line, at most ``limit`` characters."""
    text = " ".join(str(error).split())
    if len(text) > limit:
        text = text[:limit - 3] + "..."
    return "{}: {}".format(type(error).__name__, text) if text else type(error).__name__


def tensors_in(value, path="", keep=None, _seen=None):
    """``[(path, tensor)]`` for every torch tensor in nested outputs (dicts, tuples, lists, ModelOutputs).

    ``keep(path)`` filters by path (for example only fields named like attentions).
    """
    import torch

    if _seen is None:
        _seen = set()
    found = []
    if isinstance(value, torch.Tensor):
        if keep is None or keep(path):
            found.append((path, value))
        return found
    if id(value) in _seen:
        return found
    _seen.add(id(value))
    if isinstance(value, dict) or hasattr(value, "keys") and hasattr(value, "__getitem__"):
        try:
            items = [(str(k), value[k]) for k in value.keys()]
        except Exception:
            items = []
    elif isinstance(value, (list, tuple)):
        items = [(str(i), v) for i, v in enumerate(value)]
    else:
        return found
    for key, item in items:
        found.extend(tensors_in(item, path + "." + key if path else key, keep, _seen))
    return found


def captured_maps(cache):
    """Every array-like value of a capture cache, as float32 NumPy arrays."""
    maps = []
    for values in cache.values():
        for value in values:
            if hasattr(value, "detach"):  # store='tensor'
                value = value.detach().float().cpu().numpy()
            if isinstance(value, np.ndarray) and value.dtype.kind == "f":
                maps.append(np.asarray(value, dtype=np.float32))
    return maps


def match_maps(reference, captured, owners=None):
    """Match every reference map (NumPy) to a captured map of the same shape and values.

    Returns ``(unmatched, reason, note)``: the number of reference maps without
    a match, a one-line description of them (empty when all matched), and a
    one-line note of how the matched ones matched where that was not plainly
    (empty otherwise: the reference maps the harness softmaxed).  ``owners``
    (one name per reference map, for example the module method that computed
    it) are named in the reason for the maps left unmatched.

    Shapes: a captured map matches a reference map of the same shape, or of
    the same shape once every size-1 axis is dropped from both (``(2, 1,
    256)`` and ``(2, 1, 256, 1)``); never one that holds the same values in
    another layout (``(B*H, N, M)`` against ``(B, H, N, M)``).

    Scores: a reference map that is no probability distribution (see
    :func:`_is_probability`; some models return their pre-softmax scores as
    "attentions") also matches a captured map that equals its softmax over the
    last axis, computed here in float64 (then float32); a row of the reference
    that is masked whole (every score ``-inf`` or at most half float32's most
    negative value) matches a captured row of zeros or a uniform one, the two
    conventions of the kernels, and nothing else.
    """
    by_shape = collections.defaultdict(list)
    by_squeezed = collections.defaultdict(list)  # (2, 1, 256) and (2, 1, 256, 1) are one layout
    for array in captured:
        by_shape[array.shape].append(array)
        by_squeezed[_squeezed(array.shape)].append(array)
    missing_shape = collections.Counter()
    wrong_value = collections.Counter()
    all_nan = collections.Counter()
    closest = {}
    missing_owners = collections.Counter()
    not_probabilities = 0
    softmaxed = 0
    for index, ref in enumerate(reference):
        candidates = _candidates(ref, by_shape, by_squeezed)
        if not candidates:
            missing_shape[ref.shape] += 1
            if owners:
                missing_owners[owners[index]] += 1
            continue
        if any(_equal(c, ref)[0] for c in candidates):
            continue
        probability = _is_probability(ref)
        if not probability and any(_matches_softmax(c, ref) for c in candidates):
            softmaxed += 1
            continue
        if ref.size and np.isnan(ref).all():
            all_nan[ref.shape] += 1
        else:
            wrong_value[ref.shape] += 1
            error = min(_equal(c, ref)[1] for c in candidates)
            closest[ref.shape] = min(error, closest.get(ref.shape, error))
            not_probabilities += not probability
        if owners:
            missing_owners[owners[index]] += 1
    unmatched = sum(missing_shape.values()) + sum(wrong_value.values()) + sum(all_nan.values())
    parts = []
    for shape, count in missing_shape.items():
        parts.append("{} of shape {} not captured".format(count, _shape(shape)))
    for shape, count in wrong_value.items():
        parts.append("{} of shape {} captured with other values (closest max error {:.2g})".format(
            count, _shape(shape), closest[shape]))
    for shape, count in all_nan.items():
        parts.append("{} of shape {} all NaN in the reference (nothing to compare with)".format(
            count, _shape(shape)))
    reason = ""
    if not_probabilities:
        parts.append("{} of the reference maps are no probabilities (values outside [0, 1] or rows "
                     "not summing to 1: scores returned as attentions), nor do their softmaxes match".format(
                         not_probabilities))
    if missing_owners:
        parts.append("computed in " + ", ".join("{} ({})".format(k, v) for k, v in missing_owners.items()))
    if parts:
        reason = "{}/{} maps unmatched: {}; captured shapes: {}".format(
            unmatched, len(reference), ", ".join(parts),
            ", ".join("{}x{}".format(len(v), _shape(k)) for k, v in sorted(by_shape.items())) or "none")
    note = ""
    if softmaxed:
        note = ("{} of the {} reference maps are scores, not probabilities (returned as attentions "
                "before their softmax): matched after the harness softmaxed them (float64, last axis)".format(
                    softmaxed, len(reference)))
    return unmatched, reason, note


def _squeezed(shape):
    return tuple(s for s in shape if s != 1)


def _candidates(ref, by_shape, by_squeezed):
    """The captured maps that may hold ``ref``'s values, reshaped to ``ref``'s shape."""
    candidates = by_shape.get(ref.shape, [])
    if not candidates:
        candidates = [c.reshape(ref.shape) for c in by_squeezed.get(_squeezed(ref.shape), [])]
    return candidates


def _equal(candidate, ref):
    """``(match, max abs error)``: NaN where both hold NaN, every other value within ``ATOL``."""
    if not candidate.size:
        return True, 0.0
    same_nan = bool(np.array_equal(np.isnan(candidate), np.isnan(ref)))
    with np.errstate(invalid="ignore"):
        diff = np.abs(candidate - ref)
    error = float(np.nanmax(diff)) if not np.isnan(diff).all() else float("nan")
    return same_nan and error <= ATOL, error


# A score at most this is a mask (float32's most negative value, which models add to masked scores).
_MASKED = np.finfo(np.float32).min / 2


def softmax_of_scores(ref):
    """``softmax(ref, last axis)`` in float64, then float32, and the mask of the rows masked whole.

    A row is masked whole where every score is ``-inf`` or at most ``_MASKED``; its softmax
    is left NaN here (``-inf`` rows) or uniform (finite mask values): the caller decides.
    """
    scores = np.asarray(ref, dtype=np.float64)
    masked = np.all(np.isneginf(scores) | (scores <= _MASKED), axis=-1)
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = scores - np.max(scores, axis=-1, keepdims=True)
        exp = np.exp(shifted)
        probabilities = exp / np.sum(exp, axis=-1, keepdims=True)
    return probabilities.astype(np.float32), masked


def _matches_softmax(candidate, ref):
    """Whether ``candidate`` equals the softmax of the scores ``ref`` (rows masked whole: zeros or uniform)."""
    if not candidate.size or np.isnan(ref).any() or np.isposinf(ref).any():
        return False
    expected, masked = softmax_of_scores(ref)
    if masked.any():
        rows = candidate[masked]
        zeros = np.all(np.abs(rows) <= ATOL, axis=-1, keepdims=True)
        uniform = np.full_like(rows, 1.0 / rows.shape[-1])
        expected = expected.copy()
        expected[masked] = np.where(zeros, 0.0, uniform)
    if not np.all(np.isfinite(candidate)) or not np.all(np.isfinite(expected)):
        return False
    return bool(np.max(np.abs(candidate - expected)) <= ATOL)


def _is_probability(array):
    """Whether every row of ``array`` is a probability distribution (or all zeros: a masked query)."""
    if not np.all(np.isfinite(array)) or array.min() < -1e-6 or array.max() > 1 + 1e-6:
        return False
    sums = array.sum(axis=-1)
    return bool(np.all((np.abs(sums - 1) < 1e-3) | (np.abs(sums) < 1e-6)))


def outputs_equal(first, second):
    """``''`` if both nested outputs hold bit-identical tensors (NaN equal to NaN), else why not."""
    import torch

    a = tensors_in(first)
    b = tensors_in(second)
    if [p for p, _ in a] != [p for p, _ in b]:
        return "output structure changed under capture"
    for (path, x), (_, y) in zip(a, b):
        if x.shape != y.shape or x.dtype != y.dtype:
            return "output {} changed shape or dtype under capture".format(path)
        if torch.equal(x, y):
            continue
        if x.is_floating_point() and torch.equal(torch.isnan(x), torch.isnan(y)) and torch.equal(
                torch.nan_to_num(x), torch.nan_to_num(y)):
            continue
        diff = (x.double() - y.double()).abs().max().item() if x.is_floating_point() else "n/a"
        return "output {} changed under capture (max abs diff {})".format(path or "tensor", diff)
    return ""


def _shape(shape):
    return "(" + ",".join(str(s) for s in shape) + ")"
