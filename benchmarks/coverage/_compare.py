"""What "covered" means, the same for every library.

An architecture is covered when every attention map of the independent
reference equals (``allclose``, absolute 1e-5) some map captured from the
default model, and the default model's outputs under capture are
bit-identical (``torch.equal``) to its outputs without capture.
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

    Returns ``(unmatched, reason)``: the number of reference maps without a
    match and a one-line description of them (empty when all matched).
    ``owners`` (one name per reference map, for example the module method that
    computed it) are named in the reason for the maps left unmatched.
    """
    by_shape = collections.defaultdict(list)
    by_layout = collections.defaultdict(list)  # (B*H, N, M) and (B, H, N, M) hold the same values
    for array in captured:
        by_shape[array.shape].append(array)
        by_layout[(array.size, array.shape[-2:])].append(array)
    missing_shape = collections.Counter()
    wrong_value = collections.Counter()
    closest = {}
    missing_owners = collections.Counter()
    not_probabilities = 0
    for index, ref in enumerate(reference):
        candidates = by_shape.get(ref.shape, [])
        if not candidates:
            candidates = [c.reshape(ref.shape) for c in by_layout.get((ref.size, ref.shape[-2:]), [])]
        if not candidates:
            missing_shape[ref.shape] += 1
            if owners:
                missing_owners[owners[index]] += 1
            continue
        errors = [float(np.nanmax(np.abs(c - ref))) if c.size else 0.0 for c in candidates]
        same_nan = [bool(np.array_equal(np.isnan(c), np.isnan(ref))) for c in candidates]
        if any(e <= ATOL and s for e, s in zip(errors, same_nan)):
            continue
        wrong_value[ref.shape] += 1
        closest[ref.shape] = min(errors)
        not_probabilities += not _is_probability(ref)
        if owners:
            missing_owners[owners[index]] += 1
    unmatched = sum(missing_shape.values()) + sum(wrong_value.values())
    parts = []
    for shape, count in missing_shape.items():
        parts.append("{} of shape {} not captured".format(count, _shape(shape)))
    for shape, count in wrong_value.items():
        parts.append("{} of shape {} captured with other values (closest max error {:.2g})".format(
            count, _shape(shape), closest[shape]))
    reason = ""
    if not_probabilities:
        parts.append("{} of the reference maps are no probabilities (values outside [0, 1] or rows "
                     "not summing to 1: scores returned as attentions)".format(not_probabilities))
    if missing_owners:
        parts.append("computed in " + ", ".join("{} ({})".format(k, v) for k, v in missing_owners.items()))
    if parts:
        reason = "{}/{} maps unmatched: {}; captured shapes: {}".format(
            unmatched, len(reference), ", ".join(parts),
            ", ".join("{}x{}".format(len(v), _shape(k)) for k, v in sorted(by_shape.items())) or "none")
    return unmatched, reason


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
