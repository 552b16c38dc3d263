"""How captured values are kept: conversion, transform and a bound per key.

The default keeps a torch tensor as a detached NumPy copy on the CPU (float16
and bfloat16 as float32, since NumPy has no bfloat16) and any other value as
it is.  A map that the kernel seam computed itself is a new tensor nothing else
holds, so it is kept as NumPy's view of it (``Storage.convert_owned``): no copy
is needed for nothing else to write it.  Other kinds of storage, chosen with
``get_local.configure`` or ``get_local.capture``:

* ``'tensor'``: a detached copy on the tensor's own device; no transfer, so
  no device synchronisation during the forward pass;
* ``'graph'``: the tensor itself, still attached to the autograd graph (for
  gradient-weighted attention rollout);
* ``'none'``: nothing is stored; event handlers still see every capture.

``grad=True`` keeps each captured tensor itself (``'graph'``) so that it
receives its gradient when the caller runs ``backward()``: attention maps
computed at the kernel seam are leaves that the kernel's output leads the
loss to (``integrations.kernel.join``); tensors a function bound itself (an
eager attention's ``attn``) are kept with ``retain_grad()``.  Query rows and
heads picked from such a tensor (``queries=``, ``heads=``) get the rows and
heads of its gradient, through a hook.

A ``transform`` runs on the raw value before it is stored (head mean, CLS row,
float16...), and ``keep_last=N`` keeps only the last N values of each key.

Torch is never imported here: tensors are recognised and converted by
``visualizer.attention`` (``is_tensor``, ``to_numpy``), as are the
``queries=``, ``heads=`` and ``reduce=`` of attention maps.
"""
import warnings
import weakref

from .._errors import CaptureWarning, VisualizerTypeError, VisualizerValueError
# The recorder (_state.make_record) reads plain_types and to_numpy from this module.
from ..attention import (check_reduce, check_selection, is_tensor, owned_to_numpy,  # noqa: F401
                         plain_types, reduce_map, select, to_numpy)

KINDS = ("numpy", "tensor", "graph", "none")

NO_SOURCE = object()


def _detached_copy(value):
    if is_tensor(value):
        return value.detach().clone()
    return value


def _as_is(value):
    return value


_CONVERTERS = {"numpy": to_numpy, "tensor": _detached_copy, "graph": _as_is, "none": None}
# For a tensor nothing else holds or writes (``Storage.convert_owned``): no copy needed.
_OWNED_CONVERTERS = {"numpy": owned_to_numpy, "tensor": _as_is, "graph": _as_is, "none": None}


class Storage:
    """One storage configuration: kind, transform and bound (immutable)."""

    __slots__ = ("kind", "transform", "keep_last", "convert", "convert_owned", "queries",
                 "heads", "reduce", "stream", "append", "running", "grad", "warned")

    def __init__(self, kind="numpy", transform=None, keep_last=None, queries=None, heads=None,
                 reduce=None, stream=None, grad=False, append=False):
        if not isinstance(grad, bool):
            raise VisualizerTypeError("grad must be True or False, got {} {!r}".format(
                type(grad).__name__, grad))
        if kind is None:
            kind = "graph" if grad else "numpy"
        if kind not in KINDS:
            raise VisualizerValueError(
                "store must be one of {}, got {!r}".format(", ".join(map(repr, KINDS)), kind))
        if grad:
            check_grad(kind, transform, reduce, stream)
        if transform is not None and not callable(transform) and not isinstance(transform, dict):
            raise VisualizerTypeError(
                "transform must be a callable taking the captured value, or a dict from "
                "cache key to such a callable; got {} {!r}".format(
                    type(transform).__name__, transform))
        if isinstance(transform, dict):
            for key, fn in transform.items():
                if not callable(fn):
                    raise VisualizerTypeError(
                        "transform[{!r}] must be callable, got {!r}".format(key, fn))
        if keep_last is not None and (
                isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1):
            raise VisualizerValueError(
                "keep_last must be a positive integer or None, got {!r}".format(keep_last))
        self.kind = kind
        self.transform = transform
        self.keep_last = keep_last
        self.queries = check_selection(queries, "queries")
        self.heads = check_selection(heads, "heads")
        self.reduce = check_reduce(reduce, optional=True)
        self.running = {} if reduce == "rollout" else None  # the rollout so far
        if stream is not None:
            check_stream(stream, kind, keep_last)
        if not isinstance(append, bool):
            raise VisualizerTypeError("append must be True or False, got {!r}".format(append))
        if append and stream is None:
            raise VisualizerValueError(
                "append=True adds a run to a stream folder; pass the folder too: "
                "stream='run.vz', append=True")
        self.stream = stream
        self.append = append
        self.convert = _CONVERTERS[kind]
        # A value that nothing else holds (an attention map the kernel seam computed) is
        # stored by this, with no copy, when nothing transforms it (see ``State.capture_call``).
        self.convert_owned = _OWNED_CONVERTERS[kind] if transform is None and not grad else None
        self.grad = grad
        self.warned = set()  # keys warned about: a tensor that can receive no gradient

    @property
    def is_default(self):
        """True for plain NumPy storage with no transform and no bound."""
        return (self.kind == "numpy" and self.transform is None and self.keep_last is None
                and self.queries is None and self.heads is None and self.reduce is None
                and self.stream is None and not self.grad)

    def prepare(self, key, value, attention=False, source=None):
        """Return the value to store for ``key`` (select, transform, then convert).

        ``attention``: the value is an attention map ``(..., heads, queries,
        keys)`` computed in full, so ``queries``, ``heads`` and ``reduce`` are
        applied here (the kernel seam applies them while computing); ``source``
        is the module that computed it (the rollout's layer).
        """
        if self.grad:
            return self.with_gradient(key, value, attention)
        if attention and self.reduce is not None and getattr(value, "ndim", 0) >= 2:
            value = reduce_map(value, self.reduce, self.queries, self.heads, self.running,
                               source)
        elif attention and (self.queries is not None or self.heads is not None):
            value = select(value, self.queries, self.heads)
        transform = self.transform
        if transform is not None:
            if isinstance(transform, dict):
                fn = transform.get(key)
                if fn is not None:
                    value = fn(value)
            else:
                value = transform(value)
        return self.convert(value)

    def with_gradient(self, key, value, attention=False):
        """Return what ``grad=True`` keeps of ``value``: a tensor whose ``.grad`` will be filled.

        A tensor the loss may depend on keeps its gradient (``retain_grad``;
        a leaf keeps it anyway).  Rows and heads picked from an attention map
        are a new leaf, given the picked part of the map's gradient by a
        hook on the map.  A floating tensor that requires no gradient (the
        forward ran under ``torch.no_grad()``, or nothing before it requires
        grad) is kept as it is, and a warning says so once per key.
        """
        if not is_tensor(value):
            return value
        if not value.requires_grad:
            if value.is_floating_point() and key not in self.warned:
                self.warned.add(key)
                warnings.warn(
                    "get_local: {!r} was captured with grad=True, but it requires no gradient, "
                    "so backward() will leave its .grad None: run the forward with gradients "
                    "enabled (not under torch.no_grad() or torch.inference_mode()), with a "
                    "parameter or the input requiring grad".format(key),
                    CaptureWarning, stacklevel=5)
            return value
        if attention and (self.queries is not None or self.heads is not None) and \
                getattr(value, "ndim", 0) >= 2:
            return _picked_gradient(value, self.queries, self.heads)
        if not value.is_leaf:
            value.retain_grad()
        return value

    def as_dict(self):
        """The settings as ``configure``'s keywords (``reduce``, ``stream``, ``append`` if set)."""
        settings = {"store": self.kind, "transform": self.transform,
                    "keep_last": self.keep_last, "queries": self.queries, "heads": self.heads}
        if self.reduce is not None:
            settings["reduce"] = self.reduce
        if self.stream is not None:
            settings["stream"] = self.stream
        if self.grad:
            settings["grad"] = True
        if self.append:
            settings["append"] = True
        return settings

    def __repr__(self):
        return ("Storage(store={!r}, transform={!r}, keep_last={!r}, queries={!r}, "
                "heads={!r}, reduce={!r}, stream={!r}, grad={!r}, append={!r})").format(
                    self.kind, self.transform, self.keep_last, self.queries, self.heads,
                    self.reduce, self.stream, self.grad, self.append)


def _picked_gradient(value, queries, heads):
    """A leaf holding rows and heads of ``value``, its ``.grad`` those of ``value``'s gradient."""
    picked = select(value.detach(), queries, heads).requires_grad_(True)

    def give(grad):
        part = select(grad, queries, heads)
        picked.grad = part if picked.grad is None else picked.grad + part

    value.register_hook(give)
    return picked


def check_grad(kind, transform, reduce, stream):
    """Check the options that ``grad=True`` cannot go with, naming the way out."""
    if kind != "graph":
        raise VisualizerValueError(
            "grad=True keeps each captured tensor itself, so that it receives its gradient; "
            "store={!r} keeps {}: leave store out (or use store='graph')".format(
                kind, "nothing" if kind == "none" else "a detached copy, which never does"))
    if transform is not None:
        raise VisualizerValueError(
            "grad=True cannot go with transform=: a transformed tensor is not what the "
            "output was computed from, so backward() never reaches it. Capture the maps "
            "and transform them (and their .grad) after backward()")
    if reduce is not None:
        raise VisualizerValueError(
            "grad=True cannot go with reduce={!r}: a reduction is not what the output was "
            "computed from, so it has no gradient. Capture the maps and reduce them after "
            "backward() (visualizer.attribution)".format(reduce))
    if stream is not None:
        raise VisualizerValueError(
            "grad=True cannot go with stream={!r}: files on disk cannot receive a gradient. "
            "Capture into memory, run backward(), then save what you need".format(stream))


def check_stream(stream, kind, keep_last):
    """Check a ``stream=`` option: a folder path, with NumPy storage and no ``keep_last``."""
    import os

    if not isinstance(stream, (str, os.PathLike)):
        raise VisualizerTypeError(
            "stream must be the path of a folder to write captures into (str or "
            "os.PathLike), got {} {!r}".format(type(stream).__name__, stream))
    if kind != "numpy":
        raise VisualizerValueError(
            "stream={!r} writes NumPy arrays to disk; it cannot be combined with "
            "store={!r} (use the default store='numpy')".format(stream, kind))
    if keep_last is not None:
        raise VisualizerValueError(
            "stream={!r} keeps every capture on disk and none in memory, so keep_last={!r} "
            "has nothing to bound; drop one of them".format(stream, keep_last))


def source_ref(source):
    """A weak reference to ``source``, or None if it cannot have one."""
    try:
        return weakref.ref(source)
    except TypeError:
        return None


class Cache(dict):
    """The captures: ``{key: [value of call 1, value of call 2, ...]}``.

    A plain dict to read and write, plus ``sources``: for keys captured from
    methods, a list parallel to each value list holding a weak reference to the
    ``self`` of each call (or None), which ``get_local.by_module`` uses to name
    the module that produced each value.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sources = {}

    def add(self, key, value, source_ref=NO_SOURCE):
        """Append ``value`` under ``key`` (and its source, when there is one)."""
        try:
            self[key].append(value)
        except KeyError:
            self.setdefault(key, []).append(value)
        if source_ref is not NO_SOURCE:
            try:
                self.sources[key].append(source_ref)
            except KeyError:
                self.sources.setdefault(key, []).append(source_ref)

    # A key's sources go with its values, so they stay aligned.
    def __delitem__(self, key):
        super().__delitem__(key)
        self.sources.pop(key, None)

    def pop(self, key, *default):
        self.sources.pop(key, None)
        return super().pop(key, *default)

    def popitem(self):
        key, values = super().popitem()
        self.sources.pop(key, None)
        return key, values

    def clear(self):
        super().clear()
        self.sources.clear()

    def trim(self, key, keep_last):
        """Keep only the last ``keep_last`` values of ``key``."""
        values = self.get(key)
        if values is not None and len(values) > keep_last:
            del values[:len(values) - keep_last]
            refs = self.sources.get(key)
            if refs is not None and len(refs) > keep_last:
                del refs[:len(refs) - keep_last]

    def clear_values(self):
        """Empty every list, keeping the keys."""
        for values in list(self.values()):
            values.clear()
        for refs in list(self.sources.values()):
            refs.clear()
