"""A view shown in a real Jupyter kernel: the cell's HTML output carries the whole page.

The output is an ``<iframe srcdoc>`` (no require.js, no CDN), which Jupyter,
JupyterLab, VS Code and Colab all render; test_pages.py opens the same output
in Chromium.  Here the kernel's output is unescaped and compared with the page
made in this process from the same arrays.
"""
import html
import os
import re

from conftest import ROOT, require

from test_views import HOSTILE, page_data

CELL = '''
import sys
sys.path.insert(0, {root!r})
import numpy as np
from visualizer import views
tokens = {tokens!r}
layers = [np.full((1, 2, 4, 4), 0.25, dtype=np.float32), np.stack([np.eye(4, dtype=np.float32)] * 2)[None]]
views.head_view(layers, tokens, title=tokens[0])
'''


def test_the_notebook_output_is_the_page():
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    require("ipykernel")
    import numpy as np

    from visualizer import views

    tokens = HOSTILE[:2] + ["a", "b"]
    nb = nbformat.v4.new_notebook()
    nb.cells.append(nbformat.v4.new_code_cell(CELL.format(root=ROOT, tokens=tokens)))
    nbclient.NotebookClient(nb, kernel_name="python3", timeout=300,
                            resources={"metadata": {"path": ROOT}}).execute()
    (output,) = [o for o in nb.cells[0].outputs if o.output_type == "execute_result"]
    shown = output.data["text/html"]
    assert shown.startswith("<iframe srcdoc=") and 'sandbox="allow-scripts"' in shown
    srcdoc = html.unescape(re.match(r'<iframe srcdoc="(.*?)" sandbox', shown, re.S).group(1))
    layers = [np.full((1, 2, 4, 4), 0.25, dtype=np.float32), np.stack([np.eye(4, dtype=np.float32)] * 2)[None]]
    expected = views.head_view(layers, tokens, title=tokens[0])
    assert page_data(srcdoc) == page_data(expected.html)
    # the page's scripts travel with it: nothing to load from anywhere
    assert "VZ.start(" in srcdoc and "require(" not in srcdoc and "src=\"http" not in srcdoc
    assert "text/plain" in output.data and "Page head view" in output.data["text/plain"]
    assert os.path.isdir(ROOT)
