"""The pure rewrite: one test per return-path shape, checked against sys.settrace.

Each case is a small function in source form.  The reference for "the value of
each local when the function returns" is what ``sys.settrace`` sees in
``frame.f_locals`` at the 'return' event of the *original* function; the
rewritten function must report exactly those values, return the same result
and raise the same exception.
"""
import sys
import textwrap
import types

import pytest

from visualizer import _rewrite

PY310 = sys.version_info >= (3, 10)


def make(source, name="f"):
    namespace = {}
    exec(compile(textwrap.dedent(source), "<case>", "exec"), namespace)
    return namespace[name]


def traced_locals(fn, *args):
    """Run ``fn`` untouched; return (result or exception, f_locals at its return)."""
    seen = []
    code = fn.__code__

    def tracer(frame, event, arg):
        if frame.f_code is code:
            if event == "return":
                seen.append(dict(frame.f_locals))
            return tracer
        return None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        outcome = ("ok", fn(*args))
    except Exception as exc:  # the case may raise on purpose
        outcome = ("raised", type(exc), str(exc))
    finally:
        sys.settrace(old)
    return outcome, seen


def rewritten(fn, names, source=None):
    """A copy of ``fn`` running rewritten code; returns (copy, records list)."""
    records = []

    def record(*values):
        records.append(("direct", values))

    def record_locals(frame_locals):
        wanted = ((source,) if source else ()) + tuple(names)
        records.append(("locals", tuple(frame_locals.get(n, "<unbound>") for n in wanted)))

    code = _rewrite.rewrite(fn.__code__, names, record, record_locals, source=source)
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy, records


def comparable(values):
    # Each call makes new inner functions; compare those by name.
    return tuple(v.__qualname__ if isinstance(v, types.FunctionType) else v for v in values)


def check(source, names, *args):
    fn = make(source)
    expected_outcome, frames = traced_locals(fn, *args)
    copy, records = rewritten(fn, names)
    try:
        outcome = ("ok", copy(*args))
    except Exception as exc:
        outcome = ("raised", type(exc), str(exc))
    assert outcome == expected_outcome
    if expected_outcome[0] == "raised":
        # An exception leaves the function without returning: nothing recorded.
        assert records == []
        return records
    assert len(frames) == 1 and len(records) == 1
    expected = tuple(frames[0].get(n, "<unbound>") for n in names)
    assert comparable(records[0][1]) == comparable(expected)
    return records


SHAPES = {
    "straight": ("""
        def f(a):
            x = a + 1
            return x * 2
        """, ("x",), [(1,)]),
    "early return of a pair": ("""
        def f(a):
            x = (a, a + 1)
            if a > 0:
                return x
            x = None
            return 0, 1
        """, ("x",), [(1,), (-1,)]),
    "return constant": ("""
        def f(a):
            x = a
            if a:
                return 7
            x = -a
            return 'done'
        """, ("x",), [(3,), (0,)]),
    "implicit return None": ("""
        def f(a):
            x = [a]
            x.append(a)
        """, ("x",), [(2,)]),
    "explicit return None": ("""
        def f(a):
            x = a
            return None
        """, ("x",), [(2,)]),
    "return in loop": ("""
        def f(n):
            total = 0
            for i in range(n):
                total += i
                if total > 3:
                    return total
            while True:
                total -= 1
                if total < 0:
                    return i
        """, ("total", "i"), [(10,), (2,)]),
    "return in with": ("""
        import contextlib
        def f(a):
            x = 0
            with contextlib.suppress(KeyError):
                x = a * 3
                return x
        """, ("x",), [(2,)]),
    "with that swallows": ("""
        import contextlib
        def f(a):
            x = 1
            with contextlib.suppress(ZeroDivisionError):
                x = 2
                1 / a
                return 'inside'
            return 'after'
        """, ("x",), [(0,), (1,)]),
    "finally changes the value": ("""
        def f(a):
            x = a
            try:
                return x
            finally:
                x = 'from finally'
        """, ("x",), [(1,)]),
    "finally overrides the return": ("""
        def f(a):
            x = a
            try:
                return 'try'
            finally:
                x = a + 1
                if a:
                    return 'finally'
        """, ("x",), [(0,), (1,)]),
    "except returns": ("""
        def f(a):
            y = 'before'
            try:
                y = 10 / a
            except ZeroDivisionError as exc:
                y = str(exc)
                return 'caught'
            else:
                return 'else'
            finally:
                y = (y, 'finally')
        """, ("y",), [(0,), (2,)]),
    "nested try in loop": ("""
        def f(n):
            log = []
            for i in range(n):
                try:
                    try:
                        if i == 2:
                            raise KeyError(i)
                        log.append(i)
                    finally:
                        log.append('f')
                except KeyError:
                    return len(log)
            return -1
        """, ("log",), [(5,), (1,)]),
    "exception escapes": ("""
        def f(a):
            x = a
            raise ValueError('bad %s' % a)
        """, ("x",), [(1,)]),
    "raise inside with and except re-raise": ("""
        def f(a):
            x = 0
            try:
                x = 1 / a
            except ZeroDivisionError:
                raise
            return x
        """, ("x",), [(0,), (4,)]),
    "cell variable": ("""
        def f(a):
            x = a
            g = lambda: x * 10
            x = x + 1
            return g()
        """, ("x", "g"), [(1,)]),
    "cell argument": ("""
        def f(a):
            g = lambda: a
            a = a + 1
            return g()
        """, ("a",), [(1,)]),
    "deleted variable": ("""
        def f(a):
            x = a
            if a:
                del x
            return a
        """, ("x",), [(0,), (1,)]),
    "assigned on another branch": ("""
        def f(a):
            if a:
                attn = 'eager'
            else:
                out = 'fused'
            return a
        """, ("attn",), [(0,), (1,)]),
    "walrus and comprehension": ("""
        def f(n):
            squares = [y := i * i for i in range(n)]
            return sum(squares)
        """, ("squares", "y"), [(4,), (0,)]),
    "comprehension variable shadows a local": ("""
        def f(n):
            i = 'outer'
            items = [i for i in range(n)]
            return items
        """, ("i",), [(3,)]),
    "comprehension variable never bound outside": ("""
        def f(n):
            items = [i for i in range(n)]
            return items
        """, ("items",), [(3,)]),
    "nested functions": ("""
        def f(a):
            def inner(b):
                return b + 1
            x = inner(a)
            return x
        """, ("x", "inner"), [(1,)]),
    "argument reassigned": ("""
        def f(a, *args, k=3, **kw):
            a = (a, args, k, kw)
            return a
        """, ("a", "args", "k", "kw"), [(1, 2, 3)]),
}

if PY310:
    SHAPES["match"] = ("""
        def f(value):
            kind = 'unknown'
            match value:
                case 0:
                    kind = 'zero'
                    return kind
                case [x, y]:
                    kind = 'pair'
                    return x + y
                case {'k': v}:
                    kind = 'mapping'
                case _:
                    return None
            return v
        """, ("kind",), [(0,), ([1, 2],), ({'k': 5},), ('other',)])


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_return_path_matches_settrace(shape):
    source, names, calls = SHAPES[shape]
    for args in calls:
        check(source, names, *args)


def test_free_variable_of_enclosing_function():
    outer = make("""
        def outer(a):
            z = a * 2
            def f(b):
                return b + z
            return f
        """, "outer")
    inner = outer(5)
    copy, records = rewritten(inner, ("z",))
    assert copy(1) == 11
    assert records == [("locals", (10,))]


def test_direct_loads_when_every_name_is_proven_bound():
    fn = make("""
        def f(self, a):
            x = a + 1
            if a:
                return x
            y = 2
            return x + y
        """)
    copy, records = rewritten(fn, ("x",), source="self")
    copy("S", 1)
    copy("S", 0)
    assert records == [("direct", ("S", 2)), ("direct", ("S", 1))]


def test_locals_only_where_a_name_may_be_unbound():
    fn = make("""
        def f(a):
            try:
                x = 1 / a
            except ZeroDivisionError:
                return 'no x'
            return x
        """)
    copy, records = rewritten(fn, ("x",))
    copy(0)
    copy(2)
    # On 3.8 an except clause ends in END_FINALLY, which may also fall through,
    # so the analysis cannot prove x bound after the try there; it stays correct.
    second = "direct" if sys.version_info >= (3, 9) else "locals"
    assert [kind for kind, _ in records] == ["locals", second]
    assert [values for _, values in records] == [("<unbound>",), (0.5,)]


def test_cell_deleted_by_inner_function_is_not_assumed_bound():
    fn = make("""
        def f():
            x = 1
            def drop():
                nonlocal x
                del x
            drop()
            return 0
        """)
    copy, records = rewritten(fn, ("x",))
    assert copy() == 0
    assert records == [("locals", ("<unbound>",))]


def test_line_numbers_survive():
    fn = make("""
        def f(a):
            x = a
            y = 1 / a
            return y
        """)
    copy, _ = rewritten(fn, ("x",))
    with pytest.raises(ZeroDivisionError) as info:
        copy(0)
    assert info.traceback[-1].lineno + 1 == 4  # pytest counts from 0
    original_lines = [line for _, _, line in fn.__code__.co_lines()] if hasattr(
        fn.__code__, "co_lines") else None
    if original_lines is not None:
        new_lines = {line for _, _, line in copy.__code__.co_lines()}
        assert new_lines == set(original_lines)


def test_code_attributes_preserved():
    fn = make('''
        def f(a, b=2, *args, c, d=4, **kw):
            """doc"""
            x = a
            return x
        ''')
    code = _rewrite.rewrite(fn.__code__, ("x",), print, print)
    for attr in ("co_argcount", "co_kwonlyargcount", "co_posonlyargcount", "co_varnames",
                 "co_cellvars", "co_freevars", "co_flags", "co_name", "co_filename",
                 "co_firstlineno", "co_qualname"):
        if hasattr(fn.__code__, attr):
            assert getattr(code, attr) == getattr(fn.__code__, attr), attr
    assert code.co_consts[0] == "doc" or sys.version_info < (3, 8)


def test_rewrite_is_pure():
    fn = make("""
        def f(a):
            x = a
            return x
        """)
    before = fn.__code__
    _rewrite.rewrite(before, ("x",), print, print)
    assert fn.__code__ is before
    assert fn(3) == 3


def test_global_recorders_leave_no_function_in_the_constants():
    """What torch.compile needs: the recorders (and locals) loaded by name."""
    import builtins
    import types

    fn = make("""
        def f(a, flag):
            if flag:
                y = a
            x = a + 1
            return x
        """)
    seen = []
    names = {"__rewrite_test_record__": lambda x: seen.append(("direct", x)),
             "__rewrite_test_locals__": lambda d: seen.append(("locals", dict(d))),
             "__rewrite_test_builtin_locals__": locals}
    code = _rewrite.rewrite(fn.__code__, ("x",), _rewrite.Global("__rewrite_test_record__"),
                            _rewrite.Global("__rewrite_test_locals__"),
                            builtin_locals=_rewrite.Global("__rewrite_test_builtin_locals__"))
    kinds = (types.FunctionType, types.BuiltinFunctionType, types.LambdaType)
    assert not [c for c in code.co_consts if isinstance(c, kinds)]
    assert "__rewrite_test_record__" in code.co_names
    vars(builtins).update(names)
    try:
        fn.__code__ = code
        assert fn(1, False) == 2
    finally:
        for name in names:
            del vars(builtins)[name]
    assert seen == [("direct", 2)]

    fn2 = make("""
        def g(a, flag):
            if flag:
                x = a
            return a
        """, "g")
    code = _rewrite.rewrite(fn2.__code__, ("x",), _rewrite.Global("__rewrite_test_record__"),
                            _rewrite.Global("__rewrite_test_locals__"),
                            builtin_locals=_rewrite.Global("__rewrite_test_builtin_locals__"))
    vars(builtins).update(names)
    try:
        fn2.__code__ = code
        assert fn2(5, True) == 5 and fn2(6, False) == 6
    finally:
        for name in names:
            del vars(builtins)[name]
    assert seen[1] == ("locals", {"a": 5, "flag": True, "x": 5})
    assert seen[2] == ("locals", {"a": 6, "flag": False})


@pytest.mark.parametrize("bad", ["", "not a name", 3, None])
def test_global_needs_an_identifier(bad):
    with pytest.raises(ValueError, match="identifier"):
        _rewrite.Global(bad)


def test_missing_names_suggests_a_near_miss():
    fn = make("""
        def f(q, k):
            attn = q * k
            return attn
        """)
    assert _rewrite.missing_names(fn.__code__, ("attn", "atn", "zzz")) == [
        ("atn", "attn"), ("zzz", None)]


@pytest.mark.parametrize("source, kind", [
    ("def f():\n    yield 1\n", "a generator function"),
    ("async def f():\n    return 1\n", "a coroutine function"),
    ("async def f():\n    yield 1\n", "an async generator function"),
    ("def f():\n    return 1\n", None),
])
def test_unsupported_kinds(source, kind):
    assert _rewrite.unsupported_kind(make(source).__code__) == kind


def test_attribute_overrides_read_a_constant():
    fn = make("""
        def f(self):
            if self.fused_attn:
                return 'fused'
            impl = self.config.impl
            return impl
        """)

    class Config:
        impl = "sdpa"

    class Module:
        fused_attn = True
        config = Config()

    code = _rewrite.rewrite(fn.__code__, (), print, print,
                            overrides={"fused_attn": False, "impl": "eager"})
    copy = types.FunctionType(code, fn.__globals__)
    assert fn(Module()) == "fused"
    assert copy(Module()) == "eager"
    assert _rewrite.loaded_attributes(fn.__code__) == {"fused_attn", "config", "impl"}


def test_overrides_leave_method_calls_alone():
    fn = make("""
        def f(items):
            items.append(1)
            return items.append
        """)
    code = _rewrite.rewrite(fn.__code__, (), print, print, overrides={"append": None})
    copy = types.FunctionType(code, fn.__globals__)
    items = []
    assert copy(items) is None
    assert items == [1]


def test_softmax_outputs_names_where_eager_attention_keeps_its_probabilities():
    from visualizer.integrations import softmax_outputs

    def method_style(q, k):
        scores = q @ k
        probs = scores.softmax(-1)
        return probs @ k

    def functional_style(q, k, F, torch):
        weights = F.softmax(q @ k, dim=-1, dtype=torch.float32).to(q.dtype)
        weights = F.dropout(weights, 0.1)
        return weights @ k

    def no_softmax(q, k):
        out = q @ k
        return out

    def init_style(self, nn):
        self.softmax = nn.Softmax(dim=-1)  # an attribute: nothing to capture
        size = 4
        return size

    assert softmax_outputs(method_style.__code__) == ["probs"]
    assert softmax_outputs(functional_style.__code__) == ["weights"]
    assert softmax_outputs(no_softmax.__code__) == []
    assert softmax_outputs(init_style.__code__) == []


class _Probs:
    """A value with a ``softmax`` method, so the tests need no torch."""

    def __init__(self, value):
        self.value = value

    def softmax(self, dim=-1):
        return _Probs(("softmax", self.value))

    def mix(self):
        return _Probs(("mixed", self.value))

    def __eq__(self, other):
        return isinstance(other, _Probs) and other.value == self.value

    def __repr__(self):
        return "_Probs({!r})".format(self.value)


class XSoftmax:
    """Like DeBERTa's autograd function, a global: ``XSoftmax.apply(scores, mask, dim)``."""

    @staticmethod
    def apply(x, mask, dim):
        return _Probs(("x", x.value))


def _collected(function, *args):
    """Run ``function`` rewritten by ``collecting``; return (its result, the list it reported)."""
    import types

    from visualizer._rewrite import collecting, rewrite
    from visualizer.integrations import is_softmax

    seen = []
    code = rewrite(collecting(function.__code__, "maps", is_softmax), ("maps",), seen.append,
                   lambda frame_locals: seen.append(("unbound", sorted(frame_locals))))
    copy = types.FunctionType(code, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    return copy(*args), seen


def test_collecting_keeps_every_softmax_as_stored_in_loops_and_before_a_remix():
    def per_head(heads):
        outs = []
        for head in heads:
            attn = head.softmax(-1)
            outs.append(attn.value)
        return outs

    def talking_heads(x):
        attn = x.softmax(dim=-1)
        attn = attn.mix()  # CaiT: heads mixed after the softmax
        return attn

    result, seen = _collected(per_head, [_Probs(1), _Probs(2), _Probs(3)])
    assert result == [("softmax", 1), ("softmax", 2), ("softmax", 3)]
    assert seen == [[_Probs(("softmax", 1)), _Probs(("softmax", 2)), _Probs(("softmax", 3))]]

    result, seen = _collected(talking_heads, _Probs(7))
    assert result == _Probs(("mixed", ("softmax", 7)))
    assert seen == [[_Probs(("softmax", 7))]]  # the probabilities, not the remix

    result, seen = _collected(per_head, [])
    assert result == [] and seen == [[]]  # bound on every path: an empty list, not "unbound"


def test_collecting_every_spelling_cells_and_back_to_back_stores():
    F = type("F", (), {"softmax": staticmethod(lambda x, dim: _Probs(("F", x.value))),
                       "log_softmax": staticmethod(lambda x, dim: _Probs(("log", x.value)))})

    def spellings(x):
        log = F.log_softmax(x, dim=-1)  # a log-probability: never collected
        first = F.softmax(x, dim=-1)
        second = XSoftmax.apply(x, None, -1)
        third = x.softmax(-1); fourth = third  # 3.13: STORE_FAST_LOAD_FAST, STORE_FAST_STORE_FAST
        a = b = x.softmax(-1)
        return log, first, second, fourth, a, b

    def in_a_closure(x):
        probs = x.softmax(-1)

        def later():
            return probs
        return later()

    result, seen = _collected(spellings, _Probs(1))
    assert result[0] == _Probs(("log", 1))
    assert seen == [[_Probs(("F", 1)), _Probs(("x", 1)), _Probs(("softmax", 1)),
                     _Probs(("softmax", 1))]]
    result, seen = _collected(in_a_closure, _Probs(2))
    assert result == _Probs(("softmax", 2)) and seen == [[_Probs(("softmax", 2))]]


def test_collecting_under_exceptions_and_refusing_a_taken_name():
    from visualizer._rewrite import collecting
    from visualizer.integrations import is_softmax

    def guarded(x, fail):
        try:
            attn = x.softmax(-1)
            if fail:
                raise KeyError("boom")
        except KeyError:
            attn = None
        return attn

    assert _collected(guarded, _Probs(1), False) == (_Probs(("softmax", 1)),
                                                     [[_Probs(("softmax", 1))]])
    assert _collected(guarded, _Probs(1), True) == (None, [[_Probs(("softmax", 1))]])
    with pytest.raises(ValueError, match="already a local"):
        collecting(guarded.__code__, "attn", is_softmax)


class _Map:
    """A stand-in tensor that remembers how it was made: ``@``, ``*``, ``+``, softmax, mix."""

    def __init__(self, how):
        self.how = how

    def __eq__(self, other):
        return isinstance(other, _Map) and self.how == other.how

    def __repr__(self):
        return "_Map({!r})".format(self.how)

    def __matmul__(self, other):
        return _Map(("@", self.how, getattr(other, "how", other)))

    def __mul__(self, other):
        return _Map(("*", self.how, getattr(other, "how", other)))

    __rmul__ = __mul__

    def __add__(self, other):
        return _Map(("+", self.how, getattr(other, "how", other)))

    def softmax(self, dim):
        return _Map(("softmax", self.how))

    def permute(self, *axes):
        return _Map(("permute", self.how))


class _Module:
    """What an attention module calls: dropout keeps a map; a projection mixes it."""

    def attn_drop(self, x):
        return x

    def proj_w(self, x):
        return _Map(("proj_w", x.how))

    def get_attention(self, q, k):  # ConViT's shape: returns a gated mix of two softmaxes
        patch = (q @ k).softmax(-1)
        pos = k.softmax(-1)
        attn = 0.5 * patch + 0.5 * pos
        return attn


def _applied(function, *args, mixes=None):
    """Run ``function`` rewritten by ``collecting`` with ``applied``: (result, stored, applied)."""
    from visualizer._rewrite import collecting, rewrite
    from visualizer.integrations import is_softmax

    seen = []
    code = rewrite(collecting(function.__code__, "maps", is_softmax, "mixed", mixes),
                   ("mixed", "maps"), lambda *values: seen.append(values), seen.append)
    copy = types.FunctionType(code, function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)
    result = copy(*args)
    assert len(seen) == 1 and len(seen[0]) == 2, seen
    return result, seen[0][1], seen[0][0]


def test_applied_maps_finds_the_mixed_map_that_multiplies_the_values():
    from visualizer._rewrite import MIXED, applied_maps, returned_map
    from visualizer.integrations import is_softmax

    def plain(self, q, k, v):  # timm's Attention: the softmax, through dropout, @ v
        attn = (q @ k).softmax(-1)
        attn = self.attn_drop(attn)
        x = attn @ v
        return x

    def talking_heads(self, q, k, v):  # CaiT: a projection across heads after the softmax
        attn = (q @ k).softmax(-1)
        attn = self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.attn_drop(attn)
        x = (attn @ v).permute(0, 2, 1)
        y = x @ v  # the output times something: not a map
        return y

    def gated(self, q, k, v):  # ConViT's forward: the map comes from a sibling method
        attn = self.get_attention(q, k)
        return attn @ v

    def as_matmul(self, q, k, v, torch):
        attn = (q @ k).softmax(-1) * 2  # stored from the softmax: the softmax's key has it
        attn = attn * 2
        return torch.matmul(attn, v)

    module = _Module()
    assert applied_maps(plain.__code__, is_softmax) == []
    assert applied_maps(talking_heads.__code__, is_softmax) == ["attn"]
    assert applied_maps(gated.__code__, is_softmax) == []  # what get_attention returns: unknown
    assert returned_map(_Module.get_attention.__code__, is_softmax) == MIXED
    assert applied_maps(gated.__code__, is_softmax, {"get_attention": MIXED}) == ["attn"]
    assert applied_maps(as_matmul.__code__, is_softmax) == ["attn"]

    q, k, v = _Map("q"), _Map("k"), _Map("v")
    result, stored, applied = _applied(talking_heads, module, q, k, v)
    softmax = ("softmax", ("@", "q", "k"))
    mixed = ("permute", ("proj_w", ("permute", softmax)))
    assert result == _Map(("@", ("permute", ("@", mixed, "v")), "v"))
    assert stored == [_Map(softmax)] and applied == [_Map(mixed)]

    result, stored, applied = _applied(gated, module, q, k, v, mixes={"get_attention": MIXED})
    gate = ("+", ("*", softmax, 0.5), ("*", ("softmax", "k"), 0.5))
    assert result == _Map(("@", gate, "v")) and stored == [] and applied == [_Map(gate)]

    import types as torch  # anything with a matmul
    torch.matmul = lambda a, b: a @ b
    result, stored, applied = _applied(as_matmul, module, q, k, v, torch)
    assert stored == [_Map(("*", softmax, 2))]
    assert applied == [_Map(("*", ("*", softmax, 2), 2))]
    del torch.matmul


def test_applied_maps_in_a_loop_keeps_each_map_as_the_product_took_it():
    def per_head(self, heads, v):
        outs = []
        for head in heads:
            attn = head.softmax(-1)
            attn = attn * 2  # mixed
            outs.append(attn @ v)
            attn = attn * 3  # changed after the product: not what @ took
        return outs

    result, stored, applied = _applied(per_head, _Module(), [_Map(1), _Map(2)], _Map("v"))
    assert stored == [_Map(("softmax", 1)), _Map(("softmax", 2))]
    assert applied == [_Map(("*", ("softmax", 1), 2)), _Map(("*", ("softmax", 2), 2))]
