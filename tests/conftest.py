"""Shared test helpers.

The core tests run in environments that hold only bytecode, pytest and
numpy; tests that need torch, timm, transformers or matplotlib call
``require(...)``, which skips there.  The full CI run sets
``VISUALIZER_REQUIRE_ALL=1``, and then a missing library fails the test
instead of skipping it, so nothing is skipped silently where it should run.
"""
import importlib
import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from visualizer._get_local import GetLocal  # noqa: E402


def require(name):
    """Import and return module ``name``, or skip (fail under VISUALIZER_REQUIRE_ALL=1)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("VISUALIZER_REQUIRE_ALL"):
            pytest.fail("{} is required in this environment: {}".format(name, exc))
        pytest.skip("{} is not installed".format(name))


@pytest.fixture
def gl():
    """A fresh, active get_local, deactivated afterwards (restoring original code)."""
    instance = GetLocal()
    instance.activate()
    yield instance
    instance.deactivate()


@pytest.fixture
def seam(gl):
    """A fresh get_local with every attention preset watched (the kernel seam on).

    Inactive until a test captures (``seam.capture()``); the presets are undone afterwards.
    """
    gl.deactivate()
    gl.watch_attention()
    yield gl
    gl.unwatch_attention()


@pytest.fixture
def no_warnings():
    """Fail the test if it emits any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield
