"""What the cache keeps: torch tensors as detached CPU NumPy arrays, the rest as is."""
import pytest

from conftest import require
from visualizer.storage.memory import is_tensor, to_numpy


def test_plain_values_are_kept_as_they_are():
    value = {"a": [1, 2]}
    assert to_numpy(value) is value
    assert is_tensor(value) is False


def test_float_tensor_becomes_a_detached_numpy_copy(gl):
    torch = require("torch")
    np = require("numpy")

    @gl("attn")
    def forward(x):
        attn = (x @ x.T).softmax(-1).clone()
        out = attn.sum()
        attn.mul_(0)  # an in-place change before returning is what we see
        attn.add_(1)
        return out, attn

    x = torch.randn(3, 4, requires_grad=True)
    out, attn = forward(x)
    stored = gl.cache[forward.__qualname__][0]
    assert isinstance(stored, np.ndarray) and stored.dtype == np.float32
    np.testing.assert_array_equal(stored, np.ones((3, 3), dtype=np.float32))
    attn.mul_(5)  # ...but a change after the return is not
    np.testing.assert_array_equal(stored, np.ones((3, 3), dtype=np.float32))
    out.backward()  # the graph still works: capture did not detach the model's tensor
    assert x.grad is not None


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_stored_as_float32(gl, dtype):
    torch = require("torch")
    np = require("numpy")

    @gl("t")
    def f():
        t = torch.tensor([0.5, 1.5, -2.0], dtype=getattr(torch, dtype))
        return 0

    f()
    stored = gl.cache[f.__qualname__][0]
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, np.array([0.5, 1.5, -2.0], dtype=np.float32))


def test_integer_and_bool_tensors_keep_their_dtype(gl):
    torch = require("torch")
    np = require("numpy")

    @gl("i", "b")
    def f():
        i = torch.arange(4)
        b = i > 1
        return 0

    f()
    key = f.__qualname__
    assert gl.cache[key + ".i"][0].dtype == np.int64
    assert gl.cache[key + ".b"][0].tolist() == [False, False, True, True]


def test_tensor_subclass_counts_as_a_tensor():
    torch = require("torch")
    param = torch.nn.Parameter(torch.ones(2))
    assert is_tensor(param)
    assert to_numpy(param).tolist() == [1.0, 1.0]


# -- storage options ------------------------------------------------------------

def make_attention(gl, torch):
    class Attention(torch.nn.Module):
        @gl("attn")
        def forward(self, x):
            attn = (x @ x.transpose(-1, -2)).softmax(-1)
            return attn @ x

    return Attention()


def test_store_tensor_keeps_detached_copies_on_device(gl):
    torch = require("torch")
    module = make_attention(gl, torch)
    x = torch.randn(2, 4, 3, requires_grad=True)
    gl.configure(store="tensor")
    module(x)
    stored = gl.cache[type(module).forward.__qualname__][0]
    assert isinstance(stored, torch.Tensor) and not stored.requires_grad
    assert stored.device == x.device
    expected = (x @ x.transpose(-1, -2)).softmax(-1)
    assert torch.allclose(stored, expected.detach())


def test_store_graph_keeps_the_autograd_graph(gl):
    torch = require("torch")
    module = make_attention(gl, torch)
    x = torch.randn(2, 4, 3, requires_grad=True)
    gl.configure(store="graph")
    out = module(x)
    attn = gl.cache[type(module).forward.__qualname__][0]
    assert attn.requires_grad and attn.grad_fn is not None
    grad, = torch.autograd.grad(out.sum(), attn)  # gradient-weighted rollout needs this
    assert grad.shape == attn.shape


def test_transform_runs_on_the_raw_value_before_conversion(gl):
    torch = require("torch")
    np = require("numpy")
    module = make_attention(gl, torch)
    seen_types = []

    def cls_row(attn):
        seen_types.append(type(attn))
        return attn[:, 0]

    gl.configure(transform=cls_row)
    x = torch.randn(2, 5, 3)
    module(x)
    stored = gl.cache[type(module).forward.__qualname__][0]
    assert seen_types == [torch.Tensor]
    assert isinstance(stored, np.ndarray) and stored.shape == (2, 5)
    np.testing.assert_allclose(stored.sum(-1), np.ones(2), rtol=1e-6)


def test_transform_per_key(gl):
    @gl("a")
    def f(x):
        a = x
        return a

    @gl("b")
    def g(x):
        b = x
        return b

    gl.configure(transform={f.__qualname__: lambda v: v * 10})
    f(1)
    g(1)
    assert gl.cache == {f.__qualname__: [10], g.__qualname__: [1]}


def test_keep_last_bounds_each_key(gl):
    @gl("a", "b")
    def f(x):
        a, b = x, -x
        return a

    gl.configure(keep_last=3)
    for i in range(10):
        f(i)
    key = f.__qualname__
    assert gl.cache == {key + ".a": [7, 8, 9], key + ".b": [-7, -8, -9]}


def test_failing_transform_records_nothing_and_warns(gl):
    from visualizer import CaptureWarning

    @gl("a", "b")
    def f(x):
        a, b = x, x
        return a

    def picky(v):
        if v < 0:
            raise ValueError("negative")
        return v

    gl.configure(transform=picky)
    with pytest.warns(CaptureWarning, match="negative"):
        assert f(-1) == -1
    f(2)
    key = f.__qualname__
    assert gl.cache == {key + ".a": [2], key + ".b": [2]}


@pytest.mark.parametrize("kwargs, error, pattern", [
    ({"store": "cpu"}, ValueError, "store must be one of"),
    ({"transform": 3}, TypeError, "transform must be a callable"),
    ({"transform": {"k": 3}}, TypeError, r"transform\['k'\] must be callable"),
    ({"keep_last": 0}, ValueError, "keep_last must be a positive integer"),
    ({"keep_last": True}, ValueError, "keep_last must be a positive integer"),
])
def test_bad_storage_options_change_nothing(gl, kwargs, error, pattern):
    before = gl.configure()
    with pytest.raises(error, match=pattern):
        gl.configure(**kwargs)
    with pytest.raises(error, match=pattern):
        with gl.capture(**kwargs):
            pass
    assert gl.configure() == before


def test_configure_returns_previous_settings(gl):
    gl.configure(store="tensor", keep_last=2)
    assert gl.configure() == {"store": "tensor", "transform": None, "keep_last": 2,
                              "queries": None, "heads": None}


# -- the capture scope ------------------------------------------------------------

def test_capture_scope_collects_and_restores_even_on_error():
    from visualizer._get_local import GetLocal
    instance = GetLocal()

    @instance("y")
    def f(x):
        y = x + 1
        return y

    instance.activate()
    f(0)
    outer = instance.cache
    instance.deactivate()
    with instance.capture(transform=lambda v: v * 100) as cache:
        assert instance.active
        f(1)
    assert cache == {f.__qualname__: [200]}
    assert not instance.active and instance.cache is outer and outer == {f.__qualname__: [1]}
    with pytest.raises(KeyError):
        with instance.capture(keep_last=1) as cache:
            f(2)
            raise KeyError("body failed")
    assert cache == {f.__qualname__: [3]}
    assert not instance.active and instance.cache is outer
    assert instance.configure() == {"store": "numpy", "transform": None, "keep_last": None,
                                    "queries": None, "heads": None}
    f(5)
    assert outer == {f.__qualname__: [1]}


def test_nested_capture_scopes(gl):
    @gl("y")
    def f(x):
        y = x
        return y

    with gl.capture() as a:
        f(1)
        with gl.capture(store="none") as b:
            f(2)
        f(3)
    assert a == {f.__qualname__: [1, 3]} and b == {}
    assert gl.active


# -- by module ---------------------------------------------------------------------

def test_by_module_names_each_capture(gl):
    torch = require("torch")

    class Attention(torch.nn.Module):
        @gl("attn")
        def forward(self, x):
            attn = x * 2
            return attn

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

        def forward(self, x):
            return self.attn(x)

    model = torch.nn.Module()
    model.blocks = torch.nn.Sequential(Block(), Block())
    other = Block()
    x = torch.ones(1)
    model.blocks(x)
    other(x)
    model.blocks(x + 1)
    grouped = gl.by_module(model)
    assert sorted(grouped) == ["blocks.0.attn", "blocks.1.attn"]
    assert [v.tolist() for v in grouped["blocks.0.attn"]] == [[2.0], [4.0]]
    assert gl.by_module(other) == {"attn": [gl.cache[Attention.forward.__qualname__][2]]}
    with gl.capture() as scoped:
        model.blocks[1](x)
    assert list(gl.by_module(model, scoped)) == ["blocks.1.attn"]
    gl.cache[Attention.forward.__qualname__].pop()
    with pytest.raises(ValueError, match="changed by hand"):
        gl.by_module(model)
    with pytest.raises(TypeError, match="named_modules"):
        gl.by_module(object())
    with pytest.raises(TypeError, match="module record"):
        gl.by_module(model, {"k": []})


def test_meta_tensors_are_kept_without_a_warning(gl, no_warnings):
    torch = require("torch")

    @gl("t")
    def f():
        t = torch.empty(2, 3, device="meta")
        return 0

    f()
    stored = gl.cache[f.__qualname__][0]
    assert isinstance(stored, torch.Tensor) and stored.device.type == "meta"
    assert stored.shape == (2, 3)
