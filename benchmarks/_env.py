"""What every benchmark shares: threads, versions, the machine, presets and anycapture."""
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
THREADS = 2
ANYCAPTURE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "visualizer-bench", "anycapture")
ANYCAPTURE_INSTALL = ("python -m pip install --no-deps --target {} anycapture==0.1.4"
                      .format(ANYCAPTURE_DIR))


def setup_torch(threads=THREADS):
    """Import torch with a fixed number of threads and offline, quiet Hugging Face."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # no bar per model load
    import torch

    torch.set_num_threads(threads)
    return torch


def has_presets():
    """True when ``get_local.watch_attention`` exists (the presets)."""
    from visualizer import get_local

    return hasattr(get_local, "watch_attention")


def watch_timm(get_local):
    """Watch timm's attention probabilities; return the code a user would write."""
    if hasattr(get_local, "watch_attention"):
        get_local.watch_attention()
        return "get_local.watch_attention()"
    get_local.watch("timm.layers.attention.Attention.forward", "attn",
                    overrides={"fused_attn": False})
    return ("get_local.watch('timm.layers.attention.Attention.forward', 'attn', "
            "overrides={'fused_attn': False})")


def watch_timm_eager(get_local):
    """Watch timm's attention on its eager path (what captures inside compiled graphs)."""
    get_local.watch("timm.layers.attention.Attention.forward", "attn",
                    overrides={"fused_attn": False})
    return ("get_local.watch('timm.layers.attention.Attention.forward', 'attn', "
            "overrides={'fused_attn': False})")


def watch_bert(get_local):
    """Watch BERT's attention probabilities; return (code, whether SDPA models switch)."""
    if hasattr(get_local, "watch_attention"):
        get_local.watch_attention()
        return "get_local.watch_attention()", True
    get_local.watch("transformers.models.bert.modeling_bert.eager_attention_forward",
                    "attn_weights", source="module")
    return ("get_local.watch('transformers.models.bert.modeling_bert."
            "eager_attention_forward', 'attn_weights', source='module')"), False


TIMM_KEY = "Attention.forward"
BERT_KEY = "BertSelfAttention.forward"


def load_anycapture(directory):
    """Import anycapture's ``get_local`` from ``directory``, or return the reason it failed.

    The directory goes at the END of ``sys.path`` and only after the real timm
    is imported: anycapture's wheel bundles an old timm that must not shadow it.
    """
    if not os.path.isdir(os.path.join(directory, "anycapture")):
        return None, "not installed: run `{}`".format(ANYCAPTURE_INSTALL)
    import timm

    if directory not in sys.path:
        sys.path.append(directory)
    try:
        from anycapture import get_local as anycapture_get_local
    except Exception as exc:  # report the exact error in the table
        return None, "import failed: {}: {}".format(type(exc).__name__, exc)
    if os.path.abspath(timm.__file__).startswith(os.path.abspath(directory)):
        raise RuntimeError("anycapture's bundled timm shadows the real one: " + timm.__file__)
    return anycapture_get_local, None


def anycapture_version(directory):
    try:
        with open(os.path.join(directory, "anycapture", "__init__.py")) as fh:
            for line in fh:
                if line.startswith("__version__"):
                    return line.split("=")[1].strip().strip("\"'")
    except OSError:
        pass
    return None


def load_average():
    """The 1, 5 and 15 minute load averages: other work on the machine adds noise."""
    try:
        return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "unknown"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "visualizer"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + (" (visualizer/ has uncommitted changes)" if dirty else "")
    except Exception:
        return "unknown"


def describe_machine(anycapture_dir):
    """Lines describing where and with what the benchmark ran."""
    torch = setup_torch()
    versions = ["Python " + platform.python_version(), "torch " + torch.__version__]
    for name in ("timm", "transformers", "numpy", "bytecode"):
        try:
            module = __import__(name)
            versions.append("{} {}".format(name, getattr(module, "__version__", "?")))
        except Exception:
            versions.append(name + " missing")
    any_version = anycapture_version(anycapture_dir)
    if any_version:  # when it is not, the header says so once, with the command to fix it
        versions.append("anycapture " + any_version)
    return [
        "date: " + time.strftime("%Y-%m-%d %H:%M %Z"),
        "load average at start: " + load_average(),
        "machine: {} ({} logical CPUs, {}), {}".format(
            cpu_model(), os.cpu_count(), platform.machine(), platform.platform()),
        "threads: torch.set_num_threads({})".format(torch.get_num_threads()),
        "versions: " + ", ".join(versions),
        "visualizer: git " + git_revision() + (", presets (watch_attention) available"
                                               if has_presets() else ", no presets yet"),
    ]


def child_env():
    """Environment for child processes: the repository importable, offline, fixed threads."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["HF_HUB_OFFLINE"] = "1"
    env["TRANSFORMERS_OFFLINE"] = "1"
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    env["OMP_NUM_THREADS"] = str(THREADS)
    return env


def run_children(commands, parallel=1):
    """Run ``{key: argv}`` from the repository root, ``parallel`` at a time, in order.

    Returns ``{key: stdout}``; raises with the child's stderr if one fails.
    Timed children must run one at a time (``parallel=1``); ``--quick`` runs
    them side by side only to stay fast.
    """
    pending = list(commands.items())
    running = []
    outputs = {}

    def finish(key, proc):
        stdout, stderr = proc.communicate(timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError("child {!r} failed ({}):\n{}".format(
                key, proc.returncode, stderr[-3000:]))
        outputs[key] = stdout

    while pending or running:
        while pending and len(running) < max(1, parallel):
            key, argv = pending.pop(0)
            running.append((key, subprocess.Popen(
                argv, cwd=REPO, env=child_env(), stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True)))
        key, proc = running.pop(0)
        finish(key, proc)
    return outputs
