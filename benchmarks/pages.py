"""Time to first paint of the view pages with real text's worst tokens, in headless Chromium.

    python -m benchmarks.pages          # prints one line per page; exits 1 past the bound

Each page (head, model and generation view, 12 tokens and 4 heads) is made
once with ordinary tokens and once with one token of 5,000 and of 20,000
characters (a minified line, a URL: what tokenizers of code produce), and
opened from a file in Debian's Chromium (``$VISUALIZER_CHROMIUM``) driven by
playwright, the network refused.  Printed: first contentful paint and the
page's own ``vz-ready`` mark (the end of its first drawing), each the
median of ``--rounds`` fresh page loads, and the page's width.  A page that
takes longer than ``--bound`` seconds (generous: the aim is under 1 s)
fails the run, so a quadratic slip is caught without a timed unit test.
"""
import argparse
import os
import pathlib
import statistics
import sys
import tempfile

import numpy as np

CHROMIUM = os.environ.get("VISUALIZER_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
        "--disable-background-networking", "--disable-component-update"]
TIMES = """() => {
    const paint = {};
    performance.getEntriesByType('paint').forEach(e => paint[e.name] = e.startTime);
    const ready = performance.getEntriesByName('vz-ready')[0];
    return {fcp: paint['first-contentful-paint'] || -1, ready: ready ? ready.startTime : -1,
            width: document.documentElement.scrollWidth};
}"""


def pages(folder):
    """``[(name, path)]``: each view with ordinary tokens and with one long token."""
    from visualizer import views

    rng = np.random.default_rng(0)
    n = 12
    scores = np.where(np.tril(np.ones((n, n), bool)), rng.normal(size=(1, 4, n, n)), -np.inf)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    layers = [(e / e.sum(-1, keepdims=True)).astype(np.float32)] * 2
    out = []
    for length in (0, 5000, 20000):
        tokens = ["tok{}".format(i) for i in range(n)]
        if length:
            tokens[5] = ("https://example.org/" + "a1/" * length)[:length]
        for view in ("head", "model", "generation"):
            if view == "generation":
                page = views.generation_view(layers, tokens, prompt_length=4)
            else:
                page = getattr(views, view + "_view")(layers, tokens)
            name = "{} view, {}".format(
                view, "ordinary tokens" if not length else "a {:,}-character token".format(length))
            out.append((name, page.save(os.path.join(folder, "{}-{}.html".format(view, length)))))
    return out


def measure(browser, path, rounds):
    fcp, ready, width = [], [], 0
    for _ in range(rounds):
        context = browser.new_context(viewport={"width": 1100, "height": 800})
        context.route("**/*", lambda route: route.continue_()
                      if route.request.url.startswith(("file:", "data:")) else route.abort())
        page = context.new_page()
        page.goto(pathlib.Path(path).as_uri(), timeout=300000)
        page.wait_for_selector(".vz-root[data-ready='1']", timeout=300000)
        times = page.evaluate(TIMES)
        fcp.append(times["fcp"])
        ready.append(times["ready"])
        width = times["width"]
        context.close()
    return statistics.median(fcp), statistics.median(ready), width


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bound", type=float, default=3.0,
                        help="fail if a page's first paint takes longer (seconds)")
    args = parser.parse_args(argv)
    from playwright.sync_api import sync_playwright

    slow = []
    with tempfile.TemporaryDirectory() as folder, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        print("| page | first contentful paint | ready | page width |")
        print("|---|---:|---:|---:|")
        for name, path in pages(folder):
            fcp, ready, width = measure(browser, path, args.rounds)
            print("| {} | {:.0f} ms | {:.0f} ms | {} px |".format(name, fcp, ready, width),
                  flush=True)
            if max(fcp, ready) > args.bound * 1000:
                slow.append(name)
        browser.close()
    if slow:
        print("slower than {} s: {}".format(args.bound, "; ".join(slow)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
