"""The notebooks, executed top to bottom in a real kernel, as CI runs them.

Every ``notebooks/*.ipynb`` runs headless with nbclient (kernel ``python3``,
working directory ``notebooks/``, no network: ``HF_HUB_OFFLINE=1``).  Any
error in any cell fails the test, and so does a notebook that shows no
figures, so a notebook that silently draws nothing cannot pass.  The
committed files must have their outputs cleared.
"""
import glob
import os

import pytest

from conftest import ROOT, require

NOTEBOOK_DIR = os.path.join(ROOT, "notebooks")
NOTEBOOKS = sorted(glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
CELL_TIMEOUT = 600  # seconds; the first import of torch on a cold disk is slow


def test_there_are_notebooks():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    assert len(names) >= 2, names
    assert {"vit_attention.ipynb", "bert_attention.ipynb",
            "generation_attention.ipynb"} <= set(names)


def code_cells(nb):
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def images(nb):
    """The PNG outputs of every cell: displayed figures and figures left as a cell's value."""
    return [output for cell in code_cells(nb) for output in cell.get("outputs", [])
            if output.get("output_type") in ("display_data", "execute_result")
            and "image/png" in output.get("data", {})]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_committed_clean(path):
    nbformat = require("nbformat")
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, \
            "{}: clear the outputs before committing (cell {!r})".format(path, cell.get("id"))
    setup = code_cells(nb)[0].source
    # Installs on Colab only, from the wheel built in a clone (no URL); else the checkout.
    assert "ON_COLAB = \"google.colab\" in sys.modules" in setup
    assert "if ON_COLAB:\n" in setup and "%pip install -q \"{WHEEL}[" in setup
    assert "git+" not in setup and "http" not in setup
    assert "sys.path.insert(0, os.path.abspath(\"..\"))" in setup


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
    nbformat = require("nbformat")
    nbclient = require("nbclient")
    require("ipykernel")
    require("matplotlib")
    require("torch")
    # The kernel inherits this environment: no downloads, no GUI backend.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": NOTEBOOK_DIR}})
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    errors = [output for cell in code_cells(nb) for output in cell.outputs
              if output.output_type == "error"]
    assert errors == []
    assert all(cell.execution_count for cell in code_cells(nb)), "a cell did not run"
    assert len(images(nb)) >= 5, "the notebook showed {} figures".format(len(images(nb)))
