"""The views' Python side: the page's data, its escaping, files with a context, the CLI.

The pages themselves run in a browser in test_pages.py; here the embedded
JSON is parsed back and checked against the arrays, the HTML is checked to
hold no spliced data, and the file format's context round-trips.
"""
import html
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, require

HOSTILE = ['<img src=x onerror="window.__pwned=1">',
           '</script><script>window.__pwned=2</script>', "\u2028", "&lt;b&gt;"]


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def page_data(page_html):
    """The JSON the page embeds, parsed as the browser's JSON.parse would."""
    match = re.search(r'<script type="application/json" id="vz-data-[0-9a-f]+">(.*?)</script>',
                      page_html, re.S)
    assert match, "no data element"
    return json.loads(match.group(1))


def layers_and_tokens(n=6, heads=3, count=2, seed=0):
    rng = np.random.default_rng(seed)
    return [softmax(rng.normal(size=(1, heads, n, n))) for _ in range(count)]


def test_hostile_strings_stay_inside_the_json_element():
    from visualizer import views

    layers = layers_and_tokens(n=len(HOSTILE) + 1)
    tokens = HOSTILE + ["ok"]
    page = views.head_view(layers, tokens, title=HOSTILE[1])
    text = page.html
    # exactly our two script elements; the data element closes once, at its end
    assert text.count("</script>") == 2 and text.lower().count("<script") == 2
    assert "<img" not in text and "onerror=\"window" not in text
    assert "\u2028" not in text
    assert "<title>{}</title>".format(html.escape(HOSTILE[1])) in text
    data = page_data(text)
    assert data["tokens"] == tokens and data["title"] == HOSTILE[1]


def test_the_embedded_maps_are_the_arrays():
    from visualizer import views
    from visualizer.views.pages import _data

    layers = layers_and_tokens()
    data = page_data(views.head_view(layers, list("abcdef")).html)
    assert data["maps"]["dtype"] == "f4"  # small: exact
    np.testing.assert_array_equal(_data.decode_maps(data["maps"]),
                                  np.stack([layer[0] for layer in layers]))
    data = page_data(views.head_view(layers, list("abcdef"), precision="uint8").html)
    decoded = _data.decode_maps(data["maps"])
    truth = np.stack([layer[0] for layer in layers])
    # 8 bits: within half a step of each row's maximum
    assert np.all(np.abs(decoded - truth) <= truth.max(-1, keepdims=True) / 510 + 1e-7)


def test_a_cache_keyed_by_function_shows_every_call_as_a_named_layer():
    from visualizer import VisualizerError, views
    from visualizer.views.pages._data import decode_maps

    calls = layers_and_tokens(count=6)
    page = views.model_view({"BertSelfAttention.forward": calls}, list("abcdef"))
    assert page.info["layers"] == ["BertSelfAttention.forward call {}".format(i)
                                   for i in range(1, 7)]
    maps = decode_maps(page_data(page.html)["maps"])
    for layer, call in zip(maps, calls):
        np.testing.assert_array_equal(layer, call[0])
    one = views.head_view({"blocks.0.attn": calls[:1], "blocks.1.attn": calls[1]})
    assert one.info["layers"] == ["blocks.0.attn", "blocks.1.attn"]
    with pytest.raises(VisualizerError, match=r"forward passes: regroup them with "
                                              r"get_local.by_module\(model, cache\)"):
        views.model_view({"f": [calls[0], layers_and_tokens(n=4, count=1)[0]]})


def test_pooling_keeps_row_sums_and_says_so():
    from visualizer import views
    from visualizer.views.pages import _data

    n = 40
    layers = layers_and_tokens(n=n, heads=2, count=1)
    page = views.head_view(layers, ["t{}".format(i) for i in range(n)], precision="uint8",
                           max_bytes=1024)
    block = page.info["block"]
    assert block > 1
    data = page_data(page.html)
    assert "blocks" in data["note"] and data["labels"][0].startswith("0-{}: t0".format(block - 1))
    pooled = _data.decode_maps(data["maps"])
    assert pooled.shape[-1] == -(-n // block)
    np.testing.assert_allclose(pooled.sum(-1), 1.0, atol=0.02)
    # by hand: block 0's queries averaged, keys summed
    truth = layers[0][0, 0, :block, :block].sum(-1).mean()
    assert abs(pooled[0, 0, 0, 0] - truth) < pooled[0, 0, 0].max() / 255


def test_image_pooling_by_squares():
    from visualizer.views.pages import _data

    rng = np.random.default_rng(1)
    maps = softmax(rng.normal(size=(1, 1, 1 + 16, 1 + 16)))
    pooled = _data.pool(maps, 2, grid=(4, 4), prefix=1)
    assert pooled.shape == (1, 1, 5, 5)
    # CLS row, key square (0, 0) = patches 0, 1, 4, 5
    assert np.isclose(pooled[0, 0, 0, 1], maps[0, 0, 0, [1, 2, 5, 6]].sum(), rtol=1e-5)
    # query square (1, 1) = patches 10, 11, 14, 15 averaged, CLS key
    assert np.isclose(pooled[0, 0, 4, 0], maps[0, 0, [11, 12, 15, 16], 0].mean(), rtol=1e-5)


def test_png_is_a_real_png():
    require("PIL")
    import io

    from PIL import Image

    from visualizer.views.pages import _data
    import base64

    rgb = (np.arange(5 * 7 * 3) % 256).astype(np.uint8).reshape(5, 7, 3)
    uri = _data.png_data_uri(rgb)
    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))))
    np.testing.assert_array_equal(decoded, rgb)


@pytest.mark.parametrize("call, message", [
    (lambda v, a: v.head_view(a, "one string"), "one string"),
    (lambda v, a: v.head_view(a, ["a"]), "got 1 tokens for attention over 6"),
    (lambda v, a: v.head_view([a[0], a[0][:, :, :5, :5]]), "same (heads, N, N) shape"),
    (lambda v, a: v.head_view([]), "empty list"),
    (lambda v, a: v.head_view(a, precision="f16"), "unknown precision"),
    (lambda v, a: v.image_view(a, np.zeros((8, 8, 3)), grid=3), "does not fit attention over 6"),
    (lambda v, a: v.image_view([x[:, :, :7, :7] for x in softmax(np.zeros((1, 1, 1, 7, 7)))],
                               np.zeros((8, 8, 3)), num_prefix_tokens=0),
     "cannot infer a square patch grid"),
    (lambda v, a: v.generation_view(a, list("abcdef"), 6), "leaves no generated token"),
    (lambda v, a: v.head_view([np.full((2, 3, 3), np.nan)]), "NaN"),
])
def test_bad_input_is_explained(call, message):
    from visualizer import views
    from visualizer import VisualizerError

    with pytest.raises(VisualizerError, match=re.escape(message)):
        call(views, layers_and_tokens())


def test_image_view_bad_image_is_explained():
    from visualizer import views
    from visualizer import VisualizerError

    layers = [softmax(np.zeros((1, 2, 5, 5)))]
    with pytest.raises(VisualizerError, match="channels first"):
        views.image_view(layers, np.zeros((3, 32, 32)))
    with pytest.raises(VisualizerError, match=r"values in \[0, 1\]"):
        views.image_view(layers, np.full((32, 32, 3), 7.5))


def test_repr_html_carries_the_page_in_a_sandboxed_iframe():
    from visualizer import views

    page = views.model_view(layers_and_tokens(), HOSTILE + ["a", "b"])
    out = page._repr_html_()
    assert out.startswith("<iframe srcdoc=\"") and 'sandbox="allow-scripts"' in out
    srcdoc = re.match(r'<iframe srcdoc="(.*?)" sandbox', out, re.S).group(1)
    assert '"' not in srcdoc and "<" not in srcdoc
    assert html.unescape(srcdoc) == page.html


def test_files_carry_the_context_and_old_files_still_load(tmp_path):
    from visualizer import get_local, views
    from visualizer.storage.npz import load_context

    layers = layers_and_tokens()
    cache = {"Attention.forward": layers}
    image = (np.random.default_rng(0).random((16, 16, 3)) * 255).astype(np.uint8)
    path = str(tmp_path / "caps.npz")
    views.save(path, cache, tokens=HOSTILE + ["a", "b"], image=image, grid=(2, 2),
               num_prefix_tokens=2, layers=["blocks.0.attn", "blocks.1.attn"], title=HOSTILE[0])
    loaded, context = views.load(path)
    np.testing.assert_array_equal(loaded["Attention.forward"][1], layers[1])
    assert context["tokens"] == HOSTILE + ["a", "b"] and context["title"] == HOSTILE[0]
    np.testing.assert_array_equal(context["image"], image)
    assert context["grid"] == [2, 2] and context["num_prefix_tokens"] == 2
    # the archive holds no pickle: numpy reads every entry with allow_pickle=False
    with np.load(path, allow_pickle=False) as archive:
        assert all(archive[name].dtype != object for name in archive.files)
    assert get_local.load(path).keys() == cache.keys()
    old = str(tmp_path / "old.npz")
    get_local.save(old, cache)
    assert load_context(old) == {}


def test_views_from_cache_picks_the_view(tmp_path):
    from visualizer import views

    layers = layers_and_tokens(n=5)
    image = np.zeros((8, 8, 3), np.uint8)
    [(key, page)] = views.views_from_cache({"k": layers, "other": [np.zeros(3)]},
                                           {"image": image})
    assert key == "k" and page.view == "image" and page.info["grid"] == (2, 2)
    [(_, page)] = views.views_from_cache({"k": layers}, {"tokens": list("abcde")})
    assert page.view == "model" and page_data(page.html)["tokens"] == list("abcde")
    [(_, page)] = views.views_from_cache({"k": layers}, {"prompt_length": 2})
    assert page.view == "generation"


def cli(*args, cwd):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "visualizer"] + list(args), cwd=str(cwd),
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_view_writes_a_page(tmp_path):
    from visualizer import views

    layers = layers_and_tokens(n=5)
    views.save(str(tmp_path / "caps.npz"), {"Attention.forward": layers},
               tokens=["<b>", "a", "b", "c", "d"])
    proc = cli("view", "caps.npz", "--out", "out/attention.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote out/attention.html (model view of 'Attention.forward'" in proc.stderr
    text = (tmp_path / "out" / "attention.html").read_text(encoding="utf-8")
    assert page_data(text)["tokens"][0] == "<b>"
    proc = cli("view", "caps.npz", "--out", "head.html", "--view", "head", cwd=tmp_path)
    assert proc.returncode == 0 and page_data((tmp_path / "head.html").read_text())["view"] == "head"


def test_cli_view_bad_input(tmp_path):
    from visualizer import get_local

    get_local.save(str(tmp_path / "two.npz"), {"a": layers_and_tokens(n=4),
                                                "b": layers_and_tokens(n=5)})
    proc = cli("view", "two.npz", "--out", "p.html", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("visualizer: error: two.npz holds attention maps under 2 keys")
    proc = cli("view", "two.npz", "--out", "p.html", "--view", "image", "--key", "a", cwd=tmp_path)
    assert proc.returncode == 2 and "needs the image the model saw" in proc.stderr
    proc = cli("view", "missing.npz", "--out", "p.html", cwd=tmp_path)
    assert proc.returncode == 2 and "no such file: missing.npz" in proc.stderr
    assert not (tmp_path / "p.html").exists()


def test_write_index_escapes_names(tmp_path):
    from visualizer import views

    folder = tmp_path / "demo"
    index = views.write_index(str(folder), [(str(folder / "a<b>.html"), HOSTILE[0])],
                              [str(folder / "x.png")], title=HOSTILE[1])
    text = open(index, encoding="utf-8").read()
    assert "<img src=x" not in text and "<script" not in text.lower()
    assert 'href="a&lt;b&gt;.html"' in text and '<img src="x.png"' in text


def test_core_import_does_not_load_numpy():
    proc = subprocess.run([sys.executable, "-c", "import sys, visualizer; "
                           "assert 'numpy' not in sys.modules; import visualizer.views; "
                           "assert 'numpy' not in sys.modules"], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
