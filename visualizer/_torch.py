"""What torch's compilers need from capture; nothing here imports torch.

* torch.compile: TorchDynamo cannot trace a code object whose constants hold
  our recorder functions (it stops with "Cannot construct ConstantVariable").
  Marked the way ``torch._dynamo.skip`` marks a function, a captured function
  runs uncompiled inside a compiled model (a graph break at each call), so its
  values are the real ones.  With ``fullgraph=True`` that graph break is an
  error, and dynamo's message says why and what to do.  Marking happens only
  once ``torch._dynamo`` is imported, by torch.compile or anyone else.
* TorchScript: ``torch.jit.script`` compiles a function from its source and
  ``torch.jit.trace`` records a graph; neither runs Python code afterwards, so
  nothing can be captured from the result.  While capture is on, both say so
  with a CaptureWarning when given something under capture.
"""
import functools
import sys
import warnings

from ._errors import CaptureWarning

_MARK = "_torchdynamo_disable"
_MESSAGE = "_torchdynamo_disable_msg"  # shown by dynamo when the graph break is an error
_OURS = "__visualizer_marked__"


def mark(function, code):
    """Tell dynamo to run ``code`` (installed on ``function``) without tracing it."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    if eval_frame is None:
        return False
    eval_frame.skip_code(code)
    if not getattr(function, _MARK, False):
        setattr(function, _MARK, True)
        setattr(function, _MESSAGE, (
            "visualizer's get_local is capturing from {0}, which therefore runs eagerly, "
            "outside the compiled graph. With fullgraph=True, stop capturing first "
            "(get_local.deactivate() or get_local.unwatch), or compile without "
            "fullgraph to capture from the compiled model".format(function.__qualname__)))
        function.__dict__[_OURS] = True
    return True


def unmark(function):
    """Undo ``mark`` on ``function`` (only what we set)."""
    if function.__dict__.pop(_OURS, False):
        function.__dict__.pop(_MARK, None)
        function.__dict__.pop(_MESSAGE, None)


class JitGuard:
    """While on, ``torch.jit.script`` and ``torch.jit.trace`` warn about captured code.

    ``captured(function)`` tells whether a plain function is under capture.
    """

    def __init__(self, captured):
        self.captured = captured
        self.saved = {}

    def on(self, torch=None):
        torch = torch or sys.modules.get("torch")
        jit = getattr(torch, "jit", None)
        if jit is None or self.saved:
            return
        for name, what in (("script", "compiles it to TorchScript"),
                           ("trace", "records a graph of one call")):
            original = getattr(jit, name)
            self.saved[name] = original
            setattr(jit, name, self._guard(original, name, what))

    def off(self):
        jit = getattr(sys.modules.get("torch"), "jit", None)
        for name, original in self.saved.items():
            if jit is not None and getattr(getattr(jit, name), "__wrapped__", None) is original:
                setattr(jit, name, original)
        self.saved = {}

    def _guard(self, original, name, what):
        guard = self

        @functools.wraps(original)
        def guarded(obj, *args, **kwargs):
            names = guard._captured_in(obj)
            if names:
                warnings.warn(
                    "torch.jit.{} {}, which then runs no Python code: calls to the "
                    "result capture nothing from {} (get_local captures only while "
                    "Python runs it{}). Capture from the eager model instead.".format(
                        name, what, ", ".join(sorted(names)),
                        "; this trace's own call is captured" if name == "trace" else ""),
                    CaptureWarning, stacklevel=2)
            return original(obj, *args, **kwargs)

        return guarded

    def _captured_in(self, obj):
        """Qualnames of captured functions that ``obj`` (module or function) runs."""
        functions = []
        modules = getattr(obj, "modules", None)
        if callable(modules):
            try:
                for module in modules():
                    functions.append(getattr(type(module), "forward", None))
            except Exception:  # not an nn.Module after all
                functions = []
        functions.append(getattr(obj, "__func__", obj))
        return {f.__qualname__ for f in functions
                if getattr(f, "__code__", None) is not None and self.captured(f)}
