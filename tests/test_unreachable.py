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


def tiny_llama(transformers, implementation):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    return transformers.LlamaForCausalLM._from_config(
        config, attn_implementation=implementation).eval()


def test_transformers_kernels_the_seam_cannot_reach_warn_sdpa_ones_do_not(seam):
    """A kernel registered in transformers' AttentionInterface that computes attention past the
    seam (here ATen's operator called directly, as flash-attn's and hub kernels do) is named at
    the end of capture(); one that calls torch's sdpa is captured and says nothing."""
    torch = require("torch")
    transformers = require("transformers")
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def opaque(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        repeat = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(repeat, 1), value.repeat_interleave(repeat, 1)
        out = torch.ops.aten.scaled_dot_product_attention(query, key, value, is_causal=True,
                                                          scale=scaling)
        return out.transpose(1, 2).contiguous(), None

    def through_sdpa(*args, **kwargs):
        return sdpa_attention_forward(*args, **kwargs)

    AttentionInterface.register("visualizer_test_opaque", opaque)
    AttentionInterface.register("visualizer_test_sdpa", through_sdpa)
    try:
        tokens = torch.tensor([[1, 2, 3, 4, 5]])
        torch.manual_seed(0)
        model = tiny_llama(transformers, "visualizer_test_opaque")
        plain, out, cache, said = run(seam, torch, model, tokens)
        assert torch.equal(out.logits, plain.logits) and not any(cache.values())
        assert len(said) == 1 and "attn_implementation='visualizer_test_opaque' (2 calls)" in \
            said[0] and "attn_implementation='sdpa'" in said[0], said

        model.set_attn_implementation("visualizer_test_sdpa")
        plain, out, cache, said = run(seam, torch, model, tokens)
        assert torch.equal(out.logits, plain.logits) and said == []
        assert sum(len(v) for v in cache.values()) == 2  # one map per layer, at the seam
    finally:
        for key in ("visualizer_test_opaque", "visualizer_test_sdpa"):
            AttentionInterface._global_mapping.pop(key, None)
    assert "visualizer_test_opaque" not in AttentionInterface._global_mapping


def test_flash_attention_where_it_cannot_run_is_refused_by_transformers_with_the_cause():
    """No flash-attn on this machine (CPU): transformers refuses the model when it is built,
    naming the missing package, so nothing runs to be captured in silence."""
    require("torch")
    transformers = require("transformers")
    if any(m in sys.modules or __import__("importlib").util.find_spec(m)
           for m in ("flash_attn", "flash_attn_interface")):
        pytest.skip("flash-attn is installed here: the GPU check in README's flash-attn section")
    for implementation, name in (("flash_attention_2", "FlashAttention2"),
                                 ("flash_attention_3", "FlashAttention3")):
        with pytest.raises(ImportError, match=name + ".*(not|doesn't).*installed"):
            tiny_llama(transformers, implementation)
