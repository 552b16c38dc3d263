"""The figures and the page of relevance (what visualizer.attribution returns).

In a file of their own beside test_plotting.py and test_views.py, which other
work edits now; the page in a browser is in test_pages.py.
"""
import json
import re

import pytest

from conftest import require
from visualizer import VisualizerError


def cls_relevance(np, n=17):
    r = np.eye(n)
    r[0, 1:] = np.linspace(0.0, 1.0, n - 1)
    return r


def test_relevance_on_the_image_draws_the_cls_row_share():
    np = require("numpy")
    require("matplotlib")
    from visualizer.plotting import plot_relevance_on_image

    r = cls_relevance(np)
    fig = plot_relevance_on_image(np.stack([r, r]), np.zeros((32, 32, 3)), sample=1)
    heat = fig.axes[0].images[1].get_array()
    assert heat.shape == (32, 32)
    share = r[0, 1:] / r[0, 1:].sum()
    assert np.isclose(heat[0, 0], share[0]) and np.isclose(heat[31, 31], share[-1])
    assert fig.axes[0].get_title() == "relevance for CLS"
    # a vector over the tokens, and a patch's row
    fig = plot_relevance_on_image(r[0], np.zeros((32, 32, 3)))
    assert np.isclose(fig.axes[0].images[1].get_array()[31, 31], share[-1])
    plot_relevance_on_image(r + 0.1, np.zeros((32, 32, 3)), query=(1, 2))


def test_relevance_figures_refuse_what_they_cannot_draw():
    np = require("numpy")
    require("matplotlib")
    from visualizer.plotting import (plot_relevance_maps, plot_relevance_on_image,
                                     plot_token_relevance)

    with pytest.raises(VisualizerError, match="no patch has any relevance"):
        plot_relevance_on_image(np.eye(5), np.zeros((32, 32, 3)))
    with pytest.raises(VisualizerError, match=r"\(T, T\)"):
        plot_relevance_on_image(np.ones((3, 5)), np.zeros((32, 32, 3)))
    with pytest.raises(VisualizerError, match="non-empty dict"):
        plot_relevance_maps([np.eye(5)], np.zeros((32, 32, 3)))
    with pytest.raises(VisualizerError, match="2 tokens for relevance over 3"):
        plot_token_relevance(np.ones(3), ["a", "b"])
    with pytest.raises(VisualizerError, match="pick a row"):
        plot_token_relevance(np.ones((2, 3, 3)), ["a", "b", "c"])


def test_relevance_maps_side_by_side_and_token_strips():
    np = require("numpy")
    require("matplotlib")
    torch = require("torch")
    from visualizer.plotting import plot_relevance_maps, plot_token_relevance

    r = cls_relevance(np)
    fig = plot_relevance_maps({"relevance": torch.tensor(r), "raw attention": r[0]},
                              np.zeros((32, 32, 3)), title="digit")
    assert [ax.get_title() for ax in fig.axes if ax.images] == [
        "the image", "relevance", "raw attention"]
    fig = plot_token_relevance(np.array([[0.0, 2.0, 1.0], [1.0, 0.5, -1.0]]), ["a", "b", "c"],
                               labels=["x", "y"])
    strip = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(strip, [[0.0, 1.0, 0.5], [1.0, 0.5, 0.0]])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["x", "y"]


def page_data(page):
    text = re.search(r'<script type="application/json"[^>]*>(.*?)</script>', page.html, re.S)
    return json.loads(text.group(1))


def test_the_relevance_page_holds_each_methods_rows_exactly():
    np = require("numpy")
    import base64

    from visualizer import views

    rows = {"relevance": np.array([[0.0, 0.6, 0.3, 0.1]]), "rollout": np.ones((1, 4))}
    page = views.relevance_view(rows, ["[CLS]", "a", "cat", "[SEP]"], targets=["class 1"])
    data = page_data(page)
    assert data["view"] == "relevance" and data["methods"] == ["relevance", "rollout"]
    got = np.frombuffer(base64.b64decode(data["values"][0]), dtype="<f4")
    np.testing.assert_array_equal(got, rows["relevance"][0].astype(np.float32))
    assert page.info == {"view": "relevance", "methods": ["relevance", "rollout"],
                         "targets": 1, "tokens": 4}
    image_page = views.relevance_view(np.arange(17.0), image=np.zeros((32, 32, 3)))
    assert image_page.info["grid"] == (4, 4) and image_page.info["prefix"] == 1


def test_the_relevance_page_says_what_is_wrong():
    np = require("numpy")
    from visualizer import views

    with pytest.raises(VisualizerError, match="pick rows"):
        views.relevance_view(np.ones((1, 3, 3)), ["a", "b", "c"])
    with pytest.raises(VisualizerError, match="one shape"):
        views.relevance_view({"a": np.ones(3), "b": np.ones(4)}, ["a", "b", "c"])
    with pytest.raises(VisualizerError, match="each of the 2 explained outputs"):
        views.relevance_view(np.ones((2, 3)), ["a", "b", "c"], targets=["one"])
    with pytest.raises(VisualizerError, match="positions"):
        views.relevance_view(np.ones((1, 3)), ["a", "b", "c"], positions=[7])
    with pytest.raises(VisualizerError, match="tokens"):
        views.relevance_view(np.ones(3))
