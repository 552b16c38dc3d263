"""Captured functions inside torch.compile: correct values or nothing, never a crash."""
import numpy as np

from conftest import require


def test_compiled_model_captures_real_values(gl):
    torch = require("torch")

    class Attention(torch.nn.Module):
        def forward(self, x):
            attn = (x @ x.transpose(-1, -2)).softmax(-1)
            return attn @ x

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = Attention(), Attention()

        def forward(self, x):
            return self.second(self.first(x) * 2)

    gl.watch(Attention.forward, "attn")
    model = Model()
    compiled = torch.compile(model)
    x = torch.randn(2, 4, 3)
    first = (x @ x.transpose(-1, -2)).softmax(-1)
    hidden = (first @ x) * 2
    second = (hidden @ hidden.transpose(-1, -2)).softmax(-1)
    out = compiled(x)
    torch.testing.assert_close(out, second @ hidden)
    maps = gl.cache[Attention.forward.__qualname__]
    assert len(maps) == 2
    np.testing.assert_allclose(maps[0], first.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(maps[1], second.numpy(), rtol=1e-6, atol=1e-7)
    assert getattr(Attention.forward, "_torchdynamo_disable", False)
    gl.deactivate()
    assert not hasattr(Attention.forward, "_torchdynamo_disable")
    torch.testing.assert_close(compiled(x), out)
    assert len(maps) == 2


def test_fullgraph_compile_says_why_it_cannot_and_what_to_do(gl):
    """A known limit: fullgraph=True forbids the graph break capture needs."""
    torch = require("torch")
    import pytest

    class Attention(torch.nn.Module):
        def forward(self, x):
            attn = (x @ x.transpose(-1, -2)).softmax(-1)
            return attn @ x

    gl.watch(Attention.forward, "attn")
    compiled = torch.compile(torch.nn.Sequential(Attention()), backend="eager", fullgraph=True)
    with pytest.raises(Exception) as info:
        compiled(torch.randn(2, 4, 3))
    message = str(info.value)
    assert "get_local is capturing from" in message and "Attention.forward" in message
    assert "get_local.deactivate()" in message and "without fullgraph" in message
    gl.deactivate()  # and without capture, the same call compiles
    torch._dynamo.reset()
    compiled(torch.randn(2, 4, 3))
