"""Flex attention: its probabilities with score_mod and the block mask applied, outputs untouched.

References are independent of visualizer: a softmax written out by hand,
and transformers' ``output_attentions=True`` under eager attention.  Outputs
under capture are compared with ``torch.equal`` to runs without capture.
"""
import math
import sys
import types
import warnings

import pytest

from conftest import require
from visualizer import CaptureWarning


def flex_module():
    """torch's flex attention module, or a skip where this torch has none."""
    require("torch")
    try:
        from torch.nn.attention import flex_attention
    except ImportError:  # torch before 2.5
        pytest.skip("this torch has no flex attention")
    return flex_attention


@pytest.fixture(autouse=True)
def quiet_flex():
    """flex_attention warns, once per process, that it runs unfused without torch.compile."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


KEY = "attention_module.<locals>.FlexAttention.forward"


def relative_bias(score, b, h, q_idx, kv_idx):
    """A score_mod: a bias by relative position and by head (so heads and rows matter)."""
    return score + 0.1 * (q_idx - kv_idx) + 0.05 * h


def causal(b, h, q_idx, kv_idx):
    """A mask_mod: each query sees itself and the keys before it."""
    return q_idx >= kv_idx


def reference(torch, q, k, scale, bias=True, allowed=None):
    """softmax(score_mod(q kᵀ·scale)) over the allowed keys, entry by entry, in float64."""
    batch, heads, length, _ = q.shape
    keys, group = k.shape[-2], heads // k.shape[1]
    out = torch.zeros(batch, heads, length, keys, dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(length):
                row = []
                for j in range(keys):
                    if allowed is not None and not allowed(b, h, i, j):
                        row.append(float("-inf"))
                        continue
                    score = float(q[b, h, i].double() @ k[b, h // group, j].double()) * scale
                    row.append(score + (0.1 * (i - j) + 0.05 * h if bias else 0.0))
                top = max(row)
                if top == float("-inf"):
                    continue  # every key hidden: a row of zeros
                weights = [math.exp(s - top) for s in row]
                total = sum(weights)
                out[b, h, i] = torch.tensor([w / total for w in weights])
    return out.float()


def attention_module(torch, flex, **kwargs):
    """A module (``FlexAttention``) that calls flex attention with fixed keyword arguments."""
    class FlexAttention(torch.nn.Module):
        def forward(self, q, k, v):
            return flex.flex_attention(q, k, v, **kwargs)

    return FlexAttention()


def test_score_mod_and_causal_block_mask_against_a_hand_written_softmax(seam):
    flex = flex_module()
    torch = sys.modules["torch"]
    np = require("numpy")
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 8) for _ in range(3))
    mask = flex.create_block_mask(causal, None, None, 9, 9, device="cpu")
    module = attention_module(torch, flex, score_mod=relative_bias, block_mask=mask, scale=0.3)
    plain = module(q, k, v)
    with seam.capture() as cache:
        out = module(q, k, v)
    assert torch.equal(out, plain)
    assert flex.flex_attention.__module__ == "torch.nn.attention.flex_attention"  # back
    maps = cache[KEY]
    assert len(maps) == 1 and maps[0].shape == (2, 3, 9, 9)
    want = reference(torch, q, k, 0.3, allowed=lambda b, h, i, j: i >= j)
    np.testing.assert_allclose(maps[0], want.numpy(), rtol=1e-5, atol=1e-5)


def test_grouped_query_heads_and_selections_keep_the_real_indices(seam):
    """enable_gqa: query head h reads key head h // group; heads= and queries= pick before."""
    flex = flex_module()
    torch = sys.modules["torch"]
    np = require("numpy")
    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    mask = flex.create_block_mask(causal, None, None, 7, 7, device="cpu")
    module = attention_module(torch, flex, score_mod=relative_bias, block_mask=mask,
                            enable_gqa=True)
    plain = module(q, k, v)
    with seam.capture() as cache:
        out = module(q, k, v)
    with seam.capture(heads=[3, 1], queries=[6, 2]) as picked:
        module(q, k, v)
    assert torch.equal(out, plain)
    want = reference(torch, q, k, 8 ** -0.5, allowed=lambda b, h, i, j: i >= j).numpy()
    np.testing.assert_allclose(cache[KEY][0], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(picked[KEY][0], want[:, [3, 1]][:, :, [6, 2]],
                               rtol=1e-5, atol=1e-5)


def test_lse_and_aux_are_returned_as_torch_returns_them(seam):
    flex = flex_module()
    torch = sys.modules["torch"]
    np = require("numpy")
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    extra = {"return_aux": flex.AuxRequest(lse=True)} if hasattr(flex, "AuxRequest") else \
        {"return_lse": True}
    plain, plain_aux = flex.flex_attention(q, k, v, score_mod=relative_bias, **extra)
    with seam.capture() as cache:
        out, aux = flex.flex_attention(q, k, v, score_mod=relative_bias, **extra)
    assert torch.equal(out, plain)
    lse, plain_lse = getattr(aux, "lse", aux), getattr(plain_aux, "lse", plain_aux)
    assert torch.equal(lse, plain_lse) and type(aux) is type(plain_aux)
    # Called outside any module: captured under the function's own name.
    np.testing.assert_allclose(cache["flex_attention"][0], reference(torch, q, k, 0.5).numpy(),
                               rtol=1e-5, atol=1e-5)


def test_rows_whose_keys_are_all_hidden_are_zeros(seam):
    flex = flex_module()
    torch = sys.modules["torch"]
    np = require("numpy")
    torch.manual_seed(3)
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    real = torch.tensor([1, 1, 1, 1, 0, 0], dtype=torch.bool)

    def padding(b, h, q_idx, kv_idx):  # padded queries see nothing
        return real[q_idx] & real[kv_idx]

    mask = flex.create_block_mask(padding, None, None, 6, 6, device="cpu")
    with seam.capture() as cache:
        flex.flex_attention(q, k, v, block_mask=mask)
    want = reference(torch, q, k, 0.5, bias=False, allowed=lambda b, h, i, j: i < 4 and j < 4)
    got = cache["flex_attention"][0]
    assert not np.asarray(got)[:, :, 4:].any()
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def test_a_compiled_flex_attention_kept_as_a_global_is_captured(seam):
    """``flex_compiled = torch.compile(flex_attention)`` at import (torchtune, gpt-fast)."""
    flex = flex_module()
    torch = sys.modules["torch"]
    np = require("numpy")
    torch.manual_seed(4)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    library = types.ModuleType("flex_user_library")
    library.flex_compiled = compiled = torch.compile(flex.flex_attention, backend="eager")
    sys.modules[library.__name__] = library
    try:
        plain = library.flex_compiled(q, k, v, score_mod=relative_bias)
        with seam.capture() as cache:
            out = library.flex_compiled(q, k, v, score_mod=relative_bias)
        assert library.flex_compiled is compiled  # torch's own object again
    finally:
        del sys.modules[library.__name__]
    assert torch.equal(out, plain)
    np.testing.assert_allclose(cache["flex_attention"][0], reference(torch, q, k, 0.5).numpy(),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_inside_a_compiled_graph_flex_attention_is_captured(seam, backend):
    """The graph computes the maps beside the kernel; the compiled output is unchanged."""
    flex = flex_module()
    torch = sys.modules["torch"]
    np = require("numpy")
    torch.manual_seed(5)
    q, k, v = (torch.randn(1, 2, 5, 4) for _ in range(3))
    block_mask = flex.create_block_mask(causal, 1, 2, 5, 5, device="cpu")
    compiled = torch.compile(attention_module(torch, flex, score_mod=relative_bias,
                                              block_mask=block_mask),
                             backend=backend, fullgraph=True)
    plain = compiled(q, k, v)
    with seam.capture() as cache:
        out = compiled(q, k, v)
    assert torch.equal(out, plain)
    (got,) = cache[KEY]
    want = reference(torch, q, k, 0.5, allowed=lambda b, h, i, j: i >= j)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)


def tiny_llama(transformers):
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert(transformers):
    config = transformers.BertConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                     num_hidden_layers=2, num_attention_heads=4,
                                     max_position_embeddings=64)
    return transformers.BertModel(config, add_pooling_layer=False).eval()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("build, key, padded_rows", [
    (tiny_llama, "LlamaAttention.forward", slice(2, None)),  # left padding: real query rows
    (tiny_bert, "BertSelfAttention.forward", slice(None)),   # right padding: keys hidden
], ids=["llama (grouped-query heads, left padding)", "bert (right padding)"])
def test_transformers_flex_attention_maps_equal_eager_attentions(seam, build, key, padded_rows,
                                                                 compiled):
    """attn_implementation='flex_attention' runs a torch.compile'd flex attention: captured.

    Under ``torch.compile(model)`` dynamo traces transformers' flex call: the
    maps of the eager model, from the compiled graph.
    """
    flex_module()
    torch = sys.modules["torch"]
    transformers = require("transformers")
    np = require("numpy")
    torch.manual_seed(7 if compiled else 6)
    model = build(transformers)
    if not getattr(model, "_supports_flex_attn", False):
        pytest.skip("this transformers has no flex attention for {}".format(type(model).__name__))
    ids = torch.tensor([[1, 5, 7, 9, 11, 4], [0, 0, 5, 8, 3, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    if build is tiny_bert:
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    model.set_attn_implementation("flex_attention")
    run = torch.compile(model, backend="aot_eager") if compiled else model
    with torch.no_grad():
        plain = run(input_ids=ids, attention_mask=mask)[0]
        with seam.capture() as cache:
            out = run(input_ids=ids, attention_mask=mask)[0]
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
    assert torch.equal(out, plain)
    maps = cache[key]
    assert len(maps) == 2
    for got, want in zip(maps, eager):
        want = want.numpy()
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got[1, :, padded_rows], want[1, :, padded_rows], rtol=1e-5,
                                   atol=1e-5)
    assert list(seam.by_module(model, cache))[0].endswith("layers.0.self_attn") or \
        list(seam.by_module(model, cache))[0] == "encoder.layer.0.attention.self"
