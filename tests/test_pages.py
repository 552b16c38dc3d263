"""Every view page in a real headless Chromium (Debian's ``chromium``, driven by playwright).

Each page is opened from a file with every non-file request aborted (and
counted: there must be none), must log no console error and raise no page
error, must paint something (a screenshot with many colours), and must show,
on hover, the numbers of the maps it was made from: the tests read them from
the readout's ``data-values`` and compare them with the arrays, or with a
hand-written rollout.  A page made from hostile tokens and titles must run
none of their scripts and show their text.  Screenshots are kept in
``out/screenshots`` (a CI artifact).  The browser is ``$VISUALIZER_CHROMIUM``
or ``/usr/bin/chromium``; playwright never downloads one.
"""
import io
import os
import pathlib

import numpy as np
import pytest

from conftest import ROOT, require

CHROMIUM = os.environ.get("VISUALIZER_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = os.path.join(ROOT, "out", "screenshots")

HOSTILE = ['<img src=x onerror="window.__pwned=1">',
           '</script><script>window.__pwned=2</script>']


def softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def browser():
    require("numpy")
    sync = require("playwright.sync_api")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("VISUALIZER_REQUIRE_ALL"):
            pytest.fail("no Chromium at {} (apt-get install -y chromium)".format(CHROMIUM))
        pytest.skip("no Chromium at {}".format(CHROMIUM))
    with sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Opened:
    """A page opened offline, with what it logged and what it tried to fetch."""

    def __init__(self, browser, path, width=1100, height=800):
        self.errors, self.requests, self.blocked = [], [], []
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append("pageerror: {}".format(e)))
        self.page.on("console", lambda m: self.errors.append("{}: {}".format(m.type, m.text))
                     if m.type in ("error", "warning") else None)
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.goto(pathlib.Path(path).as_uri())
        self.page.wait_for_selector(".vz-root[data-ready='1']", timeout=60000)

    def _route(self, route):
        url = route.request.url
        if url.startswith(("file:", "data:")):
            route.continue_()
        else:
            self.blocked.append(url)
            route.abort()

    def check_clean(self):
        assert self.errors == []
        assert self.blocked == []
        assert all(u.startswith(("file:", "data:")) for u in self.requests), self.requests

    def readout(self, name):
        return self.page.get_attribute(".vz-readout", name)

    def values(self):
        return np.array([float(v) for v in self.readout("data-values").split(",")])

    def shot(self, name):
        os.makedirs(SHOTS, exist_ok=True)
        path = os.path.join(SHOTS, name + ".png")
        png = self.page.screenshot(path=path, full_page=True)
        from PIL import Image

        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
        colours = len(np.unique(pixels, axis=0))
        not_white = float(np.mean(np.any(pixels < 245, axis=1)))
        assert colours > 50 and not_white > 0.02, (name, colours, not_white)
        return path

    def close(self):
        self.context.close()


def head_canvas_point(opened, index, side="query"):
    canvas = opened.page.query_selector(".vz-head-canvas")
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    h = float(canvas.get_attribute("data-row-height"))
    top = float(canvas.get_attribute("data-top"))
    x = float(canvas.get_attribute("data-left-x" if side == "query" else "data-right-x"))
    # the mouse moves in whole CSS pixels: take the first whole pixel inside the row
    start = box["y"] + top + index * h
    y = float(np.ceil(start + 1e-6)) if h < 2 else start + h / 2
    return box["x"] + x, y


def hover_token(opened, index, side="query"):
    x, y = head_canvas_point(opened, index, side)
    opened.page.mouse.move(x, y)
    opened.page.wait_for_function(
        "i => document.querySelector('.vz-readout').getAttribute('data-index') === String(i)",
        arg=index)


@pytest.fixture
def text_layers():
    rng = np.random.default_rng(0)
    tokens = ["[CLS]", "the", "cat", HOSTILE[0], "sat", HOSTILE[1], "&amp;", "\u2028", "[SEP]"]
    layers = [softmax(rng.normal(size=(1, 4, len(tokens), len(tokens))) * 2) for _ in range(3)]
    return layers, tokens


def test_head_view_hover_shows_the_maps(browser, tmp_path, text_layers):
    from visualizer import views

    layers, tokens = text_layers
    path = views.head_view(layers, tokens, title=HOSTILE[0] + " head view").save(
        str(tmp_path / "head.html"))
    opened = Opened(browser, path)
    try:
        assert opened.readout("data-values") is None  # nothing hovered yet
        hover_token(opened, 2)
        # default: layer 0, the mean of the heads; float32 data is exact
        np.testing.assert_array_equal(opened.values(), layers[0][0].mean(0)[2].astype(np.float32))
        assert opened.readout("data-token") == "cat"
        opened.page.select_option(".vz-controls select >> nth=0", "2")
        opened.page.select_option(".vz-controls select >> nth=1", "3")
        hover_token(opened, 4)
        assert opened.readout("data-layer") == "2" and opened.readout("data-head") == "3"
        np.testing.assert_array_equal(opened.values(), layers[2][0, 3, 4])
        hover_token(opened, 1, side="key")  # who attends to key 1
        assert opened.readout("data-side") == "key"
        np.testing.assert_array_equal(opened.values(), layers[2][0, 3, :, 1])
        hover_token(opened, 3)
        assert opened.readout("data-token") == HOSTILE[0]
        assert HOSTILE[0] in opened.page.inner_text(".vz-readout")
        assert opened.page.evaluate("window.__pwned") is None
        assert opened.page.evaluate("document.querySelectorAll('img').length") == 0
        assert opened.page.title() == HOSTILE[0] + " head view"
        assert opened.page.inner_text(".vz-title") == HOSTILE[0] + " head view"
        opened.shot("head_view")
        opened.check_clean()
    finally:
        opened.close()


def test_head_view_readout_leaves_out_masked_keys_and_its_bar_says_what(browser, tmp_path):
    from visualizer import views

    n = 8
    rng = np.random.default_rng(3)
    scores = np.where(np.tril(np.ones((n, n), bool)), rng.normal(size=(1, 2, n, n)), -np.inf)
    causal = softmax(scores)
    path = views.head_view([causal], ["w{}".format(i) for i in range(n)]).save(
        str(tmp_path / "causal.html"))
    opened = Opened(browser, path)
    try:
        assert "hover a token" in opened.page.inner_text(".vz-cb-label")
        hover_token(opened, 2)  # sees keys 0..2 only: the five future keys weigh exactly 0
        assert sorted(map(int, opened.readout("data-top").split(","))) == [0, 1, 2]
        assert "w5" not in opened.page.inner_text(".vz-readout")
        assert opened.page.inner_text(".vz-cb-label") == (
            "weight query 2 gives each key (0 to the largest in its row)")
        hover_token(opened, 6, side="key")  # only queries 6 and 7 see key 6
        assert sorted(map(int, opened.readout("data-top").split(","))) == [6, 7]
        assert opened.page.inner_text(".vz-cb-label") == (
            "weight each query gives key 6 (0 to the largest in its column)")
        opened.check_clean()
    finally:
        opened.close()


def test_hostile_tokens_run_nothing_and_show_as_text(browser, tmp_path, text_layers):
    from visualizer import views

    layers, tokens = text_layers
    path = views.generation_view(layers, tokens, prompt_length=3, title=HOSTILE[1]).save(
        str(tmp_path / "hostile.html"))
    opened = Opened(browser, path)
    try:
        assert opened.page.evaluate("window.__pwned") is None
        # the tokens themselves, and as shown: U+2028 visibly, never as a line break
        shown = opened.page.eval_on_selector_all(".vz-tok",
                                                 "s => s.map(x => x.getAttribute('data-token'))")
        assert shown == tokens
        drawn = opened.page.eval_on_selector_all(".vz-tok", "s => s.map(x => x.textContent)")
        assert drawn == [t if t != "\u2028" else "\u27e8U+2028\u27e9" for t in tokens]
        assert opened.page.is_visible(".vz-tok >> nth=3") and opened.page.is_visible(".vz-tok >> nth=5")
        assert opened.page.inner_text(".vz-title") == HOSTILE[1]
        assert opened.page.evaluate("document.scripts.length") == 2  # the data and ours
        opened.check_clean()
    finally:
        opened.close()


REAL_TEXT = ["[CLS]", "https://example.org/" + "a1/" * 6660, "\u05e9\u05dc\u05d5\u05dd",
             "\u0633\u0644\u0627\u0645", "one\u2028two", "\u2029", "", "   ", "\t",
             "\U0001F468\u200d\U0001F469\u200d\U0001F467", "\U0001F44D\U0001F3FD", "[SEP]"]


def causal_layers(n, seed=5):
    rng = np.random.default_rng(seed)
    return [softmax(np.where(np.tril(np.ones((n, n), bool)), rng.normal(size=(1, 2, n, n)),
                             -np.inf)) for _ in range(2)]


def test_real_text_keeps_pages_bounded_visible_and_in_order(browser, tmp_path):
    from visualizer import views

    tokens, n = REAL_TEXT, len(REAL_TEXT)
    assert len(tokens[1]) >= 19980
    layers = causal_layers(n)
    for view in ("head", "model", "generation"):
        page = (views.generation_view(layers, tokens, prompt_length=4) if view == "generation"
                else getattr(views, view + "_view")(layers, tokens))
        opened = Opened(browser, page.save(str(tmp_path / "{}.html".format(view))))
        try:
            assert opened.page.evaluate("document.documentElement.scrollWidth") <= 1100
            if view == "generation":
                spans = opened.page.query_selector_all(".vz-tok")
                assert [s.get_attribute("data-token") for s in spans] == tokens
                shown = [s.text_content() for s in spans]
                assert len(shown[1]) == 61 and shown[1].endswith("\u2026")  # 60 and an ellipsis
                assert shown[4] == "one\u27e8U+2028\u27e9two" and shown[5] == "\u27e8U+2029\u27e9"
                assert shown[6:9] == ["\u27e8empty\u27e9", "\u2423" * 3, "\\t"]
                assert shown[9:11] == tokens[9:11]  # emoji sequences whole (joiners kept)
                # Hebrew then Arabic: drawn left to right in token order, never swapped
                boxes = [s.bounding_box() for s in spans[:5]]
                assert all(a["x"] < b["x"] for a, b in zip(boxes, boxes[1:]) if a["y"] == b["y"])
                assert boxes[2]["y"] == boxes[3]["y"]
                for step in range(n - 4):
                    opened.page.click("text=next")
                assert opened.readout("data-step") == str(n - 5)
            else:
                hover_token(opened, 1)
                assert opened.readout("data-token") == tokens[1]
                assert tokens[1] in opened.page.inner_text(".vz-readout")  # the whole token
                hover_token(opened, 1, side="key")
            height = opened.page.evaluate(
                "document.querySelector('.vz-readout').getBoundingClientRect().height")
            assert height < 100, height  # a long token scrolls inside the readout
            opened.shot("real_text_" + view)
            opened.check_clean()
        finally:
            opened.close()


def test_model_view_click_opens_the_head(browser, tmp_path, text_layers):
    from visualizer import views

    layers, tokens = text_layers
    path = views.model_view(layers, tokens).save(str(tmp_path / "model.html"))
    opened = Opened(browser, path)
    try:
        assert opened.page.eval_on_selector_all(".vz-thumb", "t => t.length") == 3 * 4
        opened.page.click(".vz-thumb[data-layer='1'][data-head='2']")
        assert opened.page.eval_on_selector(".vz-detail select >> nth=0", "s => s.value") == "1"
        hover_token(opened, 5)
        assert opened.readout("data-layer") == "1" and opened.readout("data-head") == "2"
        np.testing.assert_array_equal(opened.values(), layers[1][0, 2, 5])
        opened.shot("model_view")
        opened.check_clean()
    finally:
        opened.close()


def hand_rollout(layers):
    """Abnar & Zuidema's rollout, written out: mean of heads, plus identity, row-normalised."""
    n = layers[0].shape[-1]
    result = np.eye(n)
    out = []
    for layer in layers:
        a = layer[0].astype(np.float64).mean(0) + np.eye(n)
        a = a / a.sum(1, keepdims=True)
        result = a @ result
        out.append(result)
    return out


def test_image_view_hover_a_patch(browser, tmp_path):
    from visualizer import views

    rng = np.random.default_rng(1)
    rows, cols, prefix = 4, 5, 1
    n = prefix + rows * cols
    layers = [softmax(rng.normal(size=(1, 3, n, n)) * 3) for _ in range(2)]
    image = (rng.random((64, 80, 3)) * 255).astype(np.uint8)
    path = views.image_view(layers, image, grid=(rows, cols)).save(str(tmp_path / "image.html"))
    opened = Opened(browser, path)
    try:
        # the CLS query of the last layer, mean of heads, first
        assert opened.readout("data-query") == "-1"
        np.testing.assert_array_equal(opened.values(), layers[1][0].mean(0)[0, prefix:])
        canvas = opened.page.query_selector(".vz-image-canvas")
        box = canvas.bounding_box()
        margin = float(canvas.get_attribute("data-margin"))
        pw = float(canvas.get_attribute("data-patch-width"))
        ph = float(canvas.get_attribute("data-patch-height"))
        for r, c in [(2, 3), (0, 4)]:
            opened.page.mouse.move(box["x"] + margin + (c + 0.5) * pw,
                                   box["y"] + margin + (r + 0.5) * ph)
            assert opened.readout("data-query") == str(r * cols + c)
            np.testing.assert_array_equal(
                opened.values(), layers[1][0].mean(0)[prefix + r * cols + c, prefix:])
            np.testing.assert_array_equal(
                [float(v) for v in opened.readout("data-prefix-values").split(",")],
                layers[1][0].mean(0)[prefix + r * cols + c, :prefix])
        opened.page.select_option(".vz-controls select >> nth=1", "1")  # head 1
        np.testing.assert_array_equal(opened.values(), layers[1][0, 1, prefix + 4, prefix:])
        opened.page.click("text=CLS query")
        np.testing.assert_array_equal(opened.values(), layers[1][0, 1, 0, prefix:])
        opened.page.select_option(".vz-controls select >> nth=0", "0")  # layer 0
        opened.page.select_option(".vz-controls select >> nth=2", "1")  # rollout
        np.testing.assert_allclose(opened.values(), hand_rollout(layers)[0][0, prefix:],
                                   rtol=1e-6)
        opened.page.select_option(".vz-controls select >> nth=0", "1")
        np.testing.assert_allclose(opened.values(), hand_rollout(layers)[1][0, prefix:],
                                   rtol=1e-6)
        opened.page.select_option(".vz-controls select >> nth=2", "0")
        opened.shot("image_view")
        opened.check_clean()
    finally:
        opened.close()


def test_generation_view_steps(browser, tmp_path):
    from visualizer import views

    rng = np.random.default_rng(2)
    tokens = ["Once", " upon", " a", " time", " there", " was", " a", " cat", "."]
    t = len(tokens)
    causal = np.where(np.tril(np.ones((t, t), bool)), rng.normal(size=(2, 1, 4, t, t)) * 2, -np.inf)
    layers = list(softmax(causal))
    path = views.generation_view(layers, tokens, prompt_length=4).save(str(tmp_path / "gen.html"))
    opened = Opened(browser, path)
    try:
        assert opened.readout("data-step") == "0"
        np.testing.assert_array_equal(opened.values(), layers[1][0].mean(0)[3])
        opened.page.click("text=next")
        opened.page.click("text=next")
        assert opened.readout("data-step") == "2" and opened.readout("data-query") == "5"
        np.testing.assert_array_equal(opened.values(), layers[1][0].mean(0)[5])
        assert opened.page.get_attribute(".vz-current", "data-index") == "6"
        opened.shot("generation_view")
        opened.check_clean()
    finally:
        opened.close()


def test_a_notebook_output_renders_in_its_iframe(browser, tmp_path, text_layers):
    """The HTML a notebook shows (``_repr_html_``) carries the whole page and works inside it."""
    from visualizer import views

    layers, tokens = text_layers
    page = views.head_view(layers, tokens)
    outer = tmp_path / "notebook_output.html"
    outer.write_text("<!DOCTYPE html><html><body>" + page._repr_html_() + "</body></html>",
                     encoding="utf-8")
    opened_ctx = browser.new_context()
    try:
        tab = opened_ctx.new_page()
        errors = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(outer.as_uri())
        frame = tab.frame_locator("iframe")
        frame.locator(".vz-root[data-ready='1']").wait_for(timeout=60000)
        assert frame.locator(".vz-head-canvas").count() == 1
        assert tab.evaluate("window.__pwned") is None
        assert errors == []
    finally:
        opened_ctx.close()


# ---------------------------------------------------------------------------
# Large inputs: page size and time to first paint (printed, never asserted)
# ---------------------------------------------------------------------------

def paint_times(opened):
    return opened.page.evaluate("""() => {
        const paint = {};
        performance.getEntriesByType('paint').forEach(e => paint[e.name] = e.startTime);
        const ready = performance.getEntriesByName('vz-ready')[0];
        return {fcp: paint['first-contentful-paint'], ready: ready && ready.startTime};
    }""")


def report(name, page, opened):
    times = paint_times(opened)
    line = "{}: page {:.1f} MB, tokens in blocks of {}, {} maps, first contentful paint {:.0f} ms, " \
           "ready {:.0f} ms".format(name, page.nbytes / 1e6, page.info["block"], page.info["dtype"],
                                    times["fcp"] or -1, times["ready"] or -1)
    print(line)
    os.makedirs(SHOTS, exist_ok=True)
    with open(os.path.join(SHOTS, "large_inputs.txt"), "a") as fh:
        fh.write(line + "\n")


def test_large_image_view_12_layers_12_heads_1024_patches(browser, tmp_path):
    from visualizer import views

    rng = np.random.default_rng(3)
    side, prefix, heads, count = 32, 1, 12, 12
    n = prefix + side * side
    # local attention around each patch plus noise, so the page has something to show
    yy, xx = np.divmod(np.arange(side * side), side)
    dist = (yy[:, None] - yy[None]) ** 2 + (xx[:, None] - xx[None]) ** 2
    logits = np.zeros((n, n), np.float32)
    logits[prefix:, prefix:] = -dist / 8.0
    layers = []
    for _ in range(count):
        noise = rng.standard_normal((1, heads, n, n), dtype=np.float32)
        layers.append(softmax(logits + noise))
    image = (rng.random((512, 512, 3)) * 255).astype(np.uint8)
    page = views.image_view(layers, image, grid=side)
    path = page.save(str(tmp_path / "large_image.html"))
    opened = Opened(browser, path)
    try:
        report("image view, 12 layers x 12 heads x 1025 tokens", page, opened)
        before = opened.readout("data-values")
        canvas = opened.page.query_selector(".vz-image-canvas")
        box = canvas.bounding_box()
        opened.page.mouse.move(box["x"] + 200, box["y"] + 200)
        after = opened.values()
        assert opened.readout("data-values") != before
        # pooled rows keep their sums: the patch share plus the prefix share is the row's total
        prefix_values = [float(v) for v in opened.readout("data-prefix-values").split(",")]
        assert abs(after.sum() + sum(prefix_values) - 1) < 0.02
        opened.shot("large_image_view")
        opened.check_clean()
    finally:
        opened.close()


def test_large_head_view_4096_tokens(browser, tmp_path):
    from visualizer import views

    rng = np.random.default_rng(4)
    n, heads = 4096, 12
    tokens = ["t{}".format(i) for i in range(n)]
    # causal, peaked on the previous few tokens
    idx = np.arange(n)
    base = np.where(idx[None] <= idx[:, None], -np.abs(idx[:, None] - idx[None]) / 16.0, -np.inf)
    layer = np.empty((1, heads, n, n), np.float32)
    for h in range(heads):
        layer[0, h] = softmax(base.astype(np.float32) + rng.standard_normal((n, n), dtype=np.float32))
    page = views.head_view([layer], tokens)
    path = page.save(str(tmp_path / "large_head.html"))
    opened = Opened(browser, path)
    try:
        report("head view, 1 layer x 12 heads x 4096 tokens", page, opened)
        hover_token(opened, 100)
        values = opened.values()
        assert abs(values.sum() - 1) < 0.02  # a pooled row keeps its sum
        assert opened.readout("data-token").startswith("{}-".format(100 * page.info["block"]))
        opened.shot("large_head_view")
        opened.check_clean()
    finally:
        opened.close()


def test_relevance_view_shows_each_method_and_output(browser, tmp_path, text_layers):
    from visualizer import views

    _, tokens = text_layers
    rng = np.random.default_rng(1)
    rows = {"relevance": rng.random((2, len(tokens))).astype(np.float32),
            "rollout": rng.random((2, len(tokens))).astype(np.float32)}
    path = views.relevance_view(rows, tokens, targets=["'sat'", "[SEP]"], positions=[4, 8],
                                title="relevance").save(str(tmp_path / "relevance.html"))
    opened = Opened(browser, path)
    try:
        np.testing.assert_array_equal(opened.values(), rows["relevance"][0])
        # explaining the token at position 4: it is outlined and those after it are greyed
        assert opened.page.get_attribute(".vz-tok >> nth=4", "class") == "vz-tok vz-current"
        assert "vz-future" in opened.page.get_attribute(".vz-tok >> nth=5", "class")
        opened.page.select_option(".vz-controls select >> nth=1", "1")
        opened.page.select_option(".vz-controls select >> nth=0", "1")
        assert opened.readout("data-method") == "rollout" and opened.readout("data-target") == "1"
        np.testing.assert_array_equal(opened.values(), rows["rollout"][1])
        assert opened.page.evaluate("window.__pwned") is None
        opened.shot("relevance_view_tokens")
        opened.check_clean()
    finally:
        opened.close()
    image = np.zeros((64, 64, 3), dtype=np.uint8)
    image[16:48, 24:40] = 255
    cls_row = np.concatenate([[0.0], rng.random(16)]).astype(np.float32)
    path = views.relevance_view(cls_row, image=image).save(str(tmp_path / "relevance_image.html"))
    opened = Opened(browser, path)
    try:
        np.testing.assert_array_equal(opened.values(), cls_row)
        assert "patch (row" in opened.page.inner_text(".vz-readout")
        opened.shot("relevance_view_image")
        opened.check_clean()
    finally:
        opened.close()
