"""Bad input to every public call: a clear error naming the input, and nothing half-applied.

Each case runs against a get_local that already has work in progress (a
watched function with captures, a listener, custom storage), and checks that
after the error that work is exactly as it was: the same functions watched,
running the same code objects, the same cache, listeners and settings.

Also here: ``deactivate()`` and ``unwatch`` give back the original code object
(identity) for every binding kind; after ``deactivate()`` a training step runs
the original bytecode; and what ``torch.jit.script``/``trace`` do with a
watched module.  (Wrong shapes for the plotting functions are in
test_plotting.py; the few calls it does not reach are here.)
"""
import contextlib
import functools
import importlib
import json
import os
import sys
import textwrap
import warnings

import pytest

from conftest import require
from visualizer import CaptureWarning, VisualizerError
from visualizer.events import (EventFilter, from_module, function_is, module_name_contains,
                               variable_is)


# -- the work in progress every case must leave alone --------------------------------------

def kept(v):
    """Already watched before each bad call."""
    x = v * 2
    return x


def victim(v):
    """What the bad calls aim at: it must keep its original code."""
    y = v + 1
    return y


VICTIM_CODE = victim.__code__


class Duck:
    """A duck-typed module: ``named_modules()`` is all by_module and the filters need."""

    def named_modules(self):
        yield "", self


@pytest.fixture
def busy(gl):
    """An active get_local with one watched function, one capture, one listener."""
    gl.watch(kept, "x")
    kept(1)
    seen = []
    gl.events.listen(variable_is("x"), seen.append)
    gl.configure(keep_last=7)
    before = snapshot(gl)
    yield gl
    assert snapshot(gl) == before, "a failed call changed the state"
    assert victim.__code__ is VICTIM_CODE
    assert gl.configure(keep_last=7) == {"store": "numpy", "transform": None, "keep_last": 7,
                                             "queries": None, "heads": None}
    gl.unwatch(kept)


def snapshot(gl):
    return (gl.active, gl.watched(), {k: list(v) for k, v in gl.cache.items()},
            len(gl.events), kept.__code__)


def raises(call, error, *fragments):
    """Run ``call``; it must raise ``error`` (our class too) with each fragment in the message."""
    with pytest.raises(error) as info:
        call()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return info.value


# -- get_local(...) and what it decorates ------------------------------------------------

@pytest.mark.parametrize("names, error, fragment", [
    (("",), ValueError, "'' is not a valid variable name"),
    (("a.b",), ValueError, "'a.b' is not a valid variable name"),
    (("x ",), ValueError, "'x ' is not a valid variable name"),
    ((b"x",), TypeError, "got bytes b'x'"),
    (("x", None), TypeError, "got NoneType None"),
])
def test_bad_names(busy, names, error, fragment):
    exc = raises(lambda: busy(*names), error, fragment)
    assert isinstance(exc, VisualizerError)


def test_a_keyword_is_no_local_and_the_error_lists_the_locals(busy):
    exc = raises(lambda: busy("class")(victim), ValueError, "no local variable 'class'",
                 "Its locals are: v, y")
    assert isinstance(exc, VisualizerError)


def _wrapped_twice():
    @functools.wraps(victim)
    def outer(*args):
        return victim(*args)
    return outer


@pytest.mark.parametrize("make, error, fragment", [
    (lambda: None, TypeError, "not NoneType None"),
    (lambda: "victim", TypeError, "not str 'victim'"),
    (lambda: property(), TypeError, "the property has no getter"),
    (lambda: staticmethod(len), TypeError, "not staticmethod"),
    (lambda: [].append, TypeError, "builtin_function_or_method list.append"),
    (lambda: os, TypeError, "module os"),
    (lambda: Duck(), TypeError, "not Duck"),
    (lambda: Duck, TypeError, "cannot decorate the class Duck"),
    (lambda: functools.partial(victim, 1), TypeError, "not partial"),
    # functools.wraps: no level has the variable; the error says where it looked.
    (_wrapped_twice, ValueError, "(unwrapped from"),
])
def test_decorating_what_is_not_a_function_with_the_variable(busy, make, error, fragment):
    exc = raises(lambda: busy("nope")(make()), error, fragment)
    assert isinstance(exc, VisualizerError)


def test_adding_a_bad_name_to_a_watched_function_keeps_what_it_had(busy):
    rewritten = kept.__code__
    raises(lambda: busy("x", "nope")(kept), ValueError, "no local variable 'nope'")
    assert kept.__code__ is rewritten


# -- watch / unwatch ------------------------------------------------------------------------

@pytest.mark.parametrize("target, error, fragment", [
    ("a..b", ValueError, "'a..b' is not a dotted path"),
    (".json", ValueError, "'.json' is not a dotted path"),
    ("json.", ValueError, "'json.' is not a dotted path"),
    ("json.loads x", ValueError, "'json.loads x' is not a dotted path"),
    (None, TypeError, "NoneType None"),
    (b"json.loads", TypeError, "bytes b'json.loads'"),
    ("no_such_package_xyz.mod.f", ValueError, "no module named 'no_such_package_xyz'"),
    ("json.lods", ValueError, "has no attribute 'lods'"),
    ("json", TypeError, "module json"),
    ("os.getcwd", TypeError, "builtin_function_or_method getcwd"),
    ("collections.OrderedDict", TypeError, "the class OrderedDict"),
    ("json.decoder.JSONDecoder.decode", ValueError, "no local variable 'nope'"),
])
def test_watch_targets_that_do_not_resolve_to_a_function_with_the_variable(
        busy, target, error, fragment):
    exc = raises(lambda: busy.watch(target, "nope"), error, fragment)
    assert isinstance(exc, VisualizerError)


@pytest.mark.parametrize("kwargs, error, fragments", [
    ({"source": "y"}, ValueError, ("source 'y' is not an argument of victim", "arguments are: v")),
    ({"source": ""}, ValueError, ("source '' is not an argument",)),
    ({"source": 3}, ValueError, ("source 3 is not an argument",)),
    ({"overrides": [("fused_attn", False)]}, TypeError, ("overrides must be a dict",)),
    ({"overrides": "fused_attn"}, TypeError, ("overrides must be a dict",)),
    ({"overrides": {"fused_attn": False}}, ValueError, ("never reads the attribute 'fused_attn'",)),
])
def test_watch_options(busy, kwargs, error, fragments):
    exc = raises(lambda: busy.watch(victim, "y", **kwargs), error, *fragments)
    assert isinstance(exc, VisualizerError)


def test_watch_with_overrides_and_no_names_still_checks_the_names(busy):
    raises(lambda: busy.watch(victim, overrides={}), TypeError, "needs the names")
    raises(lambda: busy.watch(victim, "y", 3), TypeError, "got int 3")


def test_override_names_must_be_strings(busy):
    exc = raises(lambda: busy.watch(victim, "y", overrides={1: 0, "a": 0}), TypeError, "1")
    assert isinstance(exc, VisualizerError)


def test_watching_a_watched_function_again_with_a_bad_option_keeps_it_as_it_was(busy):
    rewritten = kept.__code__
    raises(lambda: busy.watch(kept, "x", source="nope"), ValueError, "source 'nope'")
    raises(lambda: busy.watch(kept, "v", overrides={"nope": 1}), ValueError, "'nope'")
    assert kept.__code__ is rewritten


@pytest.mark.parametrize("target, fragment", [
    (42, "42 is not being watched (watched: "),
    (None, "None is not being watched"),
    ("", "'' is not a dotted path"),
    ("a..b", "'a..b' is not a dotted path"),
    (victim, "is not being watched (watched: {}.kept)".format(__name__)),
])
def test_unwatch_of_what_is_not_watched(busy, target, fragment):
    exc = raises(lambda: busy.unwatch(target), ValueError, fragment)
    assert isinstance(exc, VisualizerError)


def test_unwatch_twice(gl):
    gl.watch(victim, "y")
    gl.unwatch(victim)
    raises(lambda: gl.unwatch(victim), ValueError, "not being watched")
    assert victim.__code__ is VICTIM_CODE and gl.watched() == {}


# -- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("families", [["nope"], ["timm", "nope"], ("torch", "Timm")])
def test_watch_attention_unknown_family_applies_nothing(busy, families):
    from visualizer import presets

    exc = raises(lambda: busy.watch_attention(families), ValueError, "unknown families",
                 "known: 'kernel', 'timm', 'transformers', 'torch'")
    assert isinstance(exc, VisualizerError)
    assert busy not in presets._applied  # no family half set up


def test_watch_attention_with_one_family_as_a_string(busy):
    from visualizer import presets

    try:
        busy.watch_attention("timm")
    except VisualizerError as exc:
        assert "'timm'" in str(exc) and "'t'" not in str(exc)
    else:
        presets.unwatch_attention(busy)


def test_watch_attention_with_a_number(busy):
    exc = raises(lambda: busy.watch_attention(42), TypeError, "42")
    assert isinstance(exc, VisualizerError)


# -- storage options -----------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, fragment", [
    ({"store": "graphs"}, ValueError, "store must be one of"),  # None is the default
    ({"store": "Numpy"}, ValueError, "got 'Numpy'"),
    ({"keep_last": 1.5}, ValueError, "got 1.5"),
    ({"keep_last": "3"}, ValueError, "got '3'"),
    ({"keep_last": -1}, ValueError, "got -1"),
    ({"transform": "mean"}, TypeError, "got str 'mean'"),
    ({"transform": {"k": None}}, TypeError, "transform['k'] must be callable"),
])
def test_configure_and_capture_refuse_bad_options_and_change_nothing(busy, kwargs, error, fragment):
    cache = busy.cache
    raises(lambda: busy.configure(**kwargs), error, fragment)

    def enter():
        with busy.capture(**kwargs):
            pytest.fail("the block must not run")

    exc = raises(enter, error, fragment)
    assert isinstance(exc, VisualizerError)
    assert busy.cache is cache and busy.active


# -- events and filters --------------------------------------------------------------------

@pytest.mark.parametrize("call, error, fragment", [
    (lambda gl: gl.events.listen(3, print), TypeError, "got int 3"),
    (lambda gl: gl.events.listen("attn", print), TypeError, "got str 'attn'"),
    (lambda gl: gl.events.listen(None, "print"), TypeError, "handler must be callable"),
    (lambda gl: gl.events.listen(None, None), TypeError, "got None"),
    (lambda gl: gl.events.remove(print), ValueError, "is not listening"),
    (lambda gl: function_is(None), TypeError, "got None"),
    (lambda gl: function_is(3), TypeError, "got 3"),
    (lambda gl: variable_is(3), TypeError, "got 3"),
    (lambda gl: EventFilter(None), TypeError, "got NoneType None"),
    (lambda gl: variable_is("x") & 3, TypeError, "got int 3"),
    (lambda gl: 3 | variable_is("x"), TypeError, "got int 3"),
    (lambda gl: module_name_contains(object(), "attn"), TypeError, "got object"),
    (lambda gl: module_name_contains(Duck(), 3), TypeError, "got 3"),
])
def test_events_and_filters(busy, call, error, fragment):
    exc = raises(lambda: call(busy), error, fragment)
    assert isinstance(exc, VisualizerError)


@pytest.mark.parametrize("make", [
    pytest.param(lambda: variable_is(""), id="variable_is('')"),
    pytest.param(lambda: variable_is("a b"), id="variable_is('a b')"),
    pytest.param(lambda: function_is(""), id="function_is('')"),
    pytest.param(lambda: from_module(None), id="from_module(None)"),
])
def test_filters_refuse_what_can_never_match(make):
    with pytest.raises(VisualizerError):
        make()


# -- by_module -------------------------------------------------------------------------------

@pytest.mark.parametrize("model, cache, error, fragment", [
    (None, None, TypeError, "got NoneType"),
    (object(), None, TypeError, "got object"),
    ("model", None, TypeError, "got str"),
    (Duck(), {"k": [1]}, TypeError, "a loaded or copied dict has no module record"),
])
def test_by_module(busy, model, cache, error, fragment):
    exc = raises(lambda: busy.by_module(model, cache), error, fragment)
    assert isinstance(exc, VisualizerError)


# -- save and load ---------------------------------------------------------------------------

@pytest.mark.parametrize("cache, error, fragment", [
    ({"k": [None]}, TypeError, "cache['k'][0] is NoneType"),
    ({"k": [1, object()]}, TypeError, "cache['k'][1] is object"),
    ({"k": [[[1, 2], [3]]]}, TypeError, "cache['k'][0] (list) cannot be turned into an array"),
    ({"k": 5}, TypeError, "cache['k'] must be a list"),
    ({1: [1]}, TypeError, "cache keys must be strings, got 1"),
    ([("k", [1])], TypeError, "save needs a cache: a dict"),
])
def test_save_refuses_what_it_cannot_write_and_leaves_no_file(busy, tmp_path, cache, error, fragment):
    require("numpy")
    path = tmp_path / "out.npz"
    exc = raises(lambda: busy.save(path, cache), error, fragment)
    assert isinstance(exc, VisualizerError)
    assert not path.exists()
    # An existing file is not touched either.
    path.write_bytes(b"earlier")
    raises(lambda: busy.save(path, cache), error)
    assert path.read_bytes() == b"earlier"


def test_save_to_a_path_that_cannot_be_written(busy, tmp_path):
    require("numpy")
    raises(lambda: busy.save(tmp_path / "no" / "such" / "dir.npz"), FileNotFoundError)
    raises(lambda: busy.save(tmp_path), IsADirectoryError)
    raises(lambda: busy.save(None), TypeError, "NoneType")
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_number_as_path(busy, tmp_path):
    require("numpy")
    with open(tmp_path / "other.txt", "wb") as fh:
        fd = fh.fileno()
        raises(lambda: busy.save(fd), TypeError, str(fd))
        os.fstat(fd)  # still open
    assert (tmp_path / "other.txt").read_bytes() == b""


def test_save_a_string_value(busy, tmp_path):
    require("numpy")
    path = tmp_path / "s.npz"
    try:
        busy.save(path, {"k": ["abc"]})
    except VisualizerError as exc:
        assert "cache['k'][0]" in str(exc) and "str" in str(exc)
        return
    assert busy.load(path) == {"k": ["abc"]}
    assert type(busy.load(path)["k"][0]) is str


def manifest_file(path, manifest=None, raw=None):
    np = require("numpy")
    data = raw if raw is not None else json.dumps(manifest).encode("utf-8")
    np.savez(path, __visualizer__=np.frombuffer(data, dtype=np.uint8))
    return path


GOOD = {"format": "visualizer-cache", "version": 1}


@pytest.mark.parametrize("manifest, raw, fragment", [
    (dict(GOOD, format="other"), None, "format is 'other'"),
    (dict(GOOD, version=2), None, "version 2; this visualizer reads version 1"),
    (dict(GOOD, keys=5), None, "is damaged"),
    (dict(GOOD, keys=[{"key": "k", "count": "3"}]), None, "is damaged"),
    (dict(GOOD, keys=[{"key": "k", "count": 2}]), None, "is damaged"),
    (None, b"{not json", "is damaged"),
    (None, b"\xff\xfe", "is damaged"),
])
def test_load_damaged_manifests(busy, tmp_path, manifest, raw, fragment):
    path = manifest_file(tmp_path / "bad.npz", manifest, raw)
    exc = raises(lambda: busy.load(path), ValueError, str(path), fragment)
    assert isinstance(exc, VisualizerError)


@pytest.mark.parametrize("manifest", [
    pytest.param([1, 2], id="manifest-is-a-list"),
    pytest.param(dict(GOOD, keys=[3]), id="entry-is-a-number"),
    pytest.param("visualizer-cache", id="manifest-is-a-string"),
])
def test_load_manifest_of_the_wrong_shape(busy, tmp_path, manifest):
    path = manifest_file(tmp_path / "bad.npz", manifest)
    exc = raises(lambda: busy.load(path), ValueError, "is damaged")
    assert isinstance(exc, VisualizerError)


def test_load_pickled_or_unreadable_files(busy, tmp_path):
    np = require("numpy")
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, __visualizer__=np.array([{"format": "visualizer-cache"}], dtype=object))
    raises(lambda: busy.load(pickled), ValueError, "is damaged", "allow_pickle=False")
    raises(lambda: busy.load(tmp_path), ValueError, "not a readable .npz archive")
    raises(lambda: busy.load(tmp_path / "missing.npz"), FileNotFoundError)
    raises(lambda: busy.load(None), TypeError, "NoneType")


# -- plotting: the calls test_plotting.py does not reach -------------------------------------

def test_plot_token_attention_max_tokens_zero():
    np = require("numpy")
    require("matplotlib")
    from visualizer.plotting import plot_token_attention

    exc = raises(lambda: plot_token_attention(np.full((1, 3, 3), 1 / 3), list("abc"),
                                              max_tokens=0), ValueError, "max_tokens")
    assert isinstance(exc, VisualizerError)


def test_save_figure_bad_figure_or_format(tmp_path):
    np = require("numpy")
    require("matplotlib")
    from visualizer.plotting import plot_head, save_figure

    exc = raises(lambda: save_figure(None, str(tmp_path / "a" / "x.png")), TypeError, "None")
    assert isinstance(exc, VisualizerError)
    raises(lambda: save_figure(plot_head(np.eye(3)[None]), str(tmp_path / "b" / "x.nope")),
           ValueError, "nope")
    assert list(tmp_path.iterdir()) == []


# -- deactivate() and unwatch give back the original code objects -------------------------------

BINDINGS = '''
import functools

def function(v):
    a = v + 1
    return a

class Model:
    def method(self, v):
        a = v * 2
        return a

    @classmethod
    def clsmethod(cls, v):
        a = v * 3
        return a

    @staticmethod
    def static(v):
        a = v * 4
        return a

    @property
    def prop(self):
        a = 5
        return a

def _logged(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        return fn(*args)
    return wrapper

@_logged
def wrapped(v):
    a = v * 6
    return a

def make_closure(k):
    def closure(v):
        a = v * k
        return a
    return closure

closure_1, closure_2 = make_closure(7), make_closure(8)
'''


@pytest.fixture
def bindings(tmp_path, monkeypatch):
    name = "bindings_{}".format(abs(hash(str(tmp_path))) % 10 ** 8)
    (tmp_path / (name + ".py")).write_text(textwrap.dedent(BINDINGS))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module(name)
    yield module
    del sys.modules[name]


# kind: (how to watch it, how to call it, the plain functions whose code changes, expected)
KINDS = {
    "function": (lambda m: m.function, lambda m: m.function(1), lambda m: [m.function], 2),
    "function by path": (lambda m: m.__name__ + ".function", lambda m: m.function(1),
                         lambda m: [m.function], 2),
    "method": (lambda m: m.Model.method, lambda m: m.Model().method(1),
               lambda m: [m.Model.method], 2),
    "method by path": (lambda m: m.__name__ + ".Model.method", lambda m: m.Model().method(1),
                       lambda m: [m.Model.method], 2),
    "bound method": (lambda m: m.Model().method, lambda m: m.Model().method(1),
                     lambda m: [m.Model.method], 2),
    "classmethod": (lambda m: vars(m.Model)["clsmethod"], lambda m: m.Model.clsmethod(1),
                    lambda m: [vars(m.Model)["clsmethod"].__func__], 3),
    "staticmethod": (lambda m: m.__name__ + ".Model.static", lambda m: m.Model.static(1),
                     lambda m: [vars(m.Model)["static"].__func__], 4),
    "property": (lambda m: vars(m.Model)["prop"], lambda m: m.Model().prop,
                 lambda m: [vars(m.Model)["prop"].fget], 5),
    "functools.wraps": (lambda m: m.wrapped, lambda m: m.wrapped(1),
                        lambda m: [m.wrapped.__wrapped__], 6),
    "closure": (lambda m: m.closure_1, lambda m: m.closure_1(1), lambda m: [m.closure_1], 7),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_deactivate_and_unwatch_give_back_the_original_code_objects(gl, bindings, kind):
    target_of, call, functions_of, expected = KINDS[kind]
    target = target_of(bindings)
    functions = functions_of(bindings)
    originals = [f.__code__ for f in functions]
    every = {name: getattr(bindings, name) for name in ("function", "wrapped", "closure_1",
                                                        "closure_2")}
    others = {name: f.__code__ for name, f in every.items() if f not in functions}

    gl.watch(target, "a")
    installed = [f.__code__ for f in functions]
    assert all(new is not old for new, old in zip(installed, originals))
    assert call(bindings) == expected
    assert [len(v) for v in gl.cache.values()] == [1]

    gl.deactivate()
    assert all(f.__code__ is old for f, old in zip(functions, originals))
    assert call(bindings) == expected
    gl.activate()
    assert all(f.__code__ is new for f, new in zip(functions, installed))  # the same rewrite

    gl.unwatch(target)
    assert all(f.__code__ is old for f, old in zip(functions, originals))
    gl.deactivate()
    gl.activate()  # an unwatched function stays unwatched
    assert all(f.__code__ is old for f, old in zip(functions, originals))
    # Nothing else was touched at any point; the second closure shares the first's
    # code object but was never watched.
    assert {name: f.__code__ for name, f in every.items() if f not in functions} == others
    assert [len(v) for v in gl.cache.values()] == [1]


def test_closures_sharing_a_code_object_are_restored_together(gl, bindings):
    shared = bindings.closure_1.__code__
    assert bindings.closure_2.__code__ is shared
    gl.watch(bindings.closure_1, "a")
    gl.watch(bindings.closure_2, "a")
    assert bindings.closure_1.__code__ is bindings.closure_2.__code__ is not shared
    gl.deactivate()
    assert bindings.closure_1.__code__ is bindings.closure_2.__code__ is shared
    gl.activate()
    gl.unwatch(bindings.closure_1)
    assert bindings.closure_1.__code__ is shared and bindings.closure_2.__code__ is not shared
    gl.unwatch(bindings.closure_2)
    assert bindings.closure_2.__code__ is shared


# -- after deactivate(), training runs the original bytecode ---------------------------------

def executed_code(step):
    """Run ``step()``; return the code objects of the Python functions it called,
    and how many times the fused attention kernel ran."""
    seen = set()
    fused = [0]

    def profiler(frame, event, arg):
        if event == "call":
            seen.add(frame.f_code)
        elif event == "c_call" and getattr(arg, "__name__", "") == "scaled_dot_product_attention":
            fused[0] += 1

    sys.setprofile(profiler)
    try:
        step()
    finally:
        sys.setprofile(None)
    return seen, fused[0]


def test_training_after_deactivate_runs_the_original_code(gl):
    torch = require("torch")
    timm = require("timm")
    from timm.layers.attention import Attention as TimmAttention

    class Attention(torch.nn.Module):
        def __init__(self, dim=16):
            super().__init__()
            self.qkv, self.proj = torch.nn.Linear(dim, 3 * dim), torch.nn.Linear(dim, dim)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            attn = (q @ k.transpose(-2, -1) / 4).softmax(dim=-1)
            return self.proj(attn @ v)

    torch.manual_seed(0)
    own = torch.nn.Sequential(Attention(), Attention())
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3)
    params = list(own.parameters()) + list(vit.parameters())
    optimizer = torch.optim.SGD(params, lr=0.1)
    originals = {"own": Attention.forward.__code__, "timm": TimmAttention.forward.__code__}

    gl.watch(Attention.forward, "attn")
    gl.watch_attention(["timm"])
    try:
        x, image, labels = torch.randn(2, 5, 16), torch.randn(2, 3, 224, 224), torch.tensor([0, 2])

        def step():
            optimizer.zero_grad()
            loss = own(x).pow(2).mean() + torch.nn.functional.cross_entropy(vit(image), labels)
            loss.backward()
            optimizer.step()
            return loss

        # While capturing: the rewritten code runs, timm on its fused kernel (the seam).
        installed = {"own": Attention.forward.__code__, "timm": TimmAttention.forward.__code__}
        assert all(installed[k] is not originals[k] for k in originals)
        ran, fused = executed_code(step)
        assert {installed["own"], installed["timm"]} <= ran and fused == 12
        assert len(gl.cache[Attention.forward.__qualname__]) == 2
        assert len(gl.cache["Attention.forward"]) == 12
        captured = {k: len(v) for k, v in gl.cache.items()}

        gl.deactivate()
        assert {"own": Attention.forward.__code__,
                "timm": TimmAttention.forward.__code__} == originals
        before = [p.detach().clone() for p in params]
        ran, fused = executed_code(step)
        # The original code objects ran (timm on its fused kernel again), the rewritten never.
        assert originals["own"] in ran and originals["timm"] in ran
        assert not ({installed["own"], installed["timm"]} & ran)
        assert fused == 12
        assert Attention.forward.__code__ is originals["own"]
        assert TimmAttention.forward.__code__ is originals["timm"]
        assert {k: len(v) for k, v in gl.cache.items()} == captured  # nothing recorded
        assert any(not torch.equal(p, b) for p, b in zip(params, before))  # it trained
    finally:
        gl.unwatch_attention()
        gl.unwatch(Attention.forward)


# -- torch.jit -------------------------------------------------------------------------------

def jit_setup(gl):
    torch = require("torch")

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
            return attn @ v

    torch.manual_seed(0)
    module = Attention().eval()
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        q, k, v = module.qkv(x).chunk(3, dim=-1)
        reference = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        expected = reference @ v
    gl.watch(Attention.forward, "attn")
    return torch, module, x, reference, expected


@contextlib.contextmanager
def quiet_jit():
    """Record warnings, without torch.jit's own deprecation notices."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=".*is deprecated.*")
        yield caught


def test_jit_script_of_a_watched_module_runs_torchscript_and_captures_nothing(gl):
    torch, module, x, _, expected = jit_setup(gl)
    with quiet_jit():
        scripted = torch.jit.script(module)  # compiled from the source, not our bytecode
        with torch.no_grad():
            out = scripted(x)
    torch.testing.assert_close(out, expected)
    assert gl.cache.get(type(module).forward.__qualname__, []) == []  # no Python code runs


def test_jit_script_of_a_watched_module_says_nothing_is_captured(gl):
    torch, module, x, _, _ = jit_setup(gl)
    with quiet_jit() as caught:
        scripted = torch.jit.script(module)
    messages = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(messages) == 1 and "torch.jit.script" in messages[0], messages
    assert "capture nothing from jit_setup.<locals>.Attention.forward" in messages[0]
    gl.deactivate()  # off: torch.jit is torch's own again, and says nothing
    assert not hasattr(torch.jit.script, "__wrapped__")
    with quiet_jit() as caught:
        torch.jit.script(module)
    assert not [w for w in caught if issubclass(w.category, CaptureWarning)]
    assert scripted is not None


def test_jit_trace_of_a_watched_module_captures_while_tracing_only(gl):
    np = require("numpy")
    torch, module, x, reference, expected = jit_setup(gl)
    key = type(module).forward.__qualname__
    with quiet_jit(), torch.no_grad():
        traced = torch.jit.trace(module, x)  # runs forward in Python: captures happen
        during = list(gl.cache[key])
        gl.clear()
        out = traced(x)
    torch.testing.assert_close(out, expected)
    # trace runs the forward once and check_trace runs it again: each run is captured,
    # with the real values.
    assert len(during) >= 1
    for value in during:
        np.testing.assert_allclose(value, reference.numpy(), rtol=1e-6, atol=1e-7)
    assert gl.cache[key] == []  # the traced graph runs no Python code


def test_jit_trace_of_a_watched_module_says_nothing_is_captured(gl):
    torch, module, x, _, _ = jit_setup(gl)
    with quiet_jit() as caught, torch.no_grad():
        torch.jit.trace(module, x)
    tracer_warnings = [str(w.message) for w in caught
                       if "might cause the trace to be incorrect" in str(w.message)]
    assert tracer_warnings == []
    messages = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(messages) == 1 and "torch.jit.trace" in messages[0], messages
    assert "this trace's own call is captured" in messages[0]
