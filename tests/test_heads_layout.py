"""One layout for every attention map: ``(batch, heads, queries, keys)``, whatever the model's code does.

Several transformers models compute their softmax with the heads merged into
the batch axis, ``(batch x heads, queries, keys)``, and split it only for
``output_attentions``.  Each is built tiny from a configuration (no download),
run on a batch of 2 with a padded row under ``watch_attention()``, and every
map ``output_attentions=True`` returns must equal a captured map of its own
shape.  Then the pieces: the core applies a preset's ``shape`` and knows no
library; the integration splits by the module's head count or warns; the
kernel seam splits a call made with merged heads.
"""
import warnings

import numpy as np
import pytest

from conftest import require
from visualizer import CaptureWarning
from visualizer._get_local import GetLocal

BATCH, SEQ, DEC_SEQ, HEADS = 2, 9, 5, 4


def _text(transformers, config_name, **settings):
    common = dict(d_model=32, encoder_layers=2, decoder_layers=2,
                  encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                  encoder_ffn_dim=37, decoder_ffn_dim=37, max_position_embeddings=64)
    common.update(settings)
    return getattr(transformers, config_name)(**common)


def _fsmt(transformers):
    return _text(transformers, "FSMTConfig", langs=["en", "de"], src_vocab_size=99,
                 tgt_vocab_size=99), "text+decoder"


def _mvp(transformers):
    return _text(transformers, "MvpConfig", vocab_size=99), "text+decoder"


def _xglm(transformers):
    return transformers.XGLMConfig(vocab_size=99, d_model=32, num_layers=2, attention_heads=HEADS,
                                   ffn_dim=37, max_position_embeddings=64), "text"


def _table_transformer(transformers):
    backbone = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                         out_features=["stage2"])
    return transformers.TableTransformerConfig(
        use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone,
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=HEADS,
        decoder_attention_heads=HEADS, encoder_ffn_dim=37, decoder_ffn_dim=37,
        num_queries=5), "image+mask"


def _vitdet(transformers):
    # layer 0 windowed: (batch x windows, heads, window, window), as the library returns it
    return transformers.VitDetConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=HEADS, mlp_ratio=2,
        image_size=32, pretrain_image_size=32, patch_size=8, window_size=2,
        window_block_indices=[0], use_relative_position_embeddings=True), "image"


def _mask2former(transformers):
    backbone = transformers.SwinConfig(
        image_size=32, patch_size=2, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2],
        window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"])
    return transformers.Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, feature_size=32,
        mask_feature_size=32, hidden_dim=32, encoder_feedforward_dim=37, dim_feedforward=37,
        encoder_layers=1, decoder_layers=3, num_attention_heads=HEADS,
        num_queries=5), "image+mask"


# The model types whose attention class stores (batch x heads, queries, keys), and that class.
MERGED = {"fsmt": (_fsmt, "Attention.forward"),
          "mvp": (_mvp, "MvpAttention.forward"),
          "xglm": (_xglm, "XGLMAttention.forward"),
          "table-transformer": (_table_transformer, "TableTransformerAttention.forward"),
          "vitdet": (_vitdet, "VitDetAttention.forward"),
          "mask2former": (_mask2former, "Mask2FormerAttention.forward")}


def _inputs(torch, kind):
    generator = torch.Generator().manual_seed(0)
    if kind.startswith("text"):
        ids = torch.randint(4, 99, (BATCH, SEQ), generator=generator)
        mask = torch.ones(BATCH, SEQ, dtype=torch.long)
        mask[1, 6:] = 0  # right padding
        # no cache: transformers 4.57's FSMT builds one from a config its decoder lacks
        inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if kind.endswith("decoder"):
            inputs["decoder_input_ids"] = torch.randint(4, 99, (BATCH, DEC_SEQ), generator=generator)
        return inputs
    inputs = {"pixel_values": torch.randn(BATCH, 3, 32, 32, generator=generator)}
    if kind.endswith("mask"):
        mask = torch.ones(BATCH, 32, 32, dtype=torch.long)
        mask[1, :, 24:] = 0  # the second image padded on the right
        inputs["pixel_mask"] = mask
    return inputs


def _attention_maps(output):
    """Every map under an output field named like attentions, in order."""
    import torch

    maps = []

    def walk(value):
        if isinstance(value, torch.Tensor):
            maps.append(value.detach().numpy())
        elif isinstance(value, (tuple, list)):
            for item in value:
                walk(item)

    for name, value in output.items():
        if "attentions" in name:
            walk(value)
    return maps


def _run(family):
    """``(model, inputs, reference maps, cache)``: one capture and ``output_attentions`` under eager."""
    torch = require("torch")
    transformers = require("transformers")
    make, _ = MERGED[family]
    config, kind = make(transformers)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation="eager").eval()
    inputs = _inputs(torch, kind)
    get_local = GetLocal()
    get_local.watch_attention()
    try:
        with torch.no_grad():
            with get_local.capture() as cache:
                model(**inputs)
            reference = _attention_maps(model(**inputs, output_attentions=True))
    finally:
        get_local.unwatch_attention()
    return model, inputs, reference, cache, get_local


def _each_equals_a_capture(reference, captured, what):
    """Each reference map equals a distinct captured map of its own shape (1e-5)."""
    left = list(captured)
    for want in reference:
        for i, got in enumerate(left):
            if got.shape == want.shape and np.allclose(got, want, rtol=0, atol=1e-5):
                del left[i]
                break
        else:
            raise AssertionError("{}: no captured map equals the reference {}; captured: {}".format(
                what, want.shape, [m.shape for m in captured]))


@pytest.mark.parametrize("family", sorted(MERGED))
def test_maps_have_the_layout_and_values_of_output_attentions(family):
    _, _, reference, cache, _ = _run(family)
    key = MERGED[family][1]
    assert reference and key in cache, sorted(cache)
    for got in cache[key]:
        assert got.ndim == 4 and got.shape[1] == HEADS, (key, got.shape)
    _each_equals_a_capture(reference, [m for values in cache.values() for m in values], family)


def test_a_page_shows_the_sample_it_is_asked_for():
    from visualizer import views
    from visualizer.views.pages import _data

    from test_views import page_data

    _, inputs, reference, cache, _ = _run("xglm")
    layers = cache["XGLMAttention.forward"]
    tokens = ["t{}".format(i) for i in range(SEQ)]
    for sample in (0, 1):
        data = page_data(views.model_view(layers, tokens, sample=sample, precision="float32").html)
        shown = _data.decode_maps(data["maps"])
        assert shown.shape == (len(reference), HEADS, SEQ, SEQ)
        np.testing.assert_allclose(shown, np.stack([r[sample] for r in reference]), atol=1e-6)
    # sample 1 is the right-padded row: its last keys get nothing
    assert np.all(shown[..., 6:] == 0) and inputs["attention_mask"][1, 6:].sum() == 0


def test_by_module_and_reductions_see_heads():
    torch = require("torch")
    model, inputs, reference, _, get_local = _run("mvp")
    get_local.watch_attention()
    try:
        with torch.no_grad(), get_local.capture(reduce="head_mean") as cache:
            model(**inputs)
    finally:
        get_local.unwatch_attention()
    modules = get_local.by_module(model, cache)
    assert len(modules) == 6  # 2 encoder self, 2 decoder self, 2 cross attention modules
    means = [m for values in modules.values() for m in values]
    assert all(m.ndim == 3 and m.shape[0] == BATCH for m in means)  # (batch, queries, keys)
    _each_equals_a_capture([r.mean(1) for r in reference], means, "head means")


# -- the pieces ---------------------------------------------------------------------------


class _Module:
    def __init__(self, **attributes):
        self.__dict__.update(attributes)

    def forward(self, scores):
        bsz = scores.shape[0] // getattr(self, "num_heads", 1)
        probs = scores / scores.sum(-1, keepdims=True)
        return probs, bsz


def test_the_core_applies_a_presets_shape_before_events_and_storage():
    get_local = GetLocal()
    seen = []
    get_local.events.listen(None, lambda event: seen.append(event.value.shape))

    def shape(value, source, frame):  # what an integration gives: it may read the frame
        return value.reshape((frame.f_locals["bsz"], source.num_heads) + value.shape[1:])

    get_local._watch(_Module.forward, ("probs",), explicit=False, attention=True, shape=shape)
    with get_local.capture(heads=0) as cache:
        _Module(num_heads=2).forward(np.ones((4, 3, 3)))
    assert seen == [(2, 2, 3, 3)]
    assert cache["_Module.forward"][0].shape == (2, 1, 3, 3)  # heads= picked a head, not a sample
    get_local.watch(_Module.forward, "probs")  # the user names it: the code's own layout
    with get_local.capture() as cache:
        _Module(num_heads=2).forward(np.ones((4, 3, 3)))
    assert cache["_Module.forward"][0].shape == (4, 3, 3)
    get_local.unwatch(_Module.forward)


def test_a_preset_splits_by_head_count_and_batch_or_warns_once():
    from visualizer.integrations import heads_apart, split_heads

    maps = np.arange(8 * 2 * 3, dtype=np.float32).reshape(8, 2, 3)
    split = split_heads(maps, 4, 2)
    assert split.shape == (2, 4, 2, 3) and np.array_equal(split[1, 0], maps[4])
    assert split_heads(maps, 4, 8).shape == (8, 1, 2, 3)  # one head of a loop over heads
    assert split_heads(maps, 4, 3) is None and split_heads(maps, None, 2) is None
    assert split_heads(maps[0], 4, 2).shape == (2, 3)  # not 3-D: as it is

    class Frame:
        def __init__(self, **local):
            self.f_locals = local

    def shape(function):
        return heads_apart(function, ("bsz",))

    for attribute in ("num_heads", "num_attention_heads", "n_heads", "n_head"):
        got = shape(_Module.forward)(maps, _Module(**{attribute: 4}), Frame(bsz=2))
        assert got.shape == (2, 4, 2, 3)

    def a():
        pass

    with pytest.warns(CaptureWarning, match=r"a computes its attention as \(8, 2, 3\).*"
                                            r"\(_Module heads: None\)"):
        assert shape(a)(maps, _Module(heads=[1, 2]), Frame(bsz=2)) is maps
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shape(a)(maps, _Module(), Frame(bsz=2))  # once per function

    def b():
        pass

    with pytest.warns(CaptureWarning, match=r"_Module heads: 4"):
        shape(b)(maps, _Module(num_heads=4), None)  # no frame: no batch size


def test_the_seam_splits_a_call_with_merged_heads():
    torch = require("torch")
    F = torch.nn.functional

    class Merged(torch.nn.Module):  # timm's SAM ViT calls the kernel so
        num_heads = 4

        def forward(self, q, k, v, mask=None):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = (torch.randn(BATCH * HEADS, 5, 8, generator=torch.Generator().manual_seed(i))
               for i in range(3))
    mask = torch.zeros(BATCH * HEADS, 5, 5)
    mask[HEADS:, :, 3:] = float("-inf")  # the second sample's last keys
    get_local = GetLocal()
    get_local.watch_attention(["kernel"])
    try:
        with get_local.capture() as cache:
            Merged()(q, k, v, mask)
        with get_local.capture(heads=[1, 2]) as picked:
            Merged()(q, k, v, mask)
    finally:
        get_local.unwatch_attention()
    want = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5 + mask, -1).reshape(BATCH, HEADS, 5, 5)
    [key] = cache
    assert key.endswith("Merged.forward")
    [got] = cache[key]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-6)
    np.testing.assert_allclose(picked[key][0], want[:, 1:3].numpy(), atol=1e-6)


def test_the_seam_keeps_a_call_it_cannot_split_and_says_so():
    torch = require("torch")
    F = torch.nn.functional

    class Headless(torch.nn.Module):
        def forward(self, q):
            return F.scaled_dot_product_attention(q, q, q)

    q = torch.randn(6, 5, 8)
    get_local = GetLocal()
    get_local.watch_attention(["kernel"])
    try:
        with pytest.warns(CaptureWarning, match=r"Headless\.forward computes its attention as "
                                                r"\(6, 5, 5\).*\(Headless heads: None\)"):
            with get_local.capture() as cache:
                Headless()(q)
    finally:
        get_local.unwatch_attention()
    [maps] = cache.values()
    assert maps[0].shape == (6, 5, 5)
