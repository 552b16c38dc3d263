"""Captures from many threads at once: nothing lost, every value right, each thread's order.

The pattern is ``nn.DataParallel``'s: one model (or one replica per thread)
runs forwards in several Python threads at once, each on its own input.  The
cache then holds every capture, interleaved across threads; an event handler
(which runs synchronously in the capturing thread) tells which thread made
each one, and ``by_module`` which module did.  The core tests use plain
functions and duck-typed modules; the torch tests use timm's ViT with the
presets.
"""
import copy
import sys
import threading

import pytest

from conftest import require

PY311 = sys.version_info >= (3, 11)


def run_threads(n, work):
    """Run ``work(t)`` in ``n`` threads released together; return ``{ident: t}``."""
    barrier = threading.Barrier(n)
    idents = {}
    errors = []

    def target(t):
        # Every thread is alive until all have passed the barrier, so the
        # idents recorded here are distinct.
        idents[threading.get_ident()] = t
        barrier.wait()
        try:
            work(t)
        except BaseException as exc:  # reported in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=target, args=(t,)) for t in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert len(idents) == n
    return idents


@pytest.fixture
def fast_switching():
    """Switch threads as often as the interpreter allows, to shake out races."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


# -- core: plain functions, many threads ----------------------------------------------

def test_nested_functions_from_many_threads_lose_nothing_and_keep_each_threads_order(
        gl, fast_switching):
    @gl("y")
    def inner(v):
        y = v * 3
        return y

    @gl("z")
    def outer(v):
        z = inner(v) + inner(v + 1)
        return z

    n_threads, n_calls = 16, 300
    seen = []  # (thread ident, key, value), appended by the capturing thread itself
    gl.events.listen(None, lambda event: seen.append(
        (threading.get_ident(), event.key, event.value)))

    def work(t):
        for i in range(n_calls):
            assert outer(t * 10000 + i) == 6 * (t * 10000 + i) + 3

    idents = run_threads(n_threads, work)

    def expected_of(t):  # one thread's captures, in the order its calls returned
        out = []
        for i in range(n_calls):
            v = t * 10000 + i
            out += [(inner.__qualname__, 3 * v), (inner.__qualname__, 3 * v + 3),
                    (outer.__qualname__, 6 * v + 3)]
        return out

    expected = {t: expected_of(t) for t in range(n_threads)}
    per_thread = {t: [] for t in range(n_threads)}
    for ident, key, value in seen:
        per_thread[idents[ident]].append((key, value))
    assert per_thread == expected
    # The cache lost nothing: every value of every thread, once.
    every = [pair for t in range(n_threads) for pair in expected[t]]
    for key in (inner.__qualname__, outer.__qualname__):
        assert sorted(gl.cache[key]) == sorted(v for k, v in every if k == key)
    assert len(gl.cache[inner.__qualname__]) == n_threads * n_calls * 2


class Layer:
    """A duck-typed module: by_module needs only ``named_modules()`` on the model."""

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        attn = (self.index, x)
        return x + 1


class Stack:
    def __init__(self, n_replicas, n_layers):
        self.replicas = [[Layer(k) for k in range(n_layers)] for _ in range(n_replicas)]

    def named_modules(self):
        yield "", self
        for r, layers in enumerate(self.replicas):
            for k, layer in enumerate(layers):
                yield "replicas.{}.layers.{}".format(r, k), layer

    def forward(self, replica, x):
        for layer in self.replicas[replica]:
            x = layer.forward(x)
        return x


def test_replicas_in_threads_by_module_gives_each_replica_its_own_values(gl, fast_switching):
    n_threads, n_layers, n_calls = 8, 4, 500
    stack = Stack(n_threads, n_layers)
    gl("attn")(Layer.forward)
    order = []
    gl.events.listen(None, lambda event: order.append(
        (threading.get_ident(), event.source, event.value)))
    names = {id(m): name for name, m in stack.named_modules()}

    for _ in range(10):  # rounds: a race that exists shows up in one of them
        gl.clear()
        del order[:]

        def work(t):
            for i in range(n_calls):
                stack.forward(t, i)

        idents = run_threads(n_threads, work)
        assert len(gl.cache[Layer.forward.__qualname__]) == n_threads * n_layers * n_calls
        # Each thread's per-layer order, from the handler.
        for ident, t in idents.items():
            mine = [(names[id(source)], value) for i, source, value in order if i == ident]
            assert mine == [("replicas.{}.layers.{}".format(t, k), (k, i + k))
                            for i in range(n_calls) for k in range(n_layers)]
        # by_module: each replica's layer holds exactly its thread's values, in call order.
        grouped = gl.by_module(stack)
        assert sorted(grouped) == sorted(n for n in names.values() if n)
        for t in range(n_threads):
            for k in range(n_layers):
                assert grouped["replicas.{}.layers.{}".format(t, k)] == [
                    (k, i + k) for i in range(n_calls)]


def test_several_names_stay_aligned_across_threads(gl, fast_switching):
    @gl("a", "b")
    def f(v):
        a = v
        b = -v
        return a

    def work(t):
        for i in range(20000):
            f(t * 100000 + i)

    run_threads(8, work)
    a = gl.cache[f.__qualname__ + ".a"]
    b = gl.cache[f.__qualname__ + ".b"]
    assert len(a) == len(b) == 8 * 20000
    assert sorted(a) == sorted(-v for v in b)  # nothing lost ...
    assert [-v for v in b] == a                # ... and each index is one call


# -- torch: timm ViT with the presets, the DataParallel pattern --------------------------

N_THREADS, N_CALLS, N_LAYERS = 4, 2, 12


def timm_setup():
    torch = require("torch")
    timm = require("timm")
    np = require("numpy")
    from timm.utils import AttentionExtract

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    inputs = {(t, c): torch.randn(1, 3, 224, 224) for t in range(N_THREADS)
              for c in range(N_CALLS)}
    # Independent reference, computed before anything is watched: timm's own
    # hooks on attn_drop, on a copy with the fused path switched off by hand.
    eager = copy.deepcopy(model)
    for module in eager.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False
    extract = AttentionExtract(eager, method="hook")
    with torch.no_grad():
        reference = {}
        for tc, x in inputs.items():
            maps = extract(x)
            reference[tc] = [maps["blocks.{}.attn.attn_drop".format(k)].numpy()
                             for k in range(N_LAYERS)]
    return torch, np, model, inputs, reference


def close(np, a, b):
    return np.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("replicas", [False, True], ids=["one-shared-model", "replica-per-thread"])
def test_concurrent_vit_forwards_lose_nothing_and_each_threads_layer_order_is_recoverable(
        gl, replicas):
    torch, np, model, inputs, reference = timm_setup()
    gl.watch_attention(["timm"])
    try:
        if replicas:  # what DataParallel does: a copy per device, one thread each
            container = torch.nn.ModuleList([copy.deepcopy(model) for _ in range(N_THREADS)])

            def model_of(t):
                return container[t]
        else:
            container = model

            def model_of(t):
                return model

        events = []  # (thread ident, module, value), from the capturing thread
        # One AttentionEvent per kernel call (fused path), one Event per eager call.
        gl.events.listen(lambda event: event.name == "attn", lambda event: events.append(
            (threading.get_ident(), event.source, event.value)))

        def work(t):
            with torch.no_grad():  # grad mode is per thread
                for c in range(N_CALLS):
                    model_of(t)(inputs[t, c])

        idents = run_threads(N_THREADS, work)
    finally:
        gl.unwatch_attention()

    total = N_THREADS * N_CALLS * N_LAYERS
    assert len(gl.cache["Attention.forward"]) == len(events) == total
    names = {id(m): name for name, m in container.named_modules()}

    # Each thread: its events, in order, are layer 0..11 of call 0, then of call 1,
    # on its own model, and each map is the reference for that thread's input.
    for ident, t in idents.items():
        mine = [(names[id(source)], value) for i, source, value in events if i == ident]
        prefix = "{}.".format(t) if replicas else ""
        assert [name for name, _ in mine] == [
            "{}blocks.{}.attn".format(prefix, k) for _ in range(N_CALLS) for k in range(N_LAYERS)]
        for n, (_, value) in enumerate(mine):
            c, k = divmod(n, N_LAYERS)
            assert close(np, value.numpy(), reference[t, c][k]), (t, c, k)

    # by_module over the whole container: every module's values, each the
    # reference of exactly one (thread, call) for that layer.
    grouped = gl.by_module(container)
    if replicas:
        assert sorted(grouped) == sorted("{}.blocks.{}.attn".format(t, k)
                                         for t in range(N_THREADS) for k in range(N_LAYERS))
        for t in range(N_THREADS):
            for k in range(N_LAYERS):
                values = grouped["{}.blocks.{}.attn".format(t, k)]
                assert len(values) == N_CALLS
                for c, value in enumerate(values):  # in this thread's call order
                    assert close(np, value, reference[t, c][k])
    else:
        assert sorted(grouped) == sorted("blocks.{}.attn".format(k) for k in range(N_LAYERS))
        for k in range(N_LAYERS):
            values = grouped["blocks.{}.attn".format(k)]
            assert len(values) == N_THREADS * N_CALLS
            unmatched = set(reference)
            for value in values:
                match = [tc for tc in unmatched if close(np, value, reference[tc][k])]
                assert len(match) == 1, (k, match)
                unmatched.discard(match[0])
            assert not unmatched
