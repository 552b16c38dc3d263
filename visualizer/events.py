"""React to captures as they happen: events, composable filters, a dispatcher.

Each capture of a variable is an ``Event``, handed synchronously to every
handler whose filter accepts it, before the value is stored.  Handlers see
the raw value (a tensor stays a tensor), so they can reduce it, log it or act
on it without the cache keeping anything (``store='none'``).

>>> from visualizer import get_local
>>> from visualizer.events import function_is, variable_is
>>> maxima = []
>>> get_local.events.listen(function_is('Attention.forward') & variable_is('attn'),
...                         lambda event: maxima.append(float(event.value.max())))

Filters compose with ``&``, ``|`` and ``~``; any plain callable that takes an
event and returns a truth value composes with them too.
"""
import warnings

from ._errors import CaptureWarning, VisualizerTypeError, VisualizerValueError

__all__ = [
    "Event", "AttentionEvent", "QKVEvent", "EventFilter", "EventDispatcher", "event_class",
    "function_is", "variable_is", "from_module", "module_name_contains",
]


class Event:
    """One capture: ``key``, ``function``, ``name``, ``value`` and ``source``.

    ``key`` is the cache key, ``function`` the function's qualname, ``name`` the
    variable, ``value`` the raw value (not converted), ``source`` the bound
    ``self`` (e.g. the ``nn.Module``) when the function is a method, else None.
    """

    __slots__ = ("key", "function", "name", "value", "source")

    def __init__(self, key, function, name, value, source):
        self.key = key
        self.function = function
        self.name = name
        self.value = value
        self.source = source

    def __repr__(self):
        return "Event(key={!r}, source={})".format(self.key, type(self.source).__name__)


class AttentionEvent(Event):
    """The attention probabilities of one attention kernel call.

    Dispatched for each call of ``torch.nn.functional.scaled_dot_product_attention``
    while capture is on (see ``visualizer.integrations.kernel``).
    ``attention_matrix`` (also ``value``) is ``(batch, heads, queries, keys)``;
    it is computed when first read, so a handler that does not read it costs
    no softmax.  ``key`` and ``function`` are the qualname of the module method
    that called the kernel, ``name`` is ``'attn'``, ``source`` that module.
    """

    __slots__ = ("_compute", "_matrix")

    def __init__(self, key, function, compute, source=None):
        self.key = key
        self.function = function
        self.name = "attn"
        self.source = source
        self._compute = compute
        self._matrix = None

    @property
    def attention_matrix(self):
        """The probabilities, computed on first use."""
        if self._matrix is None:
            self._matrix = self._compute()
        return self._matrix

    @property
    def value(self):
        """The same as ``attention_matrix``."""
        return self.attention_matrix


class QKVEvent(Event):
    """The queries, keys and values given to one attention kernel call.

    ``queries``, ``keys``, ``values`` are the kernel's own input tensors
    (``value`` is the tuple of the three; ``name`` is ``'qkv'``); dispatched
    just before the ``AttentionEvent`` of the same call.
    """

    __slots__ = ("queries", "keys", "values")

    def __init__(self, key, function, queries, keys, values, source=None):
        Event.__init__(self, key, function, "qkv", (queries, keys, values), source)
        self.queries = queries
        self.keys = keys
        self.values = values


class EventFilter:
    """A predicate on events that composes with ``&``, ``|`` and ``~``.

    >>> big = EventFilter(lambda event: event.value.size > 1000, "big")
    >>> selective = variable_is('attn') & ~big
    """

    __slots__ = ("predicate", "description")

    def __init__(self, predicate, description=None):
        if not callable(predicate):
            raise VisualizerTypeError(
                "an event filter must be callable, got {} {!r}".format(
                    type(predicate).__name__, predicate))
        self.predicate = predicate
        self.description = description or getattr(predicate, "__name__", repr(predicate))

    def __call__(self, event):
        return bool(self.predicate(event))

    def __and__(self, other):
        other = as_filter(other)
        return EventFilter(lambda e: self(e) and other(e),
                           "({} & {})".format(self.description, other.description))

    def __or__(self, other):
        other = as_filter(other)
        return EventFilter(lambda e: self(e) or other(e),
                           "({} | {})".format(self.description, other.description))

    def __rand__(self, other):
        return as_filter(other) & self

    def __ror__(self, other):
        return as_filter(other) | self

    def __invert__(self):
        return EventFilter(lambda e: not self(e), "~{}".format(self.description))

    def __repr__(self):
        return "EventFilter({})".format(self.description)


def as_filter(obj):
    """Return ``obj`` as an EventFilter.

    None accepts everything, an ``Event`` subclass is ``event_class(obj)``,
    and other callables are wrapped.
    """
    if isinstance(obj, EventFilter):
        return obj
    if obj is None:
        return EventFilter(lambda e: True, "all")
    if isinstance(obj, type) and issubclass(obj, Event):
        return event_class(obj)
    return EventFilter(obj)


def event_class(cls):
    """Accept events that are instances of ``cls`` (an ``Event`` subclass).

    >>> get_local.events.listen(event_class(AttentionEvent), handler)  # doctest: +SKIP
    >>> get_local.events.listen(AttentionEvent, handler)  # the same  # doctest: +SKIP
    """
    if not (isinstance(cls, type) and issubclass(cls, Event)):
        raise VisualizerTypeError(
            "event_class takes an Event subclass such as AttentionEvent, got {!r}".format(cls))
    return EventFilter(lambda e: isinstance(e, cls), "event_class({})".format(cls.__name__))


def function_is(function):
    """Accept events from the function with this qualname (or this function object).

    >>> function_is('Attention.forward')
    EventFilter(function_is('Attention.forward'))
    """
    qualname = function if isinstance(function, str) else getattr(function, "__qualname__", None)
    if not isinstance(qualname, str):
        raise VisualizerTypeError(
            "function_is takes a qualname such as 'Attention.forward' or a function, "
            "got {!r}".format(function))
    if not all(part.isidentifier() or part == "<locals>" for part in qualname.split(".")):
        raise VisualizerValueError(
            "function_is: {!r} cannot be a qualname, which looks like "
            "'Attention.forward'".format(qualname))
    return EventFilter(lambda e: e.function == qualname, "function_is({!r})".format(qualname))


def variable_is(name):
    """Accept events that capture the variable ``name``.

    >>> variable_is('attn')
    EventFilter(variable_is('attn'))
    """
    if not isinstance(name, str):
        raise VisualizerTypeError("variable_is takes a variable name, got {!r}".format(name))
    if not name.isidentifier():
        raise VisualizerValueError(
            "variable_is: {!r} is not a valid variable name".format(name))
    return EventFilter(lambda e: e.name == name, "variable_is({!r})".format(name))


def from_module(module):
    """Accept events whose source is ``module`` itself (not its children).

    >>> from_module(model.blocks[3].attn)  # doctest: +SKIP
    """
    if module is None:
        raise VisualizerTypeError(
            "from_module takes the module whose events to accept, got None")
    return EventFilter(lambda e: e.source is module,
                       "from_module({})".format(type(module).__name__))


def module_name_contains(model, text):
    """Accept events from submodules of ``model`` whose qualified name contains ``text``.

    Names are those of ``model.named_modules()``, e.g. ``'blocks.10.attn'``;
    they are read once, when the filter is made.

    >>> module_name_contains(model, 'blocks.10.')  # doctest: +SKIP
    """
    named = getattr(model, "named_modules", None)
    if named is None:
        raise VisualizerTypeError(
            "module_name_contains needs a torch.nn.Module (something with "
            "named_modules()), got {}".format(type(model).__name__))
    if not isinstance(text, str):
        raise VisualizerTypeError("module_name_contains takes a text, got {!r}".format(text))
    chosen = {id(m): m for name, m in named() if text in name}
    if not chosen:
        names = [name for name, _ in named() if name][:8]
        warnings.warn(
            "module_name_contains: no submodule name contains {!r}; names look like: {}"
            .format(text, ", ".join(names)), CaptureWarning, stacklevel=2)

    def accept(event):
        return chosen.get(id(event.source)) is event.source and event.source is not None

    return EventFilter(accept, "module_name_contains({!r})".format(text))


class EventDispatcher:
    """Holds (filter, handler) pairs and calls the handlers an event passes.

    ``get_local.events`` is the dispatcher that every capture goes through.
    """

    def __init__(self, on_change=None):
        self._listeners = ()
        self._on_change = on_change
        self._failed = set()

    def listen(self, event_filter, handler):
        """Call ``handler(event)`` for each capture that ``event_filter`` accepts.

        ``event_filter`` is an EventFilter, an ``Event`` subclass (events of
        that class), any callable taking an event, or None for every event.  Returns ``handler``, so this works as a decorator
        factory too.

        >>> get_local.events.listen(variable_is('attn'), print)  # doctest: +SKIP
        """
        if not callable(handler):
            raise VisualizerTypeError(
                "handler must be callable (it is called with each event), got {!r}".format(
                    handler))
        self._listeners = self._listeners + ((as_filter(event_filter), handler),)
        self._changed()
        return handler

    def remove(self, handler):
        """Stop calling ``handler``; an error if it was never listening."""
        kept = tuple(pair for pair in self._listeners if pair[1] is not handler)
        if len(kept) == len(self._listeners):
            raise VisualizerValueError("{!r} is not listening".format(handler))
        self._listeners = kept
        self._changed()

    def clear(self):
        """Remove every handler."""
        self._listeners = ()
        self._changed()

    def __len__(self):
        return len(self._listeners)

    def dispatch(self, event):
        """Give ``event`` to each handler whose filter accepts it."""
        for event_filter, handler in self._listeners:
            try:
                if event_filter(event):
                    handler(event)
            except Exception as exc:  # a broken handler must not break the model
                self._report(handler, exc)

    def _report(self, handler, exc):
        if id(handler) in self._failed:
            return
        self._failed.add(id(handler))
        warnings.warn(
            "event handler {} raised {}: {} (reported once; the capture continues)".format(
                getattr(handler, "__qualname__", handler), type(exc).__name__, exc),
            CaptureWarning, stacklevel=2)

    def _changed(self):
        if self._on_change is not None:
            self._on_change()
