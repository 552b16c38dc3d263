"""Assemble one self-contained HTML page: our CSS and JavaScript inlined, the data as escaped JSON.

The page loads nothing: no CDN, no require.js, no fonts, no network.  Its
scripts are the files beside this module (``common.js`` and one
``<view>_view.js`` per view, plain JavaScript with no framework), read once
and inlined.  The data goes into ``<script type="application/json">``, which
the browser never runs; in it ``<``, ``>``, ``&`` and the line separators
U+2028/U+2029 are written as ``\\u003c``-style escapes, so a token such as
``</script><script>...`` cannot end the element, and the scripts put token
text on the page only through ``textContent`` and canvas ``fillText``, never
as HTML.  The title is HTML-escaped.
"""
import html
import json
import os
import uuid

HERE = os.path.dirname(os.path.abspath(__file__))

VIEWS = ("head", "model", "image", "generation", "relevance")

_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}

_cache = {}


def asset(name):
    """Return the text of the asset ``name`` (a file beside this module), read once."""
    if name not in _cache:
        with open(os.path.join(HERE, name), encoding="utf-8") as fh:
            text = fh.read()
        # Our own scripts must not be able to close their element either.
        lowered = text.lower()
        if "</script" in lowered or "<!--" in lowered:
            raise RuntimeError("the page asset {} contains '</script' or '<!--'".format(name))
        _cache[name] = text
    return _cache[name]


def script_json(data):
    """Return ``data`` as JSON that is safe inside ``<script type="application/json">``.

    >>> script_json({"t": "</script><b>"})
    '{"t": "\\\\u003c/script\\\\u003e\\\\u003cb\\\\u003e"}'
    """
    text = json.dumps(data, ensure_ascii=False, allow_nan=False)
    for char, escaped in _JSON_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


def render(view, data, title):
    """Return the whole HTML document of ``view`` (one of ``VIEWS``)."""
    if view not in VIEWS:
        raise ValueError("unknown view {!r}".format(view))
    uid = uuid.uuid4().hex[:12]
    scripts = [asset("common.js"), asset("head_view.js")]
    if view != "head":
        scripts.append(asset("{}_view.js".format(view)))
    data = dict(data, view=view, title=title)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<title>{title}</title><style>{css}</style></head>\n"
        "<body><div class=\"vz-root\" id=\"vz-{uid}\"></div>\n"
        "<script type=\"application/json\" id=\"vz-data-{uid}\">{data}</script>\n"
        "<script>{js}\nVZ.start(\"{uid}\");</script>\n</body></html>\n"
    ).format(title=html.escape(title, quote=True), css=asset("page.css"), uid=uid,
             data=script_json(data), js="\n".join(scripts))


def iframe(page, height):
    """Return ``page`` inside an ``<iframe srcdoc>`` for notebooks (no require.js needed).

    ``sandbox="allow-scripts"`` runs the page's scripts in an opaque origin:
    the page cannot reach the notebook around it, and works the same in
    Jupyter, JupyterLab, VS Code and Colab, which all render HTML outputs.
    """
    return ("<iframe srcdoc=\"{}\" sandbox=\"allow-scripts\" "
            "style=\"width: 100%; height: {}px; border: 0;\"></iframe>").format(
                html.escape(page, quote=True), int(height))
