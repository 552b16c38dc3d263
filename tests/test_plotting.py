"""Plotting: figure content (panels, pixels, labels, overlay peaks), rollout and model input.

Real matplotlib on the Agg backend and real numpy; timm and torch where the
test says so.  Figures are checked through what they hold (``ax.images``,
``ax.patches``, tick labels), not only by running.
"""
import os
import subprocess
import sys

import pytest

from conftest import ROOT, require

try:
    matplotlib = require("matplotlib")
    np = require("numpy")
    require("PIL")
except pytest.skip.Exception as exc:  # require() skips per test; here the whole module goes
    pytest.skip(str(exc), allow_module_level=True)

matplotlib.use("Agg")

from matplotlib.patches import Rectangle  # noqa: E402

from visualizer._errors import VisualizerError, VisualizerTypeError, VisualizerValueError  # noqa: E402
from visualizer.plotting import (  # noqa: E402
    attention_rollout,
    model_input_image,
    plot_head,
    plot_heads,
    plot_highlighted_patches,
    plot_query_on_image,
    plot_rollout_on_image,
    plot_token_attention,
    save_figure,
)


def softmax_attention(heads, n, seed=0, batch=None):
    """Random row-stochastic attention of shape (heads, n, n) or (batch, heads, n, n)."""
    rng = np.random.default_rng(seed)
    shape = (heads, n, n) if batch is None else (batch, heads, n, n)
    scores = rng.normal(size=shape) * 2
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def panels(fig):
    """The visible axes that hold a heatmap (colorbars hold no AxesImage)."""
    return [ax for ax in fig.axes if ax.get_visible() and ax.images]


def hidden(fig):
    return [ax for ax in fig.axes if not ax.get_visible()]


def photo(seed=0, height=224, width=224):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def grace_hopper():
    from PIL import Image

    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def cls_on_patch(grid, patch, num_prefix_tokens=1, heads=3, cls_self=0.0):
    """Attention whose CLS row puts (1 - cls_self) on one patch and cls_self on itself."""
    rows, cols = grid
    n = num_prefix_tokens + rows * cols
    attn = np.full((heads, n, n), 1.0 / n)
    attn[:, 0, :] = 0.0
    attn[:, 0, 0] = cls_self
    attn[:, 0, num_prefix_tokens + patch] = 1.0 - cls_self
    return attn


def peak_box(heat):
    """The bounding box (y0, y1, x0, x1), exclusive ends, of the pixels at the maximum."""
    ys, xs = np.nonzero(heat == heat.max())
    return ys.min(), ys.max() + 1, xs.min(), xs.max() + 1


# --------------------------------------------------------------------------- heads


def test_plot_head_shows_the_chosen_head_with_a_colorbar():
    attn = softmax_attention(4, 7)
    fig = plot_head(attn, head=2)
    (ax,) = panels(fig)
    np.testing.assert_allclose(ax.images[0].get_array(), attn[2])
    assert len(fig.axes) == 2  # the heatmap and its colorbar
    assert ax.get_title() == "head 2"
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("key", "query")


def test_plot_head_none_is_the_mean_and_sample_picks_from_a_batch():
    attn = softmax_attention(3, 5, batch=2)
    fig = plot_head(attn, head=None, sample=1)
    np.testing.assert_allclose(panels(fig)[0].images[0].get_array(), attn[1].mean(axis=0))


@pytest.mark.parametrize(
    "heads, ncols, grid_shape",
    [
        (1, None, (1, 2)),   # one head: head + mean, one row
        (2, None, (1, 3)),
        (3, None, (1, 4)),   # exactly one full row
        (6, None, (2, 4)),   # 7 panels on 2x4: one hidden
        (12, None, (4, 4)),  # 13 panels on 4x4: three hidden
        (6, 7, (1, 7)),      # one row, wide
        (6, 100, (1, 7)),    # ncols larger than panels is capped
        (5, 1, (6, 1)),      # one column
    ],
)
def test_plot_heads_grid_has_every_head_plus_mean_and_hides_the_rest(heads, ncols, grid_shape):
    attn = softmax_attention(heads, 5, seed=heads)
    fig = plot_heads(attn, ncols=ncols)
    shown = panels(fig)
    assert len(shown) == heads + 1
    assert len(hidden(fig)) == grid_shape[0] * grid_shape[1] - (heads + 1)
    assert [ax.get_title() for ax in shown] == ["head {}".format(h) for h in range(heads)] + ["mean"]
    for h in range(heads):
        np.testing.assert_allclose(shown[h].images[0].get_array(), attn[h])
    np.testing.assert_allclose(shown[-1].images[0].get_array(), attn.mean(axis=0))
    # One shared colour scale: every panel has the same limits, the global min and max.
    assert {ax.images[0].get_clim() for ax in shown} == {(attn.min(), attn.max())}
    # The panels sit on the requested grid.
    geometry = shown[0].get_subplotspec().get_geometry()[:2]
    assert geometry == grid_shape


def test_plot_heads_without_mean_and_with_own_scales():
    attn = softmax_attention(2, 4)
    fig = plot_heads(attn, mean=False, shared_scale=False)
    shown = panels(fig)
    assert len(shown) == 2
    assert len(fig.axes) == 4  # two panels, a colorbar each
    assert shown[0].images[0].get_clim() == (attn[0].min(), attn[0].max())


def test_torch_tensors_are_accepted_like_arrays():
    torch = require("torch")
    attn = softmax_attention(2, 5)
    tensor = torch.tensor(attn, dtype=torch.float16, requires_grad=False)
    fig = plot_heads(tensor)
    np.testing.assert_allclose(panels(fig)[0].images[0].get_array(), attn[0], atol=1e-3)
    r = attention_rollout([torch.tensor(attn, requires_grad=True)] * 2)
    np.testing.assert_allclose(r, attention_rollout([attn] * 2), atol=1e-6)


# --------------------------------------------------------------------------- overlays


@pytest.mark.parametrize("patch", [0, 13, 90, 195])
def test_cls_overlay_peaks_on_the_patch_that_gets_the_attention(patch):
    grid = (14, 14)
    image = photo()
    fig = plot_query_on_image(cls_on_patch(grid, patch), image)  # grid inferred: 197 = 1 + 14 * 14
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), image / 255.0, atol=1e-7)
    heat = ax.images[1].get_array()
    assert heat.shape == (224, 224)
    r, c = divmod(patch, 14)
    assert peak_box(heat) == (r * 16, (r + 1) * 16, c * 16, (c + 1) * 16)
    assert np.count_nonzero(heat == heat.max()) == 16 * 16  # nearest: the whole box, nothing else
    assert ax.images[1].get_clim() == (0.0, 1.0)
    assert not ax.patches  # CLS is no patch: nothing to outline


def test_overlay_renormalises_over_patches_and_scales_from_zero_to_max():
    grid = (2, 2)
    attn = np.zeros((1, 5, 5))
    attn[0, 0] = [0.6, 0.1, 0.1, 0.2, 0.0]  # CLS keeps 0.6 on itself: dropped, the rest sums to 0.4
    fig = plot_query_on_image(attn, np.zeros((32, 32, 3)), "cls", grid=grid)
    overlay = fig.axes[0].images[1]
    heat = overlay.get_array()
    np.testing.assert_allclose(heat[::16, ::16], [[0.25, 0.25], [0.5, 0.0]])
    assert overlay.get_clim() == (0.0, 0.5)


def test_patch_query_on_a_non_square_grid_without_cls_is_outlined():
    grid = (2, 3)
    n = 6
    attn = np.full((2, n, n), 1.0 / n)
    attn[:, 4, :] = 0.0
    attn[:, 4, 2] = 1.0  # query patch (1, 1) looks only at patch (0, 2)
    image = photo(1, height=32, width=48)
    fig = plot_query_on_image(attn, image, (1, 1), grid=grid)
    ax = fig.axes[0]
    assert peak_box(ax.images[1].get_array()) == (0, 16, 32, 48)
    (box,) = ax.patches
    assert isinstance(box, Rectangle)
    assert (box.get_x(), box.get_y(), box.get_width(), box.get_height()) == (15.5, 15.5, 16, 16)
    # the same query as a row-major patch index
    same = plot_query_on_image(attn, image, 4, grid=grid)
    np.testing.assert_array_equal(same.axes[0].images[1].get_array(), ax.images[1].get_array())


def test_prefix_tokens_are_inferred_or_given():
    grid = (4, 4)
    attn = cls_on_patch(grid, 6, num_prefix_tokens=5)  # CLS + 4 registers: 21 tokens
    for kwargs in ({}, {"num_prefix_tokens": 5}, {"grid": 4}):
        heat = plot_query_on_image(attn, np.zeros((64, 64, 3)), **kwargs).axes[0].images[1].get_array()
        assert peak_box(heat) == (16, 32, 32, 48)


def test_bilinear_overlay_peaks_inside_the_patch():
    fig = plot_query_on_image(cls_on_patch((7, 7), 24), photo(2), upsample="bilinear")
    heat = fig.axes[0].images[1].get_array()
    y0, y1, x0, x1 = peak_box(heat)
    assert 3 * 32 <= y0 and y1 <= 4 * 32 and 3 * 32 <= x0 and x1 <= 4 * 32
    assert heat.min() >= 0 and heat.max() <= 1


def test_overlay_uses_one_head_or_the_mean():
    attn = np.full((2, 5, 5), 0.2)
    attn[0, 0] = [0, 1, 0, 0, 0]
    attn[1, 0] = [0, 0, 0, 0, 1]
    image = np.zeros((32, 32, 3))
    head1 = plot_query_on_image(attn, image, head=1).axes[0].images[1].get_array()
    assert peak_box(head1) == (16, 32, 16, 32)
    mean = plot_query_on_image(attn, image).axes[0].images[1].get_array()
    np.testing.assert_allclose(mean[::16, ::16], [[0.5, 0], [0, 0.5]])


def test_overlay_on_an_image_that_does_not_split_into_the_grid_warns():
    with pytest.warns(UserWarning, match="model_input_image"):
        plot_query_on_image(cls_on_patch((14, 14), 0), photo(height=480, width=640))


def test_highlighted_patches_are_boxed_where_the_patches_are():
    image = photo(3, height=64, width=96)
    fig = plot_highlighted_patches(image, [0, (1, 2), 11], grid=(4, 6), labels=True)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.images[0].get_array(), image / 255.0, atol=1e-7)
    boxes = [(p.get_x(), p.get_y(), p.get_width(), p.get_height()) for p in ax.patches]
    assert boxes == [(-0.5, -0.5, 16, 16), (31.5, 15.5, 16, 16), (79.5, 15.5, 16, 16)]
    assert [t.get_text() for t in ax.texts] == ["0", "8", "11"]


def test_grace_hopper_overlay_on_the_model_input():
    image = model_input_image(grace_hopper(), 224, crop_pct=0.875)
    fig = plot_query_on_image(cls_on_patch((14, 14), 4 * 14 + 6, cls_self=0.3), image)
    ax = fig.axes[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), image)
    assert peak_box(ax.images[1].get_array()) == (64, 80, 96, 112)


# --------------------------------------------------------------------------- model input


def timm_pixels(transform, pil_image, cfg):
    """timm's eval transform output, un-normalised back to [0, 1] and HxWx3."""
    x = transform(pil_image).numpy()
    mean = np.asarray(cfg["mean"])[:, None, None]
    std = np.asarray(cfg["std"])[:, None, None]
    return (x * std + mean).transpose(1, 2, 0)


@pytest.mark.parametrize("crop_mode", ["center", "squash", "border"])
@pytest.mark.parametrize("source", ["grace", "landscape", "portrait"])
def test_model_input_image_matches_timm_eval_transform(source, crop_mode):
    timm = require("timm")
    import timm.data  # noqa: F401
    from PIL import Image

    cfg = timm.data.resolve_data_config({}, model=timm.create_model("vit_tiny_patch16_224", pretrained=False))
    cfg = dict(cfg, crop_mode=crop_mode)
    transform = timm.data.create_transform(**cfg)
    if source == "grace":
        pil = grace_hopper()
    else:
        h, w = (300, 457) if source == "landscape" else (411, 250)
        pil = Image.fromarray(photo(4, height=h, width=w))
    expected = timm_pixels(transform, pil, cfg)
    for given in (pil, np.asarray(pil)):
        got = model_input_image(given, cfg)
        assert got.shape == (224, 224, 3) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected, atol=1e-5)


def test_model_input_image_crop_pct_and_explicit_resize_match_torchvision():
    require("timm")
    from PIL import Image
    from torchvision import transforms

    pil = Image.fromarray(photo(5, height=333, width=500))
    for kwargs, pipeline in (
        ({"crop_pct": 0.875}, [transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC)]),
        ({"resize": 256, "interpolation": "bilinear"}, [transforms.Resize(256)]),
    ):
        reference = transforms.Compose(pipeline + [transforms.CenterCrop(224), transforms.ToTensor()])
        expected = reference(pil).numpy().transpose(1, 2, 0)
        np.testing.assert_allclose(model_input_image(pil, 224, **kwargs), expected, atol=1e-5)


def test_model_input_image_accepts_paths_float_and_grey_images(tmp_path):
    from PIL import Image

    pixels = photo(6, height=256, width=320)
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    from_path = model_input_image(path, 224)
    from_str = model_input_image(str(path), 224)
    from_uint8 = model_input_image(pixels, 224)
    from_float = model_input_image(pixels / 255.0, 224)
    np.testing.assert_array_equal(from_path, from_uint8)
    np.testing.assert_array_equal(from_str, from_uint8)
    # float images are resized in float: within a rounding step of the uint8 path
    np.testing.assert_allclose(from_float, from_uint8, atol=1.5 / 255)
    assert from_float.min() >= 0 and from_float.max() <= 1
    grey = model_input_image(pixels[:, :, 0], 224)
    np.testing.assert_array_equal(grey[:, :, 0], grey[:, :, 2])
    assert model_input_image(pixels, (160, 224), crop_pct=1.0).shape == (160, 224, 3)


# --------------------------------------------------------------------------- tokens


def test_token_attention_labels_both_axes_with_the_tokens():
    tokens = ["[CLS]", "the", "cat", "sat", "[SEP]"]
    attn = softmax_attention(3, 5)
    fig = plot_token_attention(attn, tokens)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens
    assert [t.get_text() for t in ax.get_yticklabels()] == tokens
    np.testing.assert_allclose(ax.images[0].get_array(), attn.mean(axis=0))
    one = plot_token_attention(attn, tokens, head=1).axes[0]
    np.testing.assert_allclose(one.images[0].get_array(), attn[1])
    assert one.get_title() == "head 1"


def test_long_token_inputs_shrink_the_font_and_cut_with_a_note():
    short = plot_token_attention(softmax_attention(1, 8), list("abcdefgh")).axes[0]
    n = 300
    tokens = ["tok{}".format(i) for i in range(n)]
    ax = plot_token_attention(softmax_attention(2, n), tokens, max_tokens=80).axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == tokens[:80]
    assert ax.images[0].get_array().shape == (80, 80)
    assert "first 80 of 300 tokens" in ax.get_title()
    everything = plot_token_attention(softmax_attention(2, n), tokens, max_tokens=None).axes[0]
    assert everything.images[0].get_array().shape == (n, n)
    assert "shown" not in everything.get_title()
    sizes = [a.get_xticklabels()[0].get_fontsize() for a in (short, ax, everything)]
    assert sizes[0] >= sizes[1] > sizes[2] >= 3  # the figure grows first, then the font shrinks


# --------------------------------------------------------------------------- rollout


def test_rollout_by_hand_two_layers_one_head():
    a1 = np.array([[[1.0, 0.0], [0.5, 0.5]]])
    a2 = np.array([[[0.5, 0.5], [0.0, 1.0]]])
    # with the residual: (A + I) / 2 row-wise
    #   A1' = [[1, 0], [.25, .75]]   A2' = [[.75, .25], [0, 1]]
    # rollout = A2' @ A1' (last layer on the left)
    expected = np.array([[0.8125, 0.1875], [0.25, 0.75]])
    np.testing.assert_allclose(attention_rollout([a1, a2]), expected)
    # without the residual it is the plain product A2 @ A1
    np.testing.assert_allclose(attention_rollout([a1, a2], residual=False), [[0.75, 0.25], [0.5, 0.5]])


def independent_rollout(layers, fusion, discard_ratio=0.0, residual=True):
    """Rollout written differently: explicit per-entry loops, then a right-to-left reduction."""
    fuse = {"mean": lambda a: a.sum(0) / a.shape[0], "max": lambda a: a.max(0), "min": lambda a: a.min(0)}
    mats = []
    for layer in layers:
        a = fuse[fusion](layer)
        if discard_ratio:
            k = int(a.size * discard_ratio)
            threshold_order = sorted(range(a.size), key=lambda i: (a.flat[i], i))[:k]
            a = a.copy()
            for i in threshold_order:
                a.flat[i] = 0.0
        n = a.shape[0]
        m = np.empty_like(a)
        for i in range(n):
            row = [a[i, j] + (1.0 if residual and i == j else 0.0) for j in range(n)]
            total = sum(row)
            m[i] = [v / total for v in row]
        mats.append(m)
    out = mats[-1]
    for m in reversed(mats[:-1]):
        out = np.einsum("ik,kj->ij", out, m)
    return out


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3])
def test_rollout_matches_an_independent_computation(fusion, discard_ratio):
    layers = [softmax_attention(3, 6, seed=s) for s in range(4)]
    got = attention_rollout(layers, head_fusion=fusion, discard_ratio=discard_ratio)
    np.testing.assert_allclose(got, independent_rollout(layers, fusion, discard_ratio), rtol=1e-12)
    np.testing.assert_allclose(got.sum(axis=1), 1.0)
    assert got.shape == (6, 6)


def test_rollout_picks_the_sample_of_a_batch():
    layers = [softmax_attention(2, 5, seed=s, batch=3) for s in range(2)]
    np.testing.assert_allclose(
        attention_rollout(layers, sample=2), independent_rollout([layer[2] for layer in layers], "mean")
    )


def test_rollout_overlay_peaks_where_every_layer_looks():
    grid = (4, 4)
    n = 17
    target = 1 + 9  # patch (2, 1)
    layer = np.zeros((2, n, n))
    layer[:, :, target] = 1.0  # every token attends only to one patch
    fig = plot_rollout_on_image([layer] * 3, photo(7, height=64, width=64))
    ax = fig.axes[0]
    assert peak_box(ax.images[1].get_array()) == (32, 48, 16, 32)
    assert ax.get_title() == "rollout of CLS (mean fusion, 3 layers)"


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: plot_head(np.zeros(4)), r"expected attention of shape \(heads, tokens, tokens\).*got shape \(4,\)"),
        (lambda: plot_heads(np.zeros((1, 2, 3, 4, 4))), r"got shape \(1, 2, 3, 4, 4\)"),
        (lambda: plot_token_attention(np.zeros((3, 4)), list("abc")), r"as many queries as keys, got shape \(1, 3, 4\)"),
        (lambda: plot_head(np.zeros((2, 3, 3)), head=5), r"head=5 is out of range .* 2 heads"),
        (lambda: plot_head(np.zeros((2, 2, 3, 3)), sample=4), r"sample=4 is out of range"),
        (lambda: plot_head(np.full((1, 3, 3), np.nan)), r"NaN or inf"),
        (lambda: plot_token_attention(np.zeros((1, 3, 3)), ["a", "b"]), r"got 2 tokens for attention over 3"),
        (lambda: plot_query_on_image(np.zeros((1, 98, 98)), np.zeros((8, 8, 3))), r"cannot infer .* 98 tokens.*grid="),
        (lambda: plot_query_on_image(np.zeros((1, 17, 17)), np.zeros((8, 8, 3)), grid=(5, 5)), r"25 patches .* 17 tokens"),
        (lambda: plot_query_on_image(np.eye(16)[None], np.zeros((8, 8, 3))), r"query='cls' needs a CLS token"),
        (lambda: plot_query_on_image(np.eye(17)[None], np.zeros((8, 8, 3)), query=16), r"query index 16 is outside the 4x4"),
        (lambda: plot_query_on_image(np.eye(17)[None], np.zeros((3, 8, 8))), r"channels first\? pass image.transpose"),
        (lambda: plot_query_on_image(np.eye(17)[None], np.full((8, 8, 3), 200.0)), r"0..255 values"),
        (lambda: plot_query_on_image(np.eye(17)[None], np.full((8, 8, 3), -2.0)), r"normalised by mean/std"),
        (lambda: attention_rollout([np.zeros((1, 3, 3)), np.zeros((1, 4, 4))]), r"layer 1 has 4 tokens but layer 0 has 3"),
        (lambda: attention_rollout([]), r"at least one layer"),
        (lambda: attention_rollout([np.eye(3)[None]], head_fusion="median"), r"unknown head_fusion 'median'"),
        (lambda: model_input_image(np.zeros((8, 8, 3)), crop_mode="zoom"), r"unknown crop_mode"),
        (lambda: model_input_image(np.zeros((8, 8, 3)), interpolation="cubic"), r"unknown interpolation 'cubic'"),
        (lambda: model_input_image(np.zeros((8, 8, 3)), {"crop_pct": 0.9}), r"needs 'input_size'"),
    ],
)
def test_bad_input_raises_our_value_error_with_the_input_and_the_fix(call, match):
    with pytest.raises(VisualizerValueError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError) and isinstance(info.value, VisualizerError)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: attention_rollout(np.zeros((2, 1, 3, 3))), r"list of per-layer arrays.*list\(array\)"),
        (lambda: plot_token_attention(np.zeros((1, 3, 3)), "abc"), r"one string"),
        (lambda: plot_head(np.zeros((1, 3, 3)), head="0"), r"expected head as an int"),
        (lambda: plot_highlighted_patches(np.zeros((8, 8, 3)), ["a"], grid=2), r"patch index or a \(row, col\)"),
        (lambda: plot_head(object()), r"expected attention as a NumPy array"),
    ],
)
def test_wrong_kind_of_input_raises_our_type_error(call, match):
    with pytest.raises(VisualizerTypeError, match=match) as info:
        call()
    assert isinstance(info.value, TypeError)


# --------------------------------------------------------------------------- files and imports


def test_saved_figures_are_real_pngs(tmp_path):
    image = model_input_image(grace_hopper(), 224)
    figures = {
        "heads.png": plot_heads(softmax_attention(6, 10)),
        "overlay.png": plot_query_on_image(cls_on_patch((14, 14), 5 * 14 + 7, cls_self=0.2), image),
        "tokens.png": plot_token_attention(softmax_attention(4, 12), ["t{}".format(i) for i in range(12)]),
    }
    for name, fig in figures.items():
        out = save_figure(fig, tmp_path / "sub" / name, dpi=80)
        assert out == str(tmp_path / "sub" / name)
        with open(out, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(out) > 10000
        pixels = matplotlib.image.imread(out)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_plotting_never_imports_pyplot_and_the_core_never_imports_matplotlib():
    code = (
        "import sys, visualizer; assert 'matplotlib' not in sys.modules, 'core imported matplotlib'\n"
        "import visualizer.plotting; assert 'matplotlib.pyplot' not in sys.modules, 'plotting imported pyplot'\n"
    )
    env = dict(os.environ, PYTHONPATH=ROOT)
    env.pop("MPLBACKEND", None)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
