"""Differential fuzzing: random functions, get_local against sys.settrace.

Hypothesis writes the source of random functions from a small grammar
(assignments, ``+=``, guarded ``del``, if/elif/else, bounded ``for`` and
``while`` with break/continue, try/except/else/finally raising ValueError and
ZeroDivisionError, ``with`` on a context manager that may swallow the error,
``match`` on 3.10+, early and constant returns, bare and implicit returns,
lambdas and inner functions reading and writing (``nonlocal``, ``del``) the
variables, walrus in conditions and comprehensions), all over five variable
names so that every construct collides with every other.  A function is
either top-level or a closure whose body declares ``nonlocal`` names of its
enclosing function.

Each function is compiled, a random subset of its locals (``co_varnames``,
``co_cellvars``, ``co_freevars``) is chosen, and it is called with a few
random integer arguments, four times over:

1. as written: the results and exceptions every other run must reproduce;
2. under ``sys.settrace``: the reference for each local is ``frame.f_locals``
   at the 'return' event of a call that returned (the event also fires, with
   ``arg`` None, when an exception leaves the frame; those calls must record
   nothing);
3. decorated by a fresh, active ``GetLocal``: same results and exceptions; a
   call that returned with every chosen name bound records exactly the
   reference values, one that returned with a name unbound records nothing
   and a ``CaptureWarning`` says so once, one that raised records nothing;
   ``deactivate()`` gives back the original code object;
4. as a copy running the pure ``_rewrite.rewrite`` code (sometimes with a
   ``source`` argument): one report per returning call, equal to the
   reference, and direct loads only where the name really is bound.

The bounded run of CI tries ``VISUALIZER_FUZZ_EXAMPLES`` functions (default
400) with a fixed seed on each Python.  A long run with fresh random seeds::

    VISUALIZER_FUZZ_EXAMPLES=100000 VISUALIZER_FUZZ_RANDOM=1 python -m pytest -q -p no:cacheprovider tests/test_fuzz.py

or ``bash .ci/fuzz-long`` for all six Pythons.  The last test prints how many
functions and calls were compared, and fails if the grammar stopped reaching
one of its constructs.
"""
import os
import sys
import textwrap
import types
import warnings

import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from bytecode import Bytecode
from visualizer import CaptureWarning, VisualizerError
from visualizer import _rewrite
from visualizer._get_local import GetLocal

PY310 = sys.version_info >= (3, 10)
EXAMPLES = int(os.environ.get("VISUALIZER_FUZZ_EXAMPLES", "400"))
RANDOM = os.environ.get("VISUALIZER_FUZZ_RANDOM", "") not in ("", "0")

POOL = ("a", "b", "c", "x", "y")
UNBOUND = "<unbound>"

# Filled in by the fuzz test, reported (and checked) by the last test.
STATS = {"functions": 0, "calls": 0, "returned": 0, "unbound": 0, "raised": 0,
         "closures": 0, "direct": 0, "locals": 0, "refused": 0, "unreadable": 0}
CONSTRUCTS = {}

EVERY_CONSTRUCT = {
    "assign", "augassign", "del", "if", "elif", "else", "for", "while", "break", "continue",
    "try", "except", "except-as", "try-else", "finally", "with", "with-suppress", "raise",
    "zerodiv", "return-expr", "return-const", "return-bare", "implicit-return", "lambda",
    "def", "nonlocal-write", "nonlocal-del", "walrus", "walrus-in-comprehension",
    "comprehension", "genexpr", "closure-of-outer",
} | ({"match"} if PY310 else set())


class CM:
    """A context manager that enters as ``value`` and swallows exceptions if ``suppress``."""

    def __init__(self, value, suppress):
        self.value, self.suppress = value, suppress

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return bool(self.suppress)


class _Writer:
    """Writes one random function; draws come from hypothesis, simplest choice first."""

    def __init__(self, draw, params, outer_names=()):
        self.draw = draw
        self.assigned = set(params) | set(outer_names)
        self.binders = set(params) | set(outer_names)  # names nonlocal may refer to
        self.inner = set()        # inner functions defined so far (g, h)
        self.writers = set()      # of which: functions taking no value (h: nonlocal writes)
        self.whiles = 0
        self.used = set()
        self.in_inner = False     # inner bodies call no inner function: no recursion

    # -- small draws ---------------------------------------------------------------

    def pick(self, options):
        return self.draw(st.sampled_from(options))

    def number(self, low, high):
        return self.draw(st.integers(low, high))

    def name(self):
        """Mostly a name assigned earlier (so most calls return), sometimes any."""
        known = sorted(self.assigned & set(POOL))
        if known and self.number(0, 9) < 9:
            return self.pick(known)
        return self.pick(POOL)

    # -- expressions ---------------------------------------------------------------

    def expr(self, depth=0):
        kind = self.number(0, 8 if depth < 2 else 1)
        if kind == 0:
            return self.name()
        if kind == 1:
            return str(self.number(-2, 5))
        if kind == 2:
            return "({} {} {})".format(self.expr(depth + 1), self.pick("+-"), self.expr(depth + 1))
        if kind == 3:
            return "({} * {} % 97)".format(self.expr(depth + 1), self.expr(depth + 1))
        if kind == 4:
            self.used.add("zerodiv")
            return "({} // ({} - {}))".format(self.expr(depth + 1), self.name(), self.number(-1, 3))
        if kind == 5:
            return "({} if {} else {})".format(
                self.expr(depth + 1), self.cond(depth + 1), self.expr(depth + 1))
        if kind == 6:
            readers = sorted(self.inner - self.writers)
            if readers and not self.in_inner:
                return "{}()".format(self.pick(readers))
            return self.name()
        if kind == 7:
            return self.comprehension(depth)
        if kind == 8:
            target = self.name()
            self.used.add("walrus")
            self.assigned.add(target)
            self.binders.add(target)
            return "({} := {})".format(target, self.expr(depth + 1))
        raise AssertionError(kind)

    def comprehension(self, depth):
        var = self.pick(POOL)  # the iteration variable collides with the locals
        body = self.expr(depth + 1)
        kind = self.number(0, 2)
        if kind == 0:
            self.used.add("comprehension")
            return "sum([{} for {} in range({})])".format(body, var, self.number(0, 3))
        if kind == 1:
            self.used.add("genexpr")
            return "sum({} for {} in range({}))".format(body, var, self.number(0, 3))
        target = self.pick([n for n in POOL if n != var])
        self.used.add("walrus-in-comprehension")
        self.assigned.add(target)
        self.binders.add(target)
        return "sum([({} := {}) for {} in range({}) if {} % 2])".format(
            target, body, var, self.number(0, 4), var)

    def cond(self, depth=0):
        kind = self.number(0, 4 if depth < 2 else 1)
        if kind == 0:
            return "{} > {}".format(self.expr(depth + 1), self.expr(depth + 1))
        if kind == 1:
            return "{} == {}".format(self.name(), self.number(-1, 3))
        if kind == 2:
            target = self.name()
            self.used.add("walrus")
            self.assigned.add(target)
            self.binders.add(target)
            return "({} := {}) > {}".format(target, self.expr(depth + 1), self.number(-1, 3))
        if kind == 3:
            return "not {}".format(self.expr(depth + 1))
        return "{} {} {}".format(self.cond(depth + 1), self.pick(["and", "or"]),
                                 self.cond(depth + 1))

    # -- statements ----------------------------------------------------------------

    def block(self, depth, loop, size=3):
        lines = []
        for _ in range(self.number(1, size)):
            lines += self.statement(depth, loop)
        return lines

    def statement(self, depth, loop):
        nested = depth < 3
        kind = self.number(0, 15 if nested else 5)
        if kind == 0:
            target, value = self.name() if self.number(0, 1) else self.pick(POOL), self.expr()
            self.used.add("assign")
            self.assigned.add(target)
            self.binders.add(target)
            return ["{} = {}".format(target, value)]
        if kind == 1:
            self.used.add("augassign")
            target = self.name()
            self.binders.add(target)
            return ["{} {}= {}".format(target, self.pick("+-"), self.expr())]
        if kind == 2:
            self.used.add("del")
            return ["if {}:".format(self.cond()), "    del {}".format(self.name())]
        if kind == 3:
            return self.returns()
        if kind == 4:
            if loop:
                word = self.pick(["break", "continue"])
                self.used.add(word)
                return ["if {}:".format(self.cond()), "    " + word]
            return ["pass"]
        if kind == 5:
            self.used.add("raise")
            return ["if {}:".format(self.cond()),
                    "    raise ValueError({})".format(self.expr())]
        if kind == 6:
            return self.if_statement(depth, loop)
        if kind == 7:
            self.used.add("for")
            var = self.pick(POOL)
            self.assigned.add(var)
            self.binders.add(var)
            return (["for {} in range({}):".format(var, self.number(0, 4))]
                    + indent(self.block(depth + 1, True)))
        if kind == 8:
            self.used.add("while")
            counter = "w{}".format(self.whiles)
            self.whiles += 1
            # The counter is not in the pool, so nothing but this line changes it.
            return (["{} = 0".format(counter),
                     "while {} < {} and ({}):".format(counter, self.number(1, 4), self.cond()),
                     "    {} += 1".format(counter)]
                    + indent(self.block(depth + 1, True)))
        if kind == 9:
            return self.try_statement(depth, loop)
        if kind == 10:
            self.used.add("with")
            suppress = self.pick(["False", "True", self.cond()])
            if suppress != "False":
                self.used.add("with-suppress")
            head = "with CM({}, {})".format(self.expr(), suppress)
            if self.number(0, 1):
                target = self.pick(POOL)
                self.assigned.add(target)
                self.binders.add(target)
                head += " as {}".format(target)
            return [head + ":"] + indent(self.block(depth + 1, loop))
        if kind == 11:
            return self.inner_function()
        if kind == 12:
            writers = sorted(self.writers)
            if writers:
                return ["{}()".format(self.pick(writers))]
            return self.inner_function()
        if kind == 13 and PY310:
            return self.match_statement(depth, loop)
        if kind == 14:
            self.used.add("walrus")
            return (["if {}:".format(self.cond(1) if self.number(0, 1) else
                                     "({} := {}) > 1".format(self.walrus_target(), self.expr()))]
                    + indent(self.block(depth + 1, loop)))
        target = self.pick(POOL)
        self.assigned.add(target)
        self.binders.add(target)
        return ["{} = {}".format(target, self.comprehension(0))]

    def walrus_target(self):
        target = self.name()
        self.assigned.add(target)
        self.binders.add(target)
        return target

    def returns(self):
        kind = self.number(0, 4)
        if kind == 0:
            self.used.add("return-expr")
            return ["return {}".format(self.expr())]
        if kind == 1:
            self.used.add("return-const")
            return ["return {}".format(self.pick(["0", "7", "'done'", "None", "(1, 2)"]))]
        if kind == 2:
            self.used.add("return-bare")
            return ["return"]
        if kind == 3:
            self.used.add("return-expr")
            return ["return ({}, {})".format(self.expr(), self.expr())]
        return ["if {}:".format(self.cond()), "    return {}".format(self.expr())]

    def if_statement(self, depth, loop):
        self.used.add("if")
        lines = ["if {}:".format(self.cond())] + indent(self.block(depth + 1, loop))
        for _ in range(self.number(0, 2)):
            self.used.add("elif")
            lines += ["elif {}:".format(self.cond())] + indent(self.block(depth + 1, loop))
        if self.number(0, 1):
            self.used.add("else")
            lines += ["else:"] + indent(self.block(depth + 1, loop))
        return lines

    def try_statement(self, depth, loop):
        self.used.add("try")
        lines = ["try:"] + indent(self.block(depth + 1, loop))
        handlers = 0
        for clause in ("ValueError", "ZeroDivisionError", "(ValueError, ZeroDivisionError)",
                       "Exception"):
            if self.number(0, 2) == 0:
                continue
            handlers += 1
            self.used.add("except")
            head = "except {}".format(clause)
            if self.number(0, 1):
                target = self.pick(POOL)  # bound, then deleted at the end of the handler
                self.used.add("except-as")
                self.binders.add(target)
                head += " as {}".format(target)
            lines += [head + ":"] + indent(self.block(depth + 1, loop, 2))
            if clause == "Exception":
                break
        if handlers and self.number(0, 1):
            self.used.add("try-else")
            lines += ["else:"] + indent(self.block(depth + 1, loop, 2))
        if not handlers or self.number(0, 1):
            self.used.add("finally")
            lines += ["finally:"] + indent(self.block(depth + 1, loop, 2))
        return lines

    def match_statement(self, depth, loop):
        self.used.add("match")
        subject = self.pick(["{}", "({}, {})", "{} % 3"]).format(self.name(), self.name())
        lines = ["match {}:".format(subject)]
        cases = []
        for _ in range(self.number(1, 3)):
            kind = self.number(0, 3)
            if kind == 0:
                cases.append("case {}:".format(self.number(-1, 3)))
            elif kind == 1:
                cases.append("case {} | {}:".format(self.number(-1, 1), self.number(2, 4)))
            elif kind == 2:
                first = self.pick(POOL)
                second = self.pick([n for n in POOL if n != first])
                self.assigned.update((first, second))
                self.binders.update((first, second))
                cases.append("case ({}, {}):".format(first, second))
            else:
                target = self.pick(POOL)
                self.assigned.add(target)
                self.binders.add(target)
                cases.append("case int({}) if {} > {}:".format(target, target, self.number(0, 3)))
        last = self.number(0, 2)
        if last == 1:
            cases.append("case _:")
        elif last == 2:
            target = self.pick(POOL)
            self.assigned.add(target)
            self.binders.add(target)
            cases.append("case {}:".format(target))
        for case in cases:
            lines += indent([case] + indent(self.block(depth + 1, loop, 2)))
        return lines

    def inner_function(self):
        self.in_inner = True
        try:
            return self._inner_function()
        finally:
            self.in_inner = False

    def _inner_function(self):
        kind = self.number(0, 3)
        if kind == 0:
            self.used.add("lambda")
            self.inner.add("g")
            self.assigned.add("g")
            return ["g = lambda: {}".format(self.expr(1))]
        if kind == 1:
            self.used.add("def")
            self.inner.add("g")
            self.assigned.add("g")
            return ["def g():", "    return {}".format(self.expr(1))]
        targets = sorted(self.binders & set(POOL))
        if not targets:
            return ["pass"]
        target = self.pick(targets)
        self.inner.add("h")
        self.writers.add("h")
        self.assigned.add("h")
        if kind == 2:
            self.used.add("nonlocal-write")
            body = "{} = {}".format(target, self.expr(1))
        else:
            self.used.add("nonlocal-del")
            body = "del {}".format(target)
        return ["def h():", "    nonlocal {}".format(target), "    " + body]


def indent(lines):
    return ["    " + line for line in lines]


@st.composite
def functions(draw):
    """Return ``(source, is_closure, constructs)``: ``f`` at top level or made by ``outer()``."""
    closure = draw(st.booleans())
    if not closure:
        params = ("a", "b") if draw(st.booleans()) else ("a", "b", "c")
        writer = _Writer(draw, params)
        body = writer.block(0, False, 5)
        signature = "a, b" if len(params) == 2 else "a, b, c=1"
        lines = ["def f({}):".format(signature)]
    else:
        outer_names = draw(st.lists(st.sampled_from(["c", "x", "y"]), min_size=1, unique=True))
        declared = draw(st.lists(st.sampled_from(outer_names), unique=True))
        writer = _Writer(draw, ("a", "b"), outer_names)
        writer.used.add("closure-of-outer")
        body = writer.block(0, False, 5)
        lines = ["def f(a, b):"]
        if declared:
            lines.append("    nonlocal {}".format(", ".join(declared)))
    if body[-1].startswith("return"):
        pass
    elif draw(st.booleans()):
        body += writer.returns()
    else:
        writer.used.add("implicit-return")
    lines += indent(body)
    if closure:
        setup = ["{} = {}".format(n, i + 1) for i, n in enumerate(outer_names)]
        lines = ["def outer():"] + indent(setup + lines + ["return f"])
    return "\n".join(lines) + "\n", closure, writer.used


# -- running one function four ways ------------------------------------------------------

def normal(value):
    """Make a value comparable across runs: inner functions by name, exceptions by content."""
    if isinstance(value, types.FunctionType):
        return ("function", value.__qualname__)
    if isinstance(value, BaseException):
        return ("exception", type(value).__name__, normal(value.args))
    if isinstance(value, tuple):
        return tuple(normal(v) for v in value)
    return value


def outcome_of(fn, args):
    try:
        return ("ok", normal(fn(*args)))
    except Exception as exc:  # the function may raise on purpose
        return ("raised", type(exc).__name__, str(exc))


class Subject:
    """A generated function: ``fresh()`` gives a new instance with fresh closure state."""

    def __init__(self, source, closure):
        self.source, self.closure = source, closure
        try:
            with warnings.catch_warnings():
                # 3.14 warns of return/break/continue in finally (PEP 765): the grammar
                # makes them on purpose, to test those return paths.
                warnings.simplefilter("ignore", SyntaxWarning)
                self.compiled = compile(source, "<fuzz>", "exec")
        except SyntaxError:
            # The grammar avoids these (e.g. nonlocal of a name f never binds); rare.
            reject()

    def fresh(self):
        namespace = {"CM": CM}
        exec(self.compiled, namespace)
        return namespace["outer"]() if self.closure else namespace["f"]


def traced(fn, calls):
    """Run ``fn`` untouched under settrace: ``[(outcome, f_locals at its return), ...]``."""
    code = fn.__code__
    seen = []

    def local(frame, event, arg):
        if event == "return":
            seen.append({k: normal(v) for k, v in frame.f_locals.items()})
        return local

    def tracer(frame, event, arg):
        if frame.f_code is code:
            frame.f_trace_lines = False  # only 'return' (and 'exception') events
            return local
        return None

    results = []
    for args in calls:
        del seen[:]
        old = sys.gettrace()
        sys.settrace(tracer)
        try:
            outcome = outcome_of(fn, args)
        finally:
            sys.settrace(old)
        assert len(seen) == 1, seen
        results.append((outcome, seen[0]))
    return results


def keys_for(qualname, names):
    if len(names) == 1:
        return [qualname]
    return ["{}.{}".format(qualname, n) for n in names]


def bytecode_cannot_read(code):
    """True if get_local refuses ``code`` as a known limit of ``bytecode`` (see below)."""
    try:
        _rewrite._read(code)
    except _rewrite.UnreadableCode:
        return True
    return False


def check_get_local(subject, names, calls, reference):
    """Compare a decorated copy with the reference; return the number of calls captured."""
    fn = subject.fresh()
    original = fn.__code__
    gl = GetLocal()
    gl.activate()
    try:
        gl(*names)(fn)
    except Exception as exc:
        gl.deactivate()
        # Refusing is allowed only for code the rewrite cannot read, and only
        # with a clear error that leaves nothing behind.
        assert bytecode_cannot_read(original), "decorating raised {!r}".format(exc)
        assert fn.__code__ is original
        if isinstance(exc, VisualizerError) and not gl.watched():
            STATS["refused"] += 1
            return None
        STATS["unreadable"] += 1  # test_unreadable_code_* below hold this case
        return None
    assert fn.__code__ is not original
    keys = keys_for(fn.__qualname__, names)
    expected = {key: [] for key in keys}
    warned = set()
    try:
        for args, (ref_outcome, ref_locals) in zip(calls, reference):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                outcome = outcome_of(fn, args)
            assert outcome == ref_outcome, (args, outcome, ref_outcome)
            ours = [w for w in caught if issubclass(w.category, CaptureWarning)]
            assert len(ours) == len(caught), [str(w.message) for w in caught]
            missing = [n for n in names if n not in ref_locals]
            if ref_outcome[0] == "raised":
                assert ours == []
            elif missing:
                new = set(missing) - warned
                assert len(ours) == (1 if new else 0), [str(w.message) for w in ours]
                if ours:
                    message = str(ours[0].message)
                    assert "not bound when {} returned".format(fn.__qualname__) in message
                    assert any(repr(n) in message for n in new)
                warned.update(missing)
            else:
                assert ours == []
                for key, name in zip(keys, names):
                    expected[key].append(ref_locals[name])
            got = {key: [normal(v) for v in gl.cache.get(key, [])] for key in keys}
            assert got == expected, (args, got, expected)
    finally:
        gl.deactivate()
    assert fn.__code__ is original  # off gives back the very code object it had
    return len(expected[keys[0]])


def check_rewrite(subject, names, source, calls, reference):
    fn = subject.fresh()
    records = []

    def record(*values):
        records.append(("direct", tuple(normal(v) for v in values)))

    def record_locals(frame_locals):
        records.append(("locals", tuple(normal(frame_locals.get(n, UNBOUND)) for n in wanted)))

    wanted = ((source,) if source else ()) + tuple(names)
    if bytecode_cannot_read(fn.__code__):
        return {"direct": 0, "locals": 0}
    code = _rewrite.rewrite(fn.__code__, names, record, record_locals, source=source)
    copy = types.FunctionType(code, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)
    kinds = {"direct": 0, "locals": 0}
    for args, (ref_outcome, ref_locals) in zip(calls, reference):
        del records[:]
        assert outcome_of(copy, args) == ref_outcome, args
        if ref_outcome[0] == "raised":
            assert records == []
            continue
        assert len(records) == 1, records
        kind, values = records[0]
        expected = tuple(ref_locals.get(n, UNBOUND) for n in wanted)
        assert values == expected, (args, kind, values, expected)
        if kind == "direct":  # the analysis said bound: it must be
            assert UNBOUND not in expected
        kinds[kind] += 1
    return kinds


def reproducer(source, names, source_arg, calls):
    return "{}\nnames={!r} source={!r} calls={!r}".format(source, names, source_arg, calls)


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_functions_capture_what_settrace_sees(data):
    source, closure, used = data.draw(functions(), label="function")
    subject = Subject(source, closure)
    probe = subject.fresh()
    names = [n for n in _rewrite.local_names(probe.__code__) if n.isidentifier()]
    chosen = tuple(data.draw(st.lists(st.sampled_from(names), min_size=1, max_size=4,
                                      unique=True), label="names"))
    source_arg = data.draw(st.sampled_from([None, None, "a"]), label="source")
    arity = 2 if closure or "c=1" not in source else data.draw(st.sampled_from([2, 3]))
    calls = data.draw(st.lists(st.tuples(*[st.integers(-2, 5)] * arity), min_size=2,
                               max_size=4), label="calls")
    note = reproducer(source, chosen, source_arg, calls)

    # 1 and 2: as written, then under settrace: the same outcomes.
    plain = subject.fresh()
    outcomes = [outcome_of(plain, args) for args in calls]
    reference = traced(subject.fresh(), calls)
    assert [r[0] for r in reference] == outcomes, note
    # 3 and 4: get_local, and the pure rewrite.
    try:
        captured = check_get_local(subject, chosen, calls, reference)
        kinds = check_rewrite(subject, chosen, source_arg, calls, reference)
    except AssertionError as exc:
        raise AssertionError("{}\n--- reproducer:\n{}".format(exc, note)) from None

    STATS["functions"] += 1
    STATS["closures"] += closure
    STATS["calls"] += len(calls)
    STATS["returned"] += captured or 0
    STATS["raised"] += sum(1 for o in outcomes if o[0] == "raised")
    STATS["unbound"] += sum(1 for o, loc in reference
                            if o[0] == "ok" and any(n not in loc for n in chosen))
    STATS["direct"] += kinds["direct"]
    STATS["locals"] += kinds["locals"]
    for construct in used:
        CONSTRUCTS[construct] = CONSTRUCTS.get(construct, 0) + 1


def test_the_grammar_compiles_and_terminates():
    """A few fixed draws of the grammar give valid Python that runs to an end."""
    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(functions())
    def run(example):
        source, closure, _ = example
        fn = Subject(source, closure).fresh()
        outcome_of(fn, (1, 2))

    run()


# -- what the fuzzing found ------------------------------------------------------------

# On 3.13 an inlined comprehension (PEP 709) whose variable is also a free or
# cell variable of the function gives the code object two slots of one name
# (co_varnames and co_freevars both hold 'x', and 3.13 loads the free one with
# LOAD_FAST 4 where 3.12 used LOAD_CLOSURE).  bytecode 0.19.1 cannot read such
# code: Bytecode.from_code raises IndexError from its locals lookup.
SHADOWED_FREE = """
def outer():
    x = 1
    def f(a):
        nonlocal x
        g = lambda: x
        return [x for x in range(a)], g()
    return f
"""
UNREADABLE_REASON = (
    "3.13: bytecode 0.19 cannot read a function whose comprehension variable is also a "
    "free variable (Bytecode.from_code raises IndexError); get_local lets the IndexError "
    "out of the decorator and of activate(), instead of a clear VisualizerError")
PY313 = sys.version_info >= (3, 13)


def shadowed_free():
    namespace = {}
    exec(SHADOWED_FREE, namespace)
    return namespace["outer"]()


def test_unreadable_code_is_captured_or_refused_clearly():
    fn = shadowed_free()
    original = fn.__code__
    gl = GetLocal()
    gl.activate()
    try:
        try:
            gl("a")(fn)
        except VisualizerError as exc:
            assert "f" in str(exc)
            assert fn.__code__ is original and gl.watched() == {}
            return
        assert fn(2) == ([0, 1], 1)
        assert gl.cache == {fn.__qualname__: [2]}
    finally:
        gl.deactivate()
    assert fn.__code__ is original


def test_one_unreadable_function_does_not_break_activate_for_the_others():
    def other(a):
        y = a * 2
        return y

    fn = shadowed_free()
    gl = GetLocal()
    gl("y")(other)
    try:
        gl("a")(fn)  # inactive: nothing is rewritten yet
    except VisualizerError:
        pass  # refusing it at decoration time is fine too
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CaptureWarning)
            gl.activate()
        assert other(3) == 6
        assert gl.cache[other.__qualname__] == [6]
        assert fn(2) == ([0, 1], 1)
    finally:
        gl.deactivate()


# Found by the long random run on 3.13: the same shape (a comprehension variable
# that is also a free variable), but code bytecode *can* read.  It writes the
# rewritten code with the lambda's closure built from the wrong slot
# (LOAD_FAST of x's cell instead of c's), so the function computes something else.
SHADOWED_FREE_MISCOMPILED = """
def outer():
    c = 1
    x = 2
    def f():
        nonlocal c
        g = lambda: c
        y = x
        [0 for c in ()]
        return g()
    return f
"""


def test_a_shadowed_free_variable_keeps_its_closure():
    namespace = {}
    exec(SHADOWED_FREE_MISCOMPILED, namespace)
    fn = namespace["outer"]()
    assert fn() == 1
    gl = GetLocal()
    gl.activate()
    try:
        gl("y")(fn)
    except VisualizerError:
        assert gl.watched() == {}
        return
    try:
        assert fn() == 1
        assert gl.cache[fn.__qualname__] == [2]
    finally:
        gl.deactivate()


LEAK_CHECK = """
import builtins, gc, sys, weakref
from visualizer._get_local import GetLocal
assert "torch" not in sys.modules
states = []
for i in range(50):
    gl = GetLocal()
    gl.activate()
    def f(a):
        x = [a] * 1000
        return x
    gl("x")(f)
    f(1)
    gl.deactivate()
    states.append(weakref.ref(gl._state))
    del gl, f
gc.collect()
alive = sum(ref() is not None for ref in states)
assert alive == 0, "{} of 50 discarded GetLocal states are still alive".format(alive)
bound = [n for n in vars(builtins) if n.startswith("__visualizer_record")]
assert not bound, "recorder names left in builtins: {}".format(bound[:4])
"""


def test_discarded_get_locals_are_freed():
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", LEAK_CHECK], cwd=root,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            universal_newlines=True)
    assert result.returncode == 0, result.stdout


def test_fuzz_volume(capsys):
    """Report how much was compared; fail if the grammar stopped reaching a construct."""
    if not STATS["functions"]:
        pytest.skip("the fuzz test did not run in this session")
    line = ("fuzz volume on Python {}: {functions} functions ({closures} closures), {calls} "
            "calls: {returned} captured and equal to settrace, {unbound} returned with a name "
            "unbound, {raised} raised; rewrite probes: {direct} direct, {locals} via locals(); "
            "code bytecode cannot read: {refused} refused clearly, {unreadable} not"
            .format(sys.version.split()[0], **STATS))
    with capsys.disabled():
        print("\n" + line)
    if STATS["functions"] >= 200:
        missing = EVERY_CONSTRUCT - set(CONSTRUCTS)
        assert not missing, "the grammar never produced: {}".format(sorted(missing))
        for kind in ("returned", "unbound", "raised", "direct", "locals"):
            assert STATS[kind] > 0, (kind, line)
