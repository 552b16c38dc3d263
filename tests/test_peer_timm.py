"""A peer's test suite under capture: timm's own model tests, with get_local on.

This module is two things:

* a pytest plugin that ``.ci/peer-timm`` loads (``-p test_peer_timm``) into a
  run of timm's ``tests/test_models.py`` (from timm's source distribution,
  unedited): at start it turns on ``get_local.watch_attention()`` and
  ``get_local.activate()``; after each test it counts what was captured and
  clears the cache; at the end it prints one line (tests passed and failed,
  attention maps captured) and makes the run fail if nothing was captured, or
  if a forward or backward test of a model captured nothing;
* the unit tests of that plugin (below), which run in the repository's own
  suite.
"""
import pytest

# Markers timm's test_models.py uses (pyproject.toml of timm, plus pytest-timeout's),
# registered here so that the run needs neither timm's config nor pytest-timeout.
TIMM_MARKERS = ("base", "forward", "backward", "cfg", "cfg_nonstd", "torchscript", "features",
                "fxforward", "fxbackward", "timeout")

# Tests that run the model's Python forward on a real input: each must capture.
MUST_CAPTURE = ("test_model_forward[", "test_model_backward[")

# timm tests that fail under capture because of a known visualizer bug, each
# marked xfail(strict=True) in the peer run with the test in this file that
# reproduces it; when the bug is fixed, the peer run fails until the entry goes.
KNOWN_FAILURES = {
    # Empty since torch.compile(fullgraph=True) traces captures (it failed
    # test_swin_family_compile_resize_guards; see test_compile_fullgraph_of_a_watched_model).
}


class PeerCapture:
    """Capture with the presets on during a test session; count captures per test."""

    def __init__(self, get_local):
        self.get_local = get_local
        self.per_test = {}

    def start(self):
        self.get_local.watch_attention()
        self.get_local.activate()

    def stop(self):
        self.get_local.deactivate()
        self.get_local.unwatch_attention()

    def after_test(self, nodeid):
        """Count this test's captures, then clear the cache (keeping memory flat)."""
        self.per_test[nodeid] = sum(len(values) for values in self.get_local.cache.values())
        self.get_local.clear()

    @property
    def total(self):
        return sum(self.per_test.values())

    def silent(self, passed):
        """The passed tests that had to capture and captured nothing."""
        return sorted(nodeid for nodeid in passed
                      if any(m in nodeid for m in MUST_CAPTURE) and not self.per_test.get(nodeid))

    def problems(self, passed):
        out = []
        if not self.total:
            out.append("no attention map was captured in the whole run")
        silent = self.silent(passed)
        if silent:
            out.append("captured nothing in: " + ", ".join(silent))
        return out

    def summary(self, counts, passed):
        """The one line ``.ci/peer-timm`` prints at the end."""
        capturing = sum(1 for n in self.per_test.values() if n)
        line = ("peer-timm: {passed} passed, {failed} failed, {skipped} skipped, "
                "{xfailed} xfailed (known visualizer bugs), {errors} errors; "
                "{total} attention maps captured in {capturing} of {tests} tests").format(
                    total=self.total, capturing=capturing, tests=len(self.per_test), **counts)
        problems = self.problems(passed)
        return line + ("" if not problems else "; FAIL: " + "; ".join(problems))


_peer = None


def _counts(stats):
    return {"passed": len(stats.get("passed", [])), "failed": len(stats.get("failed", [])),
            "skipped": len(stats.get("skipped", [])), "xfailed": len(stats.get("xfailed", [])),
            "errors": len(stats.get("error", []))}


def _passed(stats):
    return [report.nodeid for report in stats.get("passed", []) if report.when == "call"]


def pytest_configure(config):
    global _peer
    if config.pluginmanager.get_plugin("test_peer_timm") is None:
        return  # collected as a test module of this repository, not loaded with -p
    for marker in TIMM_MARKERS:
        config.addinivalue_line("markers", "{}: timm test marker".format(marker))
    from visualizer import get_local

    _peer = PeerCapture(get_local)
    _peer.start()


def pytest_collection_modifyitems(session, config, items):
    if _peer is None:
        return
    for item in items:
        reason = KNOWN_FAILURES.get(item.originalname)
        if reason is not None:
            item.add_marker(pytest.mark.xfail(reason=reason, strict=True))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    if _peer is not None:
        _peer.after_test(item.nodeid)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _peer is not None:
        stats = terminalreporter.stats
        verbose = config.getoption("verbose") > 0  # -v with -q: every test's count
        for nodeid, n in sorted(_peer.per_test.items()):
            if verbose or not n:
                terminalreporter.write_line("peer-timm: {:5d} maps  {}".format(n, nodeid))
        terminalreporter.write_line(_peer.summary(_counts(stats), _passed(stats)))


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    if _peer is None:
        return
    _peer.stop()
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    stats = reporter.stats if reporter is not None else {}
    if _peer.problems(_passed(stats)) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- unit tests of the plugin ------------------------------------------------------------

def test_the_plugin_counts_captures_per_test_and_clears_the_cache():
    from conftest import require

    torch = require("torch")
    timm = require("timm")
    from visualizer._get_local import GetLocal

    peer = PeerCapture(GetLocal())
    peer.start()
    try:
        model = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        peer.after_test("tests/test_models.py::test_model_forward[1-vit_tiny_patch16_224]")
        assert all(values == [] for values in peer.get_local.cache.values())
        peer.after_test("tests/test_models.py::test_model_forward_torchscript[1-vit]")
    finally:
        peer.stop()
    assert not peer.get_local.active and peer.get_local.watched() == {}
    assert peer.per_test == {
        "tests/test_models.py::test_model_forward[1-vit_tiny_patch16_224]": 12,
        "tests/test_models.py::test_model_forward_torchscript[1-vit]": 0}
    passed = list(peer.per_test)
    assert peer.problems(passed) == []  # torchscript tests need not capture
    line = peer.summary({"passed": 2, "failed": 0, "skipped": 1, "xfailed": 0, "errors": 0},
                        passed)
    assert line == ("peer-timm: 2 passed, 0 failed, 1 skipped, 0 xfailed (known visualizer "
                    "bugs), 0 errors; 12 attention maps captured in 1 of 2 tests")


def test_the_plugin_fails_a_run_without_captures():
    from visualizer._get_local import GetLocal

    peer = PeerCapture(GetLocal())
    forward = "t.py::test_model_backward[2-vit_tiny_patch16_224]"
    peer.after_test(forward)
    assert peer.problems([forward]) == [
        "no attention map was captured in the whole run", "captured nothing in: " + forward]
    assert peer.summary({"passed": 1, "failed": 0, "skipped": 0, "xfailed": 0, "errors": 0},
                        [forward]).endswith("FAIL: no attention map was captured in the "
                                            "whole run; captured nothing in: " + forward)


# -- what the peer suite found -------------------------------------------------------------

def test_compile_fullgraph_of_a_watched_model(gl):
    """timm's test_swin_family_compile_resize_guards failed under capture, before captures
    could be traced: fullgraph=True forbade the graph break they were."""
    from conftest import require

    torch = require("torch")
    timm = require("timm")
    np = require("numpy")

    torch._dynamo.reset()
    gl.deactivate()
    gl.watch_attention()
    try:
        model = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False).eval()
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            with gl.capture() as eager:
                want = model(x)
            compiled = torch.compile(model, backend="eager", fullgraph=True)
            with gl.capture() as cache:
                out = compiled(x)
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
        maps = cache["WindowAttention.forward"]
        assert len(maps) == len(eager["WindowAttention.forward"]) == 12
        for got, ref in zip(maps, eager["WindowAttention.forward"]):
            np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    finally:
        gl.unwatch_attention()
        torch._dynamo.reset()
