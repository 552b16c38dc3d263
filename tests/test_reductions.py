"""Reductions at compute time (``reduce=``): each equals reducing the full maps.

References are independent of visualizer: a softmax written out by hand,
transformers' ``output_attentions=True`` under eager attention, timm's
forward hooks with the fused path off, and attention rollout written out in
NumPy from those maps.
"""
import math

import pytest

from conftest import require
from visualizer import VisualizerError
from visualizer.integrations import kernel


def softmax_reference(torch, q, k, mask=None, causal=False):
    """softmax(q kᵀ/√d + mask), in float64, heads of k repeated for grouped queries."""
    if k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    scores = torch.einsum("...ld,...sd->...ls", q.double(), k.double()) / math.sqrt(q.shape[-1])
    if causal:
        L, S = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(L, S, dtype=torch.bool).triu(1), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool \
            else scores + mask.double()
    return torch.softmax(scores, -1).nan_to_num(0.0)


def rollout_reference(np, layers):
    """Abnar & Zuidema: per sample, R = Â_l ... Â_1, Â = rownorm(0.5 mean_h A + 0.5 I)."""
    out, result = [], None
    for layer in layers:  # (B, H, T, T)
        fused = 0.5 * layer.mean(1) + 0.5 * np.eye(layer.shape[-1])
        fused = fused / fused.sum(-1, keepdims=True)
        result = fused if result is None else fused @ result
        out.append(result)
    return out


def only(cache):
    """The values of the one key in ``cache``."""
    assert len(cache) == 1, list(cache)
    return next(iter(cache.values()))


def attention_module(torch, **kwargs):
    class Attn(torch.nn.Module):
        def forward(self, q, k, v):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kwargs)

    return Attn()


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "bool mask, a fully masked row": dict(mask=True),
    "grouped-query heads": dict(kv_heads=2, enable_gqa=True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("selection", [{}, {"queries": -1}, {"queries": slice(1, 6)},
                                       {"heads": [0, 3]}, {"queries": [0, 4], "heads": 1}])
def test_head_mean_and_received_equal_the_reduced_full_maps(seam, monkeypatch, case, selection):
    torch = require("torch")
    spec = dict(CASES[case])
    kv_heads, with_mask = spec.pop("kv_heads", 4), spec.pop("mask", False)
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 7, 8), torch.randn(2, kv_heads, 7, 8), torch.randn(2, kv_heads, 7, 8)
    mask = None
    if with_mask:
        mask = torch.rand(2, 1, 7, 7) > 0.4
        mask[..., 0] = True
        mask[1, 0, 3] = False  # a row that attends to nothing: zeros, as in the kernel
        spec["attn_mask"] = mask
    module = attention_module(torch, **spec)
    monkeypatch.setattr(kernel, "ROWS_PER_CHUNK", 2)  # several blocks of rows on 7 queries
    full = softmax_reference(torch, q, k, mask, spec.get("is_causal", False))
    rows = selection.get("queries", slice(None))
    rows = [rows] if isinstance(rows, int) else rows
    heads = selection.get("heads", slice(None))
    heads = [heads] if isinstance(heads, int) else heads
    picked = full[:, heads][:, :, rows]
    for reduce, expected in (("head_mean", picked.mean(1)), ("received", picked.sum(2))):
        with seam.capture(reduce=reduce, **selection) as cache:
            module(q, k, v)
        (got,) = only(cache)
        assert got.shape == tuple(expected.shape), reduce
        torch.testing.assert_close(torch.from_numpy(got).double(), expected,
                                   rtol=1e-5, atol=1e-6)


def test_the_full_matrix_never_exists_at_once(seam, monkeypatch):
    """Every tensor made while capturing a reduction is smaller than one layer's maps."""
    torch = require("torch")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    Largest.largest = max(Largest.largest, t.numel())
            return out

    module = attention_module(torch, is_causal=True)
    q, k, v = (torch.randn(1, 4, 64, 8) for _ in range(3))
    monkeypatch.setattr(kernel, "ROWS_PER_CHUNK", 8)
    full = 4 * 64 * 64
    for reduce, queries in (("head_mean", -1), ("received", None), ("head_mean", None)):
        Largest.largest = 0
        with seam.capture(reduce=reduce, queries=queries) as cache, Largest():
            module(q, k, v)
        assert only(cache), reduce
        assert Largest.largest <= full // 4, (reduce, Largest.largest)
    Largest.largest = 0
    with seam.capture() as cache, Largest():  # the same probe sees the full maps
        module(q, k, v)
    assert Largest.largest >= full


def tiny_llama(transformers, torch, layers=3):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def eager_attentions(model, **inputs):
    model.set_attn_implementation("eager")
    try:
        out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    return [a.double().numpy() for a in out.attentions]


def test_llama_reductions_and_rollout_equal_transformers_eager_maps(seam, monkeypatch):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    model = tiny_llama(transformers, torch)
    ids = torch.tensor([[1, 5, 7, 9, 11, 13, 2, 4, 6], [3, 5, 8, 2, 9, 1, 7, 7, 2]])
    monkeypatch.setattr(kernel, "ROWS_PER_CHUNK", 4)
    with torch.no_grad():
        plain = model(input_ids=ids).logits
        layers = eager_attentions(model, input_ids=ids)
        results = {}
        for reduce, queries in (("head_mean", None), ("received", None), ("rollout", None),
                                ("rollout", 0), ("head_mean", -1)):
            with seam.capture(reduce=reduce, queries=queries) as cache:
                logits = model(input_ids=ids).logits
            assert torch.equal(logits, plain)
            results[reduce, queries] = cache["LlamaAttention.forward"]
    rollout = rollout_reference(np, layers)
    expected = {
        ("head_mean", None): [a.mean(1) for a in layers],
        ("received", None): [a.sum(2) for a in layers],
        ("rollout", None): rollout,
        ("rollout", 0): [r[:, :1] for r in rollout],
        ("head_mean", -1): [a.mean(1)[:, -1:] for a in layers],
    }
    for case, want in expected.items():
        got = results[case]
        assert [g.shape for g in got] == [w.shape for w in want], case
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=str(case))
    for r in results["rollout", None]:
        np.testing.assert_allclose(r.sum(-1), 1.0, rtol=1e-5)


def test_rollout_starts_again_with_each_forward(seam):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    model = tiny_llama(transformers, torch, layers=2)
    first, second = torch.tensor([[1, 2, 3, 4, 5]]), torch.tensor([[9, 8, 7, 6, 5, 4]])
    with torch.no_grad():
        want = rollout_reference(np, eager_attentions(model, input_ids=first)) + \
            rollout_reference(np, eager_attentions(model, input_ids=first)) + \
            rollout_reference(np, eager_attentions(model, input_ids=second))
        with seam.capture(reduce="rollout") as cache:
            model(input_ids=first)
            model(input_ids=first)   # the same modules again: a new forward
            model(input_ids=second)  # another length: a new forward
    got = cache["LlamaAttention.forward"]
    assert len(got) == 6
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_rollout_of_decoding_steps_says_why_it_cannot(seam):
    torch = require("torch")
    module = attention_module(torch)
    q, k = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 5, 4)
    with pytest.warns(Warning, match="rollout.*1 queries against 5 keys"):
        with seam.capture(reduce="rollout") as cache:
            module(q, k, k)
    assert not any(cache.values())


def test_timm_eager_captures_are_reduced_after(seam):
    """The preset's target takes the full maps (eager path), then reduces them."""
    torch = require("torch")
    timm = require("timm")
    np = require("numpy")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2,
                              img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    maps = []
    hooks = [blk.attn.attn_drop.register_forward_hook(
        lambda m, i, o: maps.append(o.double().numpy())) for blk in model.blocks]
    for blk in model.blocks:
        blk.attn.fused_attn = False
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for blk in model.blocks:
        blk.attn.fused_attn = True
    with torch.no_grad():
        for reduce, queries, want in (
                ("head_mean", 0, [m.mean(1)[:, :1] for m in maps]),
                ("received", None, [m.sum(2) for m in maps]),
                ("rollout", 0, [r[:, :1] for r in rollout_reference(np, maps)])):
            with seam.capture(reduce=reduce, queries=queries) as cache:
                model(x)
            got = cache["Attention.forward"]
            assert [g.shape for g in got] == [w.shape for w in want], reduce
            for g, w in zip(got, want):
                np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=reduce)


def test_bad_reduce_is_refused_with_the_choices(gl):
    with pytest.raises(VisualizerError, match="reduce must be None or one of 'head_mean'"):
        gl.configure(reduce="mean")
    with pytest.raises(VisualizerError, match="rollout"):
        with gl.capture(reduce="max"):
            pass
