"""Events: each filter, each composition, the dispatcher, handler failures."""
import pytest

from conftest import require
from visualizer import CaptureWarning, VisualizerError
from visualizer.events import (Event, EventDispatcher, EventFilter, from_module, function_is,
                               module_name_contains, variable_is)


def event(function="Attention.forward", name="attn", source=None, value=1):
    return Event(function, function, name, value, source)


def test_function_and_variable_filters():
    assert function_is("Attention.forward")(event())
    assert not function_is("Block.forward")(event())
    assert variable_is("attn")(event())
    assert not variable_is("q")(event())


def test_function_is_accepts_a_function_object():
    def forward():
        pass
    assert function_is(forward)(event(function=forward.__qualname__))


@pytest.mark.parametrize("combined, expected", [
    (lambda a, b: a & b, [True, False, False, False]),
    (lambda a, b: a | b, [True, True, True, False]),
    (lambda a, b: ~a, [False, False, True, True]),
    (lambda a, b: ~(a & b) | a, [True, True, True, True]),
    (lambda a, b: a & (lambda e: e.value > 0), [True, True, False, False]),
    (lambda a, b: (lambda e: e.value > 0) & a, [True, True, False, False]),
    (lambda a, b: (lambda e: e.value > 5) | b, [True, False, True, False]),
])
def test_compositions(combined, expected):
    a = function_is("A.f")
    b = variable_is("x")
    events = [event("A.f", "x", value=1), event("A.f", "y", value=1),
              event("B.f", "x", value=0), event("B.f", "y", value=0)]
    f = combined(a, b)
    assert isinstance(f, EventFilter)
    assert [f(e) for e in events] == expected


def test_filters_describe_themselves():
    text = repr(~function_is("A.f") & variable_is("x"))
    assert "function_is('A.f')" in text and "variable_is('x')" in text and "~" in text


def test_bad_filter_arguments():
    with pytest.raises(TypeError):
        function_is(3)
    with pytest.raises(TypeError):
        variable_is(None)
    with pytest.raises(TypeError):
        EventFilter("not callable")
    with pytest.raises(TypeError):
        module_name_contains(object(), "x")


def test_dispatcher_listen_remove_clear():
    changes = []
    dispatcher = EventDispatcher(on_change=lambda: changes.append(len(dispatcher)))
    seen_a, seen_b = [], []
    handler_a = dispatcher.listen(variable_is("attn"), seen_a.append)
    dispatcher.listen(None, seen_b.append)
    dispatcher.dispatch(event())
    dispatcher.dispatch(event(name="q"))
    assert [e.name for e in seen_a] == ["attn"] and [e.name for e in seen_b] == ["attn", "q"]
    dispatcher.remove(handler_a)
    dispatcher.dispatch(event())
    assert len(seen_a) == 1 and len(seen_b) == 3
    with pytest.raises(ValueError, match="is not listening") as info:
        dispatcher.remove(handler_a)
    assert isinstance(info.value, VisualizerError)
    dispatcher.clear()
    assert len(dispatcher) == 0
    assert changes == [1, 2, 1, 0]
    with pytest.raises(TypeError, match="handler must be callable"):
        dispatcher.listen(None, "nope")


def test_events_reach_handlers_before_storage_with_raw_values(gl):
    order = []

    class Attention:
        @gl("attn", "q")
        def forward(self, x):
            q = x + 1
            attn = [q, q]
            return attn

    def handler(e):
        # The value is not stored yet when the handler runs.
        order.append((e.key, e.function, e.name, e.value, e.source, len(gl.cache.get(e.key, []))))

    gl.events.listen(function_is(Attention.forward), handler)
    module = Attention()
    module.forward(1)
    q = Attention.forward.__qualname__
    assert order == [(q + ".attn", q, "attn", [2, 2], module, 0),
                     (q + ".q", q, "q", 2, module, 0)]
    assert gl.cache == {q + ".attn": [[2, 2]], q + ".q": [2]}


def test_plain_function_event_has_no_source(gl):
    seen = []
    gl.events.listen(None, seen.append)

    @gl("y")
    def f(x):
        y = x
        return y

    f(3)
    assert [(e.key, e.value, e.source) for e in seen] == [(f.__qualname__, 3, None)]


def test_a_failing_handler_warns_once_and_capture_continues(gl):
    @gl("y")
    def f(x):
        y = x
        return y

    def broken(e):
        raise RuntimeError("handler bug")

    good = []
    gl.events.listen(None, broken)
    gl.events.listen(None, good.append)
    with pytest.warns(CaptureWarning, match="handler bug"):
        assert f(1) == 1
    f(2)
    assert len(good) == 2 and gl.cache[f.__qualname__] == [1, 2]


def test_events_only_storage(gl):
    seen = []
    gl.events.listen(None, lambda e: seen.append(e.value))
    gl.configure(store="none")

    @gl("y")
    def f(x):
        y = x * 2
        return y

    f(1)
    f(2)
    assert seen == [2, 4]
    assert gl.cache == {}


def test_module_filters_on_a_real_model(gl):
    torch = require("torch")

    class Attention(torch.nn.Module):
        @gl("attn")
        def forward(self, x):
            attn = x.softmax(-1)
            return attn

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, x):
            return self.attn(x)

    model = torch.nn.Sequential(Block(), Block(), Block())
    seen = {"from": [], "name": [], "both": []}
    gl.events.listen(from_module(model[1].attn), lambda e: seen["from"].append(e.source))
    gl.events.listen(module_name_contains(model, "2.attn"), lambda e: seen["name"].append(e.source))
    gl.events.listen(module_name_contains(model, "attn") & ~from_module(model[0].attn),
                     lambda e: seen["both"].append(e.source))
    model(torch.randn(2, 3))
    assert seen["from"] == [model[1].attn]
    assert seen["name"] == [model[2].attn]
    assert seen["both"] == [model[1].attn, model[2].attn]
    with pytest.warns(CaptureWarning, match="no submodule name contains 'blocks'"):
        module_name_contains(model, "blocks")
