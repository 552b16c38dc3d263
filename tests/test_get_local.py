"""The get_local API: the switch, the cache, binding kinds, errors, threads."""
import functools
import inspect
import subprocess
import sys
import threading
import warnings

import pytest

import visualizer
from visualizer import CaptureWarning, VisualizerError, get_local
from visualizer._get_local import GetLocal


# -- off means absent ----------------------------------------------------------

def test_inactive_decorator_returns_the_function_itself():
    instance = GetLocal()

    def f(a):
        x = a + 1
        return x

    code = f.__code__
    assert instance(("x"))(f) is f
    assert f.__code__ is code
    assert f(1) == 2
    assert instance.cache == {}


def test_activate_after_decorating_still_captures(gl):
    instance = GetLocal()

    @instance("x")
    def f(a):
        x = a * 3
        return x

    original = f.__code__
    f(1)
    assert instance.cache == {}
    instance.activate()
    try:
        f(2)
        assert instance.cache == {"test_activate_after_decorating_still_captures.<locals>.f": [6]}
    finally:
        instance.deactivate()
    assert f.__code__ is original


def test_deactivate_restores_original_code_and_stops_recording(gl):
    def f(a):
        x = a
        return x

    original = f.__code__
    assert gl("x")(f) is f
    assert f.__code__ is not original
    f(1)
    gl.deactivate()
    assert f.__code__ is original
    f(2)
    assert gl.cache[f.__qualname__] == [1]
    gl.activate()
    f(3)
    assert gl.cache[f.__qualname__] == [1, 3]


def test_public_singleton_and_exports():
    assert isinstance(get_local, GetLocal)
    assert set(visualizer.__all__) >= {"get_local", "VisualizerError", "__version__"}
    for name in visualizer.__all__:
        assert getattr(visualizer, name) is not None
    assert "inactive" in repr(GetLocal())


# -- keys and the cache ---------------------------------------------------------

def test_keys_one_name_is_qualname_several_names_get_suffixes(gl):
    class Attention:
        @gl("attn")
        def forward(self, x):
            attn = x * 2
            return attn + 1

        @gl("q", "k")
        def qk(self, x):
            q, k = x, -x
            return q + k

    a = Attention()
    a.forward(1)
    a.qk(5)
    prefix = "test_keys_one_name_is_qualname_several_names_get_suffixes.<locals>.Attention"
    assert gl.cache == {prefix + ".forward": [2], prefix + ".qk.q": [5], prefix + ".qk.k": [-5]}


def test_one_entry_per_call_in_return_order_and_clear_keeps_keys(gl):
    @gl("x")
    def f(a):
        x = a
        return x

    for i in range(5):
        f(i)
    key = f.__qualname__
    assert gl.cache[key] == [0, 1, 2, 3, 4]
    gl.clear()
    assert gl.cache == {key: []}
    f(9)
    assert gl.cache[key] == [9]


def test_recursion_records_innermost_first(gl):
    @gl("n")
    def fact(n):
        if n <= 1:
            return 1
        return n * fact(n - 1)

    assert fact(4) == 24
    assert gl.cache[fact.__qualname__] == [1, 2, 3, 4]


def test_nested_decorated_calls_record_at_their_own_return(gl):
    @gl("y")
    def inner(a):
        y = a + 1
        return y

    @gl("z")
    def outer(a):
        z = inner(a) * 10
        return z

    outer(1)
    outer(2)
    assert gl.cache[inner.__qualname__] == [2, 3]
    assert gl.cache[outer.__qualname__] == [20, 30]


def test_return_value_and_exceptions_are_untouched(gl):
    sentinel = object()

    @gl("x")
    def f(a):
        x = a
        if a is None:
            raise KeyError("boom")
        return sentinel, a

    result = f(1)
    assert result[0] is sentinel and result == (sentinel, 1)
    with pytest.raises(KeyError) as info:
        f(None)
    assert info.value.args == ("boom",)
    raise_line = inspect.getsourcelines(f)[1] + 4
    assert info.traceback[-1].lineno + 1 == raise_line
    assert gl.cache[f.__qualname__] == [1]


def test_values_are_stored_as_they_are(gl):
    np = pytest.importorskip("numpy")

    @gl("arr", "obj")
    def f():
        arr = np.arange(6).reshape(2, 3)
        obj = {"k": [1]}
        return 0

    f()
    key = f.__qualname__
    arr = gl.cache[key + ".arr"][0]
    assert isinstance(arr, np.ndarray) and arr.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert gl.cache[key + ".obj"] == [{"k": [1]}]


# -- binding kinds -----------------------------------------------------------------

def test_instance_class_static_methods_and_property(gl):
    class Model:
        scale = 10

        @gl("a")
        def method(self, x):
            a = x * self.scale
            return a

        @classmethod
        @gl("b")
        def clsmethod(cls, x):
            b = x + cls.scale
            return b

        @staticmethod
        @gl("c")
        def static(x):
            c = -x
            return c

        @property
        @gl("d")
        def prop(self):
            d = self.scale * 2
            return d

    m = Model()
    assert (m.method(2), Model.clsmethod(1), m.clsmethod(2), Model.static(3), m.static(4),
            m.prop) == (20, 11, 12, -3, -4, 20)
    q = Model.__qualname__
    assert gl.cache == {q + ".method": [20], q + ".clsmethod": [11, 12],
                        q + ".static": [-3, -4], q + ".prop": [20]}


def test_decorating_the_descriptor_objects_directly(gl):
    class Model:
        @gl("b")
        @classmethod
        def clsmethod(cls, x):
            b = x * 2
            return b

        @gl("c")
        @staticmethod
        def static(x):
            c = x * 3
            return c

        @gl("d")
        @property
        def prop(self):
            d = 4
            return d

    assert isinstance(Model.__dict__["clsmethod"], classmethod)
    assert isinstance(Model.__dict__["static"], staticmethod)
    assert isinstance(Model.__dict__["prop"], property)
    assert (Model.clsmethod(1), Model.static(1), Model().prop) == (2, 3, 4)
    q = Model.__qualname__
    assert gl.cache == {q + ".clsmethod": [2], q + ".static": [3], q + ".prop": [4]}


def test_bound_method_is_rewritten_on_its_function(gl):
    class A:
        def f(self, x):
            y = x + 1
            return y

    a = A()
    assert gl("y")(a.f) == a.f
    A().f(1)
    assert gl.cache[A.f.__qualname__] == [2]


def test_functools_wraps_wrapper_captures_from_the_wrapped_function(gl):
    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            result = fn(*args, **kwargs)
            return result
        return wrapper

    @logged
    def attention(x):
        attn = x * 2
        return attn + 1

    assert gl("attn")(attention) is attention
    assert attention(3) == 7
    assert gl.cache == {attention.__wrapped__.__qualname__: [6]}


def test_wrapper_variable_wins_over_wrapped(gl):
    def logged(fn):
        @functools.wraps(fn)
        def wrapper(*args):
            result = fn(*args)
            return result
        return wrapper

    @logged
    def f(x):
        result = "inner"
        return x

    gl("result")(f)
    f(5)
    assert gl.cache[f.__qualname__] == [5]


def test_metadata_and_signature_preserved(gl):
    def f(a: int, b: str = "x", *args, c, **kw) -> tuple:
        """Docstring."""
        x = a
        return x

    before = (inspect.signature(f), f.__name__, f.__qualname__, f.__doc__, f.__module__,
              f.__defaults__, f.__kwdefaults__, f.__annotations__)
    gl("x")(f)
    after = (inspect.signature(f), f.__name__, f.__qualname__, f.__doc__, f.__module__,
             f.__defaults__, f.__kwdefaults__, f.__annotations__)
    assert after == before
    assert f(1, c=2) == 1


def test_closures_sharing_one_code_object_are_rewritten_once(gl):
    fns = []
    for i in range(4):
        def f(a, i=i):
            x = a + i
            return x
        fns.append(gl("x")(f))
    assert len({id(fn.__code__) for fn in fns}) == 1
    for fn in fns:
        fn(10)
    assert gl.cache[fns[0].__qualname__] == [10, 11, 12, 13]


def test_decorating_twice_captures_once_and_adds_names(gl):
    def f(a):
        x = a
        y = -a
        return x

    gl("x")(f)
    gl("x")(f)
    f(1)
    assert gl.cache == {f.__qualname__: [1]}
    gl("y")(f)
    f(2)
    assert gl.cache == {f.__qualname__: [1], f.__qualname__ + ".x": [2],
                        f.__qualname__ + ".y": [-2]}


# -- unbound variables ---------------------------------------------------------

def test_unbound_variable_records_nothing_and_warns_once(gl):
    @gl("attn")
    def forward(x, fused):
        if fused:
            out = x
        else:
            attn = x * 2
            out = attn
        return out

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert forward(1, True) == 1
        assert forward(2, False) == 4
        assert forward(3, True) == 3
    messages = [str(w.message) for w in caught if issubclass(w.category, CaptureWarning)]
    assert len(messages) == 1
    assert "'attn'" in messages[0] and "forward" in messages[0] and "fused" in messages[0]
    assert gl.cache[forward.__qualname__] == [4]


def test_one_unbound_name_keeps_the_lists_aligned(gl):
    @gl("a", "b")
    def f(flag):
        a = 1
        if flag:
            b = 2
        return 0

    with pytest.warns(CaptureWarning, match="'b'"):
        f(False)
    f(True)
    key = f.__qualname__
    assert gl.cache == {key + ".a": [1], key + ".b": [2]}


# -- threads --------------------------------------------------------------------

def test_concurrent_calls_lose_nothing(gl):
    @gl("x")
    def f(a):
        x = a * 2
        return x

    n_threads, n_calls = 8, 2000
    barrier = threading.Barrier(n_threads)

    def work(t):
        barrier.wait()
        for i in range(n_calls):
            f(t * n_calls + i)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    values = gl.cache[f.__qualname__]
    assert sorted(values) == [2 * i for i in range(n_threads * n_calls)]


# -- bad input --------------------------------------------------------------------

def test_unknown_variable_names_function_missing_and_locals(gl):
    def forward(self, x):
        attn = x
        return attn

    with pytest.raises(ValueError) as info:
        gl("atn")(forward)
    message = str(info.value)
    assert isinstance(info.value, VisualizerError)
    assert "forward" in message and "'atn'" in message and "'attn'" in message
    assert "self, x, attn" in message
    assert forward.__code__.co_name == "forward" and gl.cache == {}


def test_unknown_variable_is_an_error_even_while_inactive():
    def f(a):
        return a

    with pytest.raises(ValueError, match="no local variable 'x'"):
        GetLocal()("x")(f)


@pytest.mark.parametrize("obj, pattern", [
    (int, "class int"),
    (len, "not builtin_function_or_method len"),
    (functools.partial(print, 1), "not partial"),
    (42, "not int"),
])
def test_non_functions_are_type_errors(gl, obj, pattern):
    with pytest.raises(TypeError, match=pattern) as info:
        gl("x")(obj)
    assert isinstance(info.value, VisualizerError)


def test_class_error_suggests_a_method(gl):
    class Attention:
        def forward(self):
            return 1

    with pytest.raises(TypeError, match=r"Attention\.forward"):
        gl("attn")(Attention)


@pytest.mark.parametrize("source, kind", [
    ("def g():\n    x = 1\n    yield x\n", "generator"),
    ("async def g():\n    x = 1\n    return x\n", "coroutine"),
    ("async def g():\n    x = 1\n    yield x\n", "async generator"),
])
def test_generators_and_coroutines_are_type_errors(gl, source, kind):
    namespace = {}
    exec(source, namespace)
    with pytest.raises(TypeError, match="g, which is an? {}".format(kind)):
        gl("x")(namespace["g"])


@pytest.mark.parametrize("names, error, pattern", [
    ((), TypeError, "needs the names"),
    ((3,), TypeError, "as strings, got int 3"),
    (("not a name",), ValueError, "'not a name' is not a valid variable name"),
    ((print,), TypeError, "not @get_local"),
])
def test_bad_names(names, error, pattern):
    with pytest.raises(error, match=pattern):
        GetLocal()(*names)


def test_replaced_code_is_reported_not_clobbered(gl):
    def f(a):
        x = a
        return x

    def other(a):
        return -a

    gl("x")(f)
    gl.deactivate()
    f.__code__ = other.__code__
    with pytest.warns(CaptureWarning, match="something else replaced its __code__"):
        gl.activate()
    assert f.__code__ is other.__code__
    assert f(1) == -1


# -- the core stays light ----------------------------------------------------------

def test_core_imports_neither_torch_nor_numpy():
    code = (
        "import sys\n"
        "from visualizer import get_local\n"
        "get_local.activate()\n"
        "@get_local('x')\n"
        "def f():\n"
        "    x = [1]\n"
        "    return 0\n"
        "f()\n"
        "assert get_local.cache['f'] == [[1]]\n"
        "heavy = [m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=_repo_root())


def _repo_root():
    import os
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_a_key_deleted_by_the_user_comes_back(gl):
    class A:
        @gl("y")
        def method(self, x):
            y = x
            return y

    @gl("z")
    def f(x):
        z = x
        return z

    f(1)
    A().method(1)
    del gl.cache[f.__qualname__]
    del gl.cache[A.method.__qualname__]
    f(2)
    A().method(2)
    assert gl.cache == {f.__qualname__: [2], A.method.__qualname__: [2]}


def test_switching_reuses_the_rewritten_code(gl):
    def f(a):
        x = a
        return x

    gl("x")(f)
    rewritten = f.__code__
    gl.deactivate()
    gl.activate()
    assert f.__code__ is rewritten  # no second rewrite: switching costs an assignment
    with gl.capture():
        assert f.__code__ is rewritten


def test_a_discarded_get_local_stops_capturing():
    import gc

    instance = GetLocal()

    def f(a):
        x = a
        return x

    original = f.__code__
    instance("x")(f)
    instance.activate()
    assert f.__code__ is not original
    del instance
    gc.collect()
    assert f.__code__ is original


def test_a_function_with_builtins_of_its_own(gl):
    """Sandboxed code sees its own built-in namespace; its recorders are put there too."""
    import builtins

    sandbox = {"len": len}
    namespace = {"__builtins__": sandbox}
    exec("def f(x):\n    n = len(x)\n    return n\n", namespace)
    f = namespace["f"]
    gl("n")(f)
    assert f("abc") == 3
    assert gl.cache[f.__qualname__] == [3]
    ours = [n for n in sandbox if n.startswith("__visualizer_record")]
    assert len(ours) == 2 and all(n in vars(builtins) for n in ours)
    gl.deactivate()
    gl.unwatch(f)
    import gc
    gc.collect()
    assert not [n for n in sandbox if n.startswith("__visualizer_record")]
    assert not [n for n in ours if n in vars(builtins)]
    assert f("abcd") == 4
