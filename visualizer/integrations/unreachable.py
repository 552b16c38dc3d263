"""Attention that runs where capture cannot reach: counted while capturing, named at the end.

The seam sees ``F.scaled_dot_product_attention`` and the presets see Python
code; four ways of running a model leave both behind, and each passes one
Python-level door that this module counts calls through, only while capture
is on (off: every door is torch's own again, nothing is left in place):

* **TorchScript** (``torch.jit.script``/``trace``): a ``ScriptModule`` runs its
  graph in C++; the door is ``ScriptModule.__call__`` (the outermost module).
* **An exported program** (``torch.export.export(model, ...).module()``) or
  another fx graph (``torch.fx.symbolic_trace``): a ``GraphModule`` calling
  ATen operators directly; the door is fx's ``_WrappedCall.__call__``, through
  which every ``GraphModule`` call goes (torch.compile's own lazy graph
  modules excepted: ``compile`` speaks for them).
* **A custom operator** (``torch.library.custom_op``, ``torch.ops.mylib.attn``):
  the door is ``OpOverload.__call__`` and ``OpOverloadPacket.__call__``; only
  operators outside torch's own namespaces whose name says attention count,
  and only calls during which the seam took no call (a kernel written in
  Python that calls ``F.scaled_dot_product_attention`` is captured there).
* **transformers' other attention functions** (``flash_attention_2/3/4``, a
  hub kernel ``'kernels-community/...'``, one a user registers with
  ``AttentionInterface.register``): each entry of ``ALL_ATTENTION_FUNCTIONS``
  but sdpa, eager, flex and paged (captured at the seam, by the presets or by
  their own integration) is wrapped in its table; a call during which the
  seam took no call counts.  (Here rather than in ``transformers``: it is
  the same door as the others; only the table is transformers'.)
* **xformers** (``xformers.ops.memory_efficient_attention``): never imported
  here; when the user's code has imported ``xformers.ops``, its attention
  functions are wrapped on that module (a reference taken before capture
  started is not seen).

A scripted or exported module counts only where its graph computes attention
(a softmax or a fused attention kernel); that is read once per module, at
the end of ``capture()``, and only when the capture holds nothing.  The end
of ``capture()`` warns with the cause and the fix (``State.report_silent``).
"""
import sys
import weakref

from .._state import Extension

__all__ = ["ATTENTION_WORDS", "Unreachable", "graph_computes_attention"]

# Words in an operator's or a node's name that say it computes attention.
ATTENTION_WORDS = ("attention", "attn", "sdpa", "softmax", "flash", "mha")
# Namespaces of torch's own operators: the seam or a preset sees their callers.
_TORCH_NAMESPACES = frozenset({"aten", "prims", "prim", "quantized", "_quant", "visualizer",
                               "higher_order", "inductor", "profiler", "_c10d_functional",
                               "c10d", "c10d_functional", "mkldnn", "onednn"})
_XFORMERS = ("memory_efficient_attention", "memory_efficient_attention_forward",
             "memory_efficient_attention_forward_requires_grad")

TORCHSCRIPT = ("TorchScript", "a TorchScript module (torch.jit.script/trace) ran while capturing "
               "and computes attention in C++, where nothing Python can be captured: capture "
               "from the eager model (the module before torch.jit.script/trace).")
EXPORTED = ("an exported program or fx graph", "a torch.fx GraphModule (torch.export.export("
            "model, ...).module(), torch.fx.symbolic_trace) ran while capturing; it calls "
            "ATen's attention kernels directly, past the seam: capture from the eager model "
            "you exported or traced.")
XFORMERS = ("xformers", "xformers.ops.memory_efficient_attention ran while capturing; "
            "visualizer cannot see into xformers' kernels: run the model with PyTorch's "
            "scaled_dot_product_attention (transformers: attn_implementation='sdpa'; diffusers: "
            "pipe.disable_xformers_memory_efficient_attention()) while capturing.")


# transformers' attention functions reached without help from this module.
_REACHED = frozenset({"sdpa", "eager", "flex_attention"})


def transformers_kernel(key, function):
    """The cause and fix for transformers' attention function registered as ``key``."""
    return ("transformers attn_implementation={!r}".format(key),
            "transformers ran its {!r} attention ({}) while capturing; that kernel (flash-attn, "
            "a hub kernel or one you registered) gives back no probabilities visualizer can "
            "reach: load or switch the model with attn_implementation='sdpa' while capturing "
            "(model.set_attn_implementation('sdpa')); README 'flash-attn' says what is "
            "planned.".format(key, getattr(function, "__qualname__", function)))


class _Item:
    """A dict's entry as an attribute, for the undo list."""

    def __init__(self, table):
        self.table = table

    def __setattr__(self, name, value):
        if name == "table":
            object.__setattr__(self, name, value)
        else:
            self.table[name] = value


def custom_op(name):
    """The cause and fix for a custom operator ``name`` (``'mylib::attention'``)."""
    return ("custom operator {}".format(name),
            "the custom operator {} ran while capturing; its kernel is opaque to visualizer. "
            "Capture from a Python function that computes the same attention (for a "
            "torch.library.custom_op, the function it wraps), e.g. with F.scaled_dot_product_"
            "attention, which the seam captures.".format(name))


def _says_attention(name):
    lowered = name.lower()
    return any(word in lowered for word in ATTENTION_WORDS)


def graph_computes_attention(module):
    """Whether a scripted module's or a GraphModule's graph computes attention (or softmax)."""
    graph = getattr(module, "graph", None)
    try:
        if hasattr(graph, "nodes") and not callable(graph.nodes):  # an fx graph
            return any(_says_attention(str(node.target)) for node in graph.nodes)
        text = str(module.inlined_graph)  # TorchScript: submodules inlined
    except Exception:
        return True  # cannot tell: say so rather than stay silent
    return _says_attention(text)


class Unreachable(Extension):
    """Counts calls through the doors above while capture is on (see the module)."""

    def __init__(self):
        self.undo = []  # (owner, attribute, original) to put back when capture stops

    def start(self, state):
        torch = sys.modules.get("torch")
        if torch is not None:
            self._torch(state, torch)
        utils = sys.modules.get("transformers.modeling_utils")
        interface = getattr(utils, "AttentionInterface", None)
        if isinstance(getattr(interface, "_global_mapping", None), dict):
            self._transformers(state, interface._global_mapping)
        ops = sys.modules.get("xformers.ops")
        if ops is not None:
            self._xformers(state, [ops, sys.modules.get("xformers.ops.fmha")])

    def stop(self, state):
        while self.undo:
            owner, attribute, original = self.undo.pop()
            if original is None:  # inherited: the owner had none of its own
                delattr(owner, attribute)
            else:
                setattr(owner, attribute, original)

    def _wrap(self, owner, attribute, make):
        own = vars(owner).get(attribute)
        original = own if own is not None else getattr(owner, attribute, None)
        if original is None:
            return
        setattr(owner, attribute, make(original))
        self.undo.append((owner, attribute, own))

    def _torch(self, state, torch):
        seen = weakref.WeakKeyDictionary()  # scripted and graph modules run: their cause

        def door(cause, skip=()):
            def make(original):
                def __call__(self, *args, **kwargs):
                    try:
                        module = args[0] if cause is EXPORTED else self
                        if module not in seen and not isinstance(module, skip):
                            seen[module] = cause
                            state.unreached_modules[weakref.ref(module)] = (
                                cause, graph_computes_attention)
                    except TypeError:
                        pass
                    return original(self, *args, **kwargs)
                return __call__
            return make

        script = getattr(getattr(torch, "jit", None), "ScriptModule", None)
        if script is not None:
            self._wrap(script, "__call__", door(TORCHSCRIPT))
        fx = sys.modules.get("torch.fx.graph_module")
        if fx is not None and hasattr(fx, "_WrappedCall"):
            # torch.compile's own graphs (dynamo, AOT) are lazy graph modules: the
            # compile integration speaks for them.
            lazy = getattr(sys.modules.get("torch.fx._lazy_graph_module"), "_LazyGraphModule", ())
            self._wrap(fx._WrappedCall, "__call__", door(EXPORTED, skip=lazy))
        ops = sys.modules.get("torch._ops")
        for name in ("OpOverload", "OpOverloadPacket"):
            cls = getattr(ops, name, None)
            if cls is not None:
                self._wrap(cls, "__call__", self._op_door(state))

    @staticmethod
    def _op_door(state):
        verdicts = {}  # qualified name -> the cause, or None: torch's own or not attention

        def make(original):
            def __call__(self, /, *args, **kwargs):
                try:
                    name = getattr(self, "_qualified_op_name", None) or self.name()
                    cause = verdicts.get(name, False)
                    if cause is False:
                        namespace = name.split("::", 1)[0]
                        cause = verdicts[name] = custom_op(name) if (
                            namespace not in _TORCH_NAMESPACES and _says_attention(name)) \
                            else None
                except Exception:
                    cause = None
                if cause is None:
                    return original(self, *args, **kwargs)
                taken = state.calls_taken
                result = original(self, *args, **kwargs)
                if state.calls_taken == taken:  # a Python kernel calling the seam is seen
                    state.unreached[cause] = state.unreached.get(cause, 0) + 1
                return result
            return __call__
        return make

    def _transformers(self, state, table):
        for key, function in list(table.items()):
            if key in _REACHED or key.startswith("paged|") or not callable(function):
                continue
            cause = transformers_kernel(key, function)

            def counted(*args, __original=function, __cause=cause, **kwargs):
                taken = state.calls_taken
                result = __original(*args, **kwargs)
                if state.calls_taken == taken:  # one that calls torch's sdpa is seen
                    state.unreached[__cause] = state.unreached.get(__cause, 0) + 1
                return result
            counted.__wrapped__ = function
            table[key] = counted
            self.undo.append((_Item(table), key, function))

    def _xformers(self, state, modules):
        def make(original):
            def counted(*args, **kwargs):
                state.unreached[XFORMERS] = state.unreached.get(XFORMERS, 0) + 1
                return original(*args, **kwargs)
            counted.__wrapped__ = original
            return counted

        for module in modules:
            if module is None:
                continue
            for name in _XFORMERS:
                if callable(module.__dict__.get(name)):
                    self._wrap(module, name, make)
