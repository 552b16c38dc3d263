"""Rewrite a code object so that it reports chosen locals when it returns.

Pure: a code object goes in, a new code object comes out; nothing here holds
state, activates anything or knows about torch.  The stateful API lives in
``_get_local``.

Before every return instruction (``RETURN_VALUE``, and ``RETURN_CONST`` on
3.12+) the rewritten code calls a recorder.  That point is after any
``finally`` has run and after the return value was computed, on every return
path, and the return value itself stays untouched on the stack.

A return site gets one of two probes:

* ``record(*values)`` with each value loaded directly (``LOAD_FAST`` or
  ``LOAD_DEREF``), when a data-flow analysis proves every name is bound there;
* ``record_locals(locals())`` otherwise: ``locals()`` leaves an unbound name
  out instead of raising, and reads cells by value.

The recorders (and ``locals``) are loaded either as constants of the new code
or, given as ``Global(name)``, by name from the function's globals or
builtins.  TorchDynamo (torch.compile) can trace code of the second kind, but
not code whose constants hold functions.

The recorders must never raise: an exception from them would surface inside
the user's function, where a ``try`` of theirs could catch it.
"""
import difflib
import types

from bytecode import Bytecode, CellVar, FreeVar, Instr, Label

from . import _compat
from ._errors import VisualizerTypeError

try:  # bytecode 0.14+ (Python 3.11+) models the exception table this way.
    from bytecode import TryBegin, TryEnd
except ImportError:  # pragma: no cover - bytecode 0.16 always has them
    TryBegin = TryEnd = ()

_UNSUPPORTED_FLAGS = (
    (_compat.CO_GENERATOR, "a generator function"),
    (_compat.CO_COROUTINE, "a coroutine function"),
    (_compat.CO_ITERABLE_COROUTINE, "a generator-based coroutine"),
    (_compat.CO_ASYNC_GENERATOR, "an async generator function"),
)


def local_names(code):
    """Return every name ``code`` can capture: locals, cells and free variables."""
    names = list(code.co_varnames)
    names += [n for n in code.co_cellvars if n not in names]
    names += [n for n in code.co_freevars if n not in names]
    return tuple(names)


def unsupported_kind(code):
    """Return why ``code`` cannot be rewritten (e.g. 'a generator function'), or None.

    A generator's ``return`` runs once at exhaustion, not when the caller gets
    its values, so "the value when the function returns" has no clear meaning.
    """
    for flag, kind in _UNSUPPORTED_FLAGS:
        if code.co_flags & flag:
            return kind
    return None


def loaded_attributes(code):
    """Return the attribute names ``code`` reads with plain ``x.attr`` loads."""
    return {attr for attr in (_compat.loaded_attribute(i.name, i.arg)
                              for i in _read(code) if isinstance(i, Instr))
            if attr is not None}


def stored_after(code, marks):
    """Return the locals ``code`` stores the result of a marked call into, in order of first store.

    A call is marked when the attribute or global name it loads (``x.name``,
    ``module.name(...)``, ``name(...)``) satisfies ``marks(name)``; the local
    counts when it is the first store after that load (``y = x.name(-1).to(t)``
    stores into ``y``; ``self.name = ...`` stores no local and counts nothing).
    What to mark is the caller's knowledge: ``visualizer.integrations``
    marks softmaxes.
    """
    names = []
    for _, name in _stores_after(list(_read(code)), marks):
        if name not in names:
            names.append(name)
    return names


def _stores_after(items, marks):
    """``(index, local)`` of every store of a marked load's result among ``items``."""
    pending = False
    for index, instr in enumerate(items):
        if not isinstance(instr, Instr):
            continue
        arg = instr.arg
        loaded = arg[-1] if isinstance(arg, tuple) and arg and isinstance(arg[-1], str) else arg
        if instr.name.startswith(("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL")) and \
                isinstance(loaded, str) and marks(loaded):
            pending = True
        elif pending and instr.name.startswith("STORE_"):
            stored = _compat.stored_names(instr.name, arg)
            if stored:
                yield index, stored[0]
            pending = False  # else stored elsewhere: an attribute, not a local


# What a local holds, as far as the bytecode tells (see ``_map_flow``).
SOFTMAX = "softmax"  # the result of a marked call, or that result through dropout or a cast
MIXED = "mixed"      # computed from such results otherwise: gated, mixed across heads, ...
# Calls that keep a softmax the softmax it was (a dtype cast, a copy).
_KEEPING = frozenset({"to", "type_as", "contiguous", "float", "half", "bfloat16", "type",
                      "clone", "detach",
                      # a new shape of the same map (BLOOM's view before its bmm)
                      "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten",
                      "squeeze", "unsqueeze", "transpose", "permute"})
_MATMUL_CALLS = frozenset({"matmul", "bmm"})


def applied_maps(code, marks, mixes=None):
    """Return the locals ``code`` multiplies with values while they hold a map of its own making.

    A local holds a softmax when it stores the result of a marked call
    (``marks(name)``, as in ``stored_after``), or such a local through
    dropout or a cast; it holds a *mixed* map when it is computed from one
    otherwise (ConViT's gated sum of two softmaxes, a talking-heads
    projection after the softmax), or stores the result of a call named in
    ``mixes`` (``{method name: SOFTMAX or MIXED}``: what a sibling method
    returns, see ``returned_map``).  Found is every mixed local that is the
    left operand of ``@`` (or the first argument of ``matmul``/``bmm``): the
    map that multiplies the values where it is not a stored softmax.  Read
    in instruction order, branches merged: a map mixed on any path counts.

    >>> def f(q, k, v, w):
    ...     a = (q @ k).softmax(-1)
    ...     a = a * w
    ...     return a @ v
    >>> applied_maps(f.__code__, lambda name: name == 'softmax')
    ['a']
    """
    names = []
    for loaded in _map_flow(list(_read(code)), marks, mixes or {})[0].values():
        for name in loaded:
            if name not in names:
                names.append(name)
    return names


def returned_map(code, marks, mixes=None):
    """Return ``MIXED``, ``SOFTMAX`` or None: what ``code`` returns, read as ``applied_maps`` reads.

    ``MIXED`` if some ``return`` returns a mixed map, else ``SOFTMAX`` if
    one returns a softmax (ConViT's ``GPSA.get_attention`` returns its gated
    map: ``MIXED``).
    """
    returned = _map_flow(list(_read(code)), marks, mixes or {})[1]
    return MIXED if MIXED in returned else SOFTMAX if SOFTMAX in returned else None


class _Segment:
    """What the instructions since the last store loaded: one expression, roughly."""

    __slots__ = ("marked", "called", "sources", "other", "arithmetic", "dropout", "matmul")

    def __init__(self):
        self.marked = self.dropout = self.other = self.arithmetic = self.matmul = False
        self.called = None
        self.sources = set()

    def result(self):
        if self.marked:
            return SOFTMAX
        if self.matmul:
            return None  # a map times the values: the output, no map
        if self.called is not None:
            return self.called
        if not self.sources:
            return None
        source = MIXED if MIXED in self.sources else SOFTMAX
        keeps = not self.arithmetic and (self.dropout or not self.other)
        return source if keeps else MIXED


def _map_flow(items, marks, mixes):
    """``({index: locals to report before items[index]}, {states returned})`` (``applied_maps``)."""
    state = {}
    segment = _Segment()
    sites = {}
    returned = set()
    pushed = {}  # index -> ((local, its state then), ...) for every load of a local
    previous = None
    for index, instr in enumerate(items):
        if not isinstance(instr, Instr):
            continue
        name, arg = instr.name, instr.arg
        if name in _compat.RETURN_OPS:
            if name == "RETURN_VALUE" and previous is not None and len(pushed.get(previous, ())) == 1:
                returned.add(pushed[previous][0][1])
            segment = _Segment()
            previous = index
            continue
        loaded = arg[-1] if isinstance(arg, tuple) and arg and isinstance(arg[-1], str) else arg
        if name.startswith(("LOAD_ATTR", "LOAD_METHOD", "LOAD_GLOBAL")) and isinstance(loaded, str):
            if marks(loaded):
                segment.marked = True
            elif loaded in mixes:
                segment.called = mixes[loaded]
            elif "drop" in loaded.lower():
                segment.dropout = True
            elif loaded not in _KEEPING:
                segment.other = True
            if loaded in _MATMUL_CALLS:
                segment.matmul = True
                _matmul_call_site(items, index, state, sites)
        stored = _compat.stored_names(name, arg)
        if stored:
            result = segment.result()
            for local in stored:
                if result is None:
                    state.pop(local, None)
                else:
                    state[local] = result
            segment = _Segment()
        elif name.startswith("STORE_") or name == "POP_TOP":
            segment = _Segment()
        locals_ = _compat.loaded_names(name, arg)
        if locals_:
            pushed[index] = tuple((local, state.get(local)) for local in locals_)
            segment.sources.update(state[local] for local in locals_ if local in state)
        if _compat.is_matmul(name, arg):
            segment.matmul = True
            _matmul_site(items, index, pushed, sites)
        elif _compat.is_arithmetic(name, arg):
            segment.arithmetic = True
        previous = index
    return sites, returned


def _matmul_site(items, at, pushed, sites):
    """Note the mixed local that is the left operand of the ``@`` at ``items[at]``, if one is."""
    for start in range(at - 1, max(-1, at - 64), -1):
        item = items[start]
        if isinstance(item, Label):
            return  # a jump lands inside the operands: too clever to follow
        for position in range(len(pushed.get(start, ())) - 1, -1, -1):
            local, held = pushed[start][position]
            depth = len(pushed[start]) - position  # it and what the same instruction pushed after it
            if _operand_depth(items, start + 1, at, depth) == 2:
                if held == MIXED:
                    sites.setdefault(start, []).append(local)
                return


def _operand_depth(items, start, stop, depth):
    """The stack depth after ``items[start:stop]``, from ``depth``, or None where it dips below 1."""
    for item in items[start:stop]:
        if not isinstance(item, Instr):
            if isinstance(item, Label):
                return None
            continue
        if item.has_jump():
            return None
        try:
            pre, post = item.pre_and_post_stack_effect()
        except Exception:
            return None
        depth += pre
        if depth < 1:
            return None
        depth += post
    return depth


def _matmul_call_site(items, at, state, sites):
    """Note a mixed local passed first to ``matmul``/``bmm`` loaded at ``items[at]``."""
    for index in range(at + 1, min(len(items), at + 3)):
        item = items[index]
        if not isinstance(item, Instr) or item.name == "PUSH_NULL":
            continue
        locals_ = _compat.loaded_names(item.name, item.arg)
        if locals_ and state.get(locals_[0]) == MIXED and item.name not in _compat.STORE_FIRST_OPS:
            sites.setdefault(index, []).append(locals_[0])
        return


def collecting(code, hidden, marks, applied=None, mixes=None):
    """Return a copy of ``code`` that appends every result of a marked call it stores to a list local.

    The new local ``hidden`` is bound to an empty list where the function
    starts; each store that ``stored_after(code, marks)`` finds is followed by
    appending the stored value, so a store inside a loop keeps every value and
    a value later changed is kept as it was stored.  Pure bytecode, no call:
    ``LOAD_FAST hidden; LOAD_FAST name; LIST_APPEND 1; POP_TOP``.  Rewrite the
    result with ``hidden`` as the name to report.

    With ``applied``, a second new list local of that name gets, as each
    ``@`` runs, the mixed map it multiplies with the values (every site
    ``applied_maps(code, marks, mixes)`` finds); report both names.
    """
    bc = _read(code)
    items = list(bc)
    for name in (hidden, applied):
        if name is not None and name in local_names(code):
            raise ValueError("{} is already a local of {}".format(name, code.co_name))
    sites = dict(_stores_after(items, marks))
    loads = _map_flow(items, marks, mixes or {})[0] if applied is not None else {}
    cells, frees = set(code.co_cellvars), set(code.co_freevars)
    start = next((k + 1 for k, i in enumerate(items)
                  if isinstance(i, Instr) and i.name == "RESUME"), 0)
    first = next((i for i in items if isinstance(i, Instr)), None)
    location = first.location if first is not None else None
    lists = [hidden] + ([applied] if applied is not None else [])

    def append(into, name, loc):
        load = _load(name, cells, frees)
        if load[0] == "LOAD_FAST":  # before the map's own load: it may be unbound there
            load = (_compat.CHECKED_LOAD, name)
        return [Instr("LOAD_FAST", into, location=loc), _instr(load[0], load[1], loc),
                Instr("LIST_APPEND", 1, location=loc), Instr("POP_TOP", location=loc)]

    out = []
    for k, item in enumerate(items):
        if k == start:
            for into in lists:
                out.append(Instr("BUILD_LIST", 0, location=location))
                out.append(Instr("STORE_FAST", into, location=location))
        if k not in sites and k not in loads:
            out.append(item)
            continue
        loc = item.location
        first, rest = item, []
        if item.name in _compat.STORE_FIRST_OPS:    # STORE_FAST_LOAD_FAST (3.13+)
            first, rest = (Instr("STORE_FAST", item.arg[0], location=loc),
                           [Instr("LOAD_FAST", item.arg[1], location=loc)])
        elif item.name in _compat.STORE_BOTH_OPS:   # STORE_FAST_STORE_FAST (3.13+)
            first, rest = (Instr("STORE_FAST", item.arg[0], location=loc),
                           [Instr("STORE_FAST", item.arg[1], location=loc)])
        if _compat.stored_names(item.name, item.arg):
            out.append(first)
            if k in sites:
                out.extend(append(hidden, sites[k], loc))
            for name in loads.get(k, ()):  # the map then loaded for ``@``: as it is now
                out.extend(append(applied, name, loc))
            out.extend(rest)
        else:  # a load of the map ``@`` multiplies with the values: append it first
            for name in loads[k]:
                out.extend(append(applied, name, loc))
            out.append(item)
    if start >= len(items):
        for into in lists:
            out.append(Instr("BUILD_LIST", 0, location=location))
            out.append(Instr("STORE_FAST", into, location=location))
    return _write(bc, out, code)


def missing_names(code, names):
    """Return ``(name, suggestion)`` for each name that is not a local of ``code``."""
    available = local_names(code)
    out = []
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, available, n=1)
            out.append((name, close[0] if close else None))
    return out


class Global:
    """Load a callable by this global (or builtin) name instead of as a constant."""

    __slots__ = ("name",)

    def __init__(self, name):
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError("Global needs an identifier, got {!r}".format(name))
        self.name = name

    def __repr__(self):
        return "Global({!r})".format(self.name)


def _push(callable_):
    if isinstance(callable_, Global):
        return _compat.load_global(callable_.name)
    return ("LOAD_CONST", callable_)


def rewrite(code, names, record, record_locals, source=None, overrides=None,
            builtin_locals=locals):
    """Return a copy of ``code`` that reports ``names`` at every return.

    ``record`` is called as ``record(source_value, *values)`` (the source
    value only when ``source`` names an argument to pass along, typically
    ``self``) where every name is provably bound; elsewhere
    ``record_locals(locals())`` is called.  Both are stored in the new code's
    constants, or loaded by name when given as ``Global(name)``; so is
    ``builtin_locals``, which must be the built-in ``locals`` (pass a
    ``Global`` bound to it to keep every callable out of the constants).
    ``names`` must all be locals of ``code`` (see
    ``missing_names``).  The result keeps the signature, names, flags, line
    numbers and free variables of ``code``.

    ``overrides`` maps attribute names to constants: every plain ``x.attr``
    load of such an attribute reads the constant instead (``x`` is still
    evaluated).  Presets use it to take the eager path while capturing, e.g.
    ``{'fused_attn': False}``.  With no ``names``, only the overrides apply.

    >>> def f(x):
    ...     y = x + 1
    ...     return y
    >>> seen = []
    >>> f.__code__ = rewrite(f.__code__, ('y',), seen.append, print)
    >>> f(1), seen
    (2, [2])
    """
    bc = _read(code)
    wanted = tuple(names) if source is None else (source,) + tuple(names)
    bound = _bound_at_returns(bc, code, wanted)
    cells = set(code.co_cellvars)
    frees = set(code.co_freevars)

    overrides = overrides or {}
    out = []
    site = 0
    for item in bc:
        if isinstance(item, Instr) and overrides:
            attr = _compat.loaded_attribute(item.name, item.arg)
            if attr in overrides:
                out.append(Instr("POP_TOP", location=item.location))
                out.append(Instr("LOAD_CONST", overrides[attr], location=item.location))
                continue
        if isinstance(item, Instr) and item.name in _compat.RETURN_OPS and names:
            if bound[site]:
                loads = [[_load(n, cells, frees)] for n in wanted]
                ops = _compat.call_ops(_push(record), loads)
            else:
                get_locals = _compat.call_ops(_push(builtin_locals), [])
                ops = _compat.call_ops(_push(record_locals), [get_locals])
            ops.append(("POP_TOP", None))
            out.extend(_instr(op, arg, item.location) for op, arg in ops)
            site += 1
        out.append(item)
    return _write(bc, out, code)


class UnreadableCode(VisualizerTypeError):
    """The ``bytecode`` package cannot read or write this code object (a known limit).

    On 3.13, when a comprehension variable has the name of a free variable of
    the same function, CPython gives the name two slots (python/cpython#156664)
    and bytecode 0.19 confuses them: some such code it cannot read, some it
    writes back wrong.  Both are refused up front.
    """

    def __init__(self, code, exc=None, step="read"):
        name = code.co_qualname if hasattr(code, "co_qualname") else code.co_name
        if exc is None:
            problem = ("it has a comprehension variable named like a variable of an "
                       "enclosing function ({}), which the bytecode package "
                       "cannot rewrite correctly on this Python (python/cpython#156664)"
                       .format(", ".join(shadowed_names(code))))
        else:
            problem = "the bytecode package cannot {} its code ({}: {})".format(
                step, type(exc).__name__, exc)
        super().__init__(
            "get_local cannot capture from {}: {}. Rename the comprehension variable, or "
            "capture from a function that calls this one.".format(name, problem))


def shadowed_names(code):
    """Names with two slots: a hidden comprehension local and a free variable.

    (A comprehension variable named like a *cell* variable also gets two
    slots, but bytecode 0.19 writes that back correctly; the fuzz tests hold
    it to that.)
    """
    n_args = len(_arg_names(code))
    return sorted(set(code.co_varnames[n_args:]) & set(code.co_freevars))


def _read(code):
    if _compat.SHADOWED_SLOTS_UNSAFE and shadowed_names(code):
        raise UnreadableCode(code)
    try:
        return Bytecode.from_code(code)
    except Exception as exc:
        raise UnreadableCode(code, exc) from exc


def _write(bc, items, code):
    """``bc`` holding ``items`` instead, as a code object (``code`` names it in errors)."""
    bc.clear()
    bc.extend(items)
    try:
        return bc.to_code()
    except Exception as exc:
        raise UnreadableCode(code, exc, "write") from exc


def _instr(name, arg, location):
    if arg is None:
        return Instr(name, location=location)
    return Instr(name, arg, location=location)


def _load(name, cells, frees):
    if name in cells:
        return ("LOAD_DEREF", CellVar(name))
    if name in frees:
        return ("LOAD_DEREF", FreeVar(name))
    return ("LOAD_FAST", name)


def _arg_names(code):
    return set(code.co_varnames[:_compat.argument_count(code)])


def _deleted_by_inner(code, name):
    """True if a function nested in ``code`` may ``del`` the cell ``name``."""
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            if name in const.co_freevars:
                try:
                    instrs = _read(const)
                except UnreadableCode:
                    return True  # cannot tell: assume it may
                if any(_compat.unbound_name(i.name, i.arg) == name
                       for i in instrs if isinstance(i, Instr)):
                    return True
            if _deleted_by_inner(const, name):
                return True
    return False


def _bound_at_returns(bc, code, names):
    """For each return site in order: whether every name is proven bound there.

    Forward "must be assigned" data flow over the instruction list.  Names
    that some instruction can unbind (``del``, ``except ... as``, inlined
    comprehensions), free variables (the enclosing scope may delete them) and
    cells an inner function deletes are never proven.  Without those, a name
    once bound stays bound, which makes exception edges simple: a handler is
    entered with at most the names bound when its protected instruction began.
    """
    items = list(bc)
    unbindable = {_compat.unbound_name(i.name, i.arg) for i in items if isinstance(i, Instr)}
    tracked = [n for n in dict.fromkeys(names)
               if n not in unbindable and n not in code.co_freevars
               and not (n in code.co_cellvars and _deleted_by_inner(code, n))]
    bit = {n: 1 << k for k, n in enumerate(tracked)}
    need = sum(bit.values())
    n_returns = sum(1 for i in items if isinstance(i, Instr) and i.name in _compat.RETURN_OPS)
    if len(tracked) < len(set(names)):
        return [False] * n_returns

    args = _arg_names(code)
    labels = {id(item): k for k, item in enumerate(items) if isinstance(item, Label)}
    size = len(items)
    gen = [0] * size
    succ = [()] * size      # edges that carry the state after the item
    exc_succ = [None] * size  # edge to the active handler: the state before it
    handler = None
    for k, item in enumerate(items):
        nxt = (k + 1,) if k + 1 < size else ()
        if isinstance(item, TryBegin):
            handler = labels[id(item.target)]
            succ[k] = nxt
        elif isinstance(item, TryEnd):
            handler = None
            succ[k] = nxt
        elif isinstance(item, Instr):
            for n in _compat.stored_names(item.name, item.arg):
                gen[k] |= bit.get(n, 0)
            exc_succ[k] = handler
            if item.has_jump():
                target = labels[id(item.arg)]
                succ[k] = (target,) if item.is_uncond_jump() else (target,) + nxt
            elif item.is_final():
                succ[k] = ()
            else:
                succ[k] = nxt
        else:  # Label, SetLineno
            succ[k] = nxt

    state_in = [need] * size  # "everything bound" until a path says otherwise
    state_in[0] = sum(bit[n] for n in tracked if n in args)
    pending = [0]
    queued = {0}
    while pending:
        k = pending.pop()
        queued.discard(k)
        after = state_in[k] | gen[k]
        for target, state in [(t, after) for t in succ[k]] + (
                [(exc_succ[k], state_in[k])] if exc_succ[k] is not None else []):
            merged = state_in[target] & state
            if merged != state_in[target]:
                state_in[target] = merged
                if target not in queued:
                    queued.add(target)
                    pending.append(target)
    return [state_in[k] & need == need
            for k, item in enumerate(items)
            if isinstance(item, Instr) and item.name in _compat.RETURN_OPS]
