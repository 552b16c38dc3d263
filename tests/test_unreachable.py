"""Attention run where capture cannot reach warns at the end of capture(), with cause and fix.

Real torch objects: a scripted and a traced module, an exported program, custom operators
(one whose kernel is opaque, one written in Python that calls the seam), and xformers as a
module in ``sys.modules`` (not installed here: its door is the module attribute, so a module
object with that function is the real thing for visualizer).
"""
import sys
import types
import warnings

import pytest

from conftest import require
from visualizer import CaptureWarning


def attention_module(torch, kernel=None):
    F = torch.nn.functional

    class Attn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)
            return out.transpose(1, 2).reshape(1, -1, 8)

    class Kernel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

        def forward(self, x):
            q, k, v = self.qkv(x).reshape(1, -1, 3, 2, 4).permute(2, 0, 3, 1, 4).unbind(0)
            return kernel(q, k, v).transpose(1, 2).reshape(1, -1, 8)

    torch.manual_seed(0)
    return (Attn() if kernel is None else Kernel()).eval()


def run(seam, torch, model, x):
    """(output without capture, output with, cache, CaptureWarning messages)."""
    with torch.no_grad():
        plain = model(x)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            with seam.capture() as cache:
                out = model(x)
    return plain, out, cache, [str(w.message) for w in seen if w.category is CaptureWarning]


def doors(torch):
    import torch.fx.graph_module as fx
    return (torch.jit.ScriptModule.__dict__.get("__call__"), fx._WrappedCall.__call__,
            torch._ops.OpOverload.__call__, torch._ops.OpOverloadPacket.__call__)


def test_torchscript_and_exported_programs_warn_with_the_fix(seam):
    torch = require("torch")
    model, x = attention_module(torch), torch.randn(1, 5, 8)
    before = doors(torch)
    plain, out, cache, said = run(seam, torch, model, x)
    assert torch.equal(out, plain) and len(cache[type(model).forward.__qualname__]) == 1
    assert said == []  # the eager model: captured, nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of TorchScript
        scripted, traced = torch.jit.script(model), torch.jit.trace(model, x)
    exported = torch.export.export(model, (x,)).module()
    for compiled, cause, fix in ((scripted, "TorchScript", "capture from the eager model"),
                                 (traced, "TorchScript", "before torch.jit.script/trace"),
                                 (exported, "an exported program or fx graph", "the eager model you exported")):
        plain, out, cache, said = run(seam, torch, compiled, x)
        assert torch.equal(out, plain) and not any(cache.values())
        assert len(said) == 1 and "no attention captured from {} (1 call)".format(cause) in \
            said[0] and fix in said[0], said
    assert doors(torch) == before  # off: torch's own doors again


def test_a_scripted_module_without_attention_says_nothing(seam):
    torch = require("torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's deprecation of TorchScript
        mlp = torch.jit.script(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()))
    assert run(seam, torch, mlp, torch.randn(2, 4))[3] == []


def test_an_opaque_custom_operator_warns_a_python_one_is_captured(seam):
    torch = require("torch")
    lib = torch.library.Library("visualizer_test_ops", "FRAGMENT")  # noqa: F841 (keeps it)
    lib.define("opaque_attention(Tensor q, Tensor k, Tensor v) -> Tensor")
    lib.impl("opaque_attention",
             lambda q, k, v: torch._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0], "CPU")
    F = torch.nn.functional

    @torch.library.custom_op("visualizer_test_ops::python_attention", mutates_args=())
    def python_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    x = torch.randn(1, 5, 8)
    model = attention_module(torch, torch.ops.visualizer_test_ops.opaque_attention)
    plain, out, cache, said = run(seam, torch, model, x)
    assert torch.equal(out, plain) and not any(cache.values())
    assert len(said) == 1 and "custom operator visualizer_test_ops::opaque_attention (1 call)" \
        in said[0] and "F.scaled_dot_product_attention" in said[0], said

    model = attention_module(torch, python_attention)
    plain, out, cache, said = run(seam, torch, model, x)
    assert torch.equal(out, plain) and [len(v) for v in cache.values()] == [1]
    assert said == []


def test_xformers_calls_are_counted_without_importing_it(seam, monkeypatch):
    torch = require("torch")
    assert "xformers" not in sys.modules or pytest.skip("xformers is installed: a real test")
    calls = []

    def memory_efficient_attention(q, k, v, attn_bias=None):
        calls.append(1)  # xformers' layout: (batch, tokens, heads, dim)
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    xformers, ops = types.ModuleType("xformers"), types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention
    xformers.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", xformers)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)

    def kernel(q, k, v):  # how a model calls it: through the module, at run time
        return sys.modules["xformers.ops"].memory_efficient_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)

    plain, out, cache, said = run(seam, torch, attention_module(torch, kernel),
                                  torch.randn(1, 5, 8))
    assert torch.equal(out, plain) and len(calls) == 2
    assert len(said) == 1 and "xformers (1 call)" in said[0] and "sdpa" in said[0], said
    assert ops.memory_efficient_attention is memory_efficient_attention  # off: its own again
