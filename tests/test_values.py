"""What the cache keeps: torch tensors as detached CPU NumPy arrays, the rest as is."""
import pytest

from conftest import require
from visualizer._values import is_tensor, to_numpy


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
