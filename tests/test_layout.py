"""The shape of the package, read from its source: the core knows no library, no circles.

The core (the capture machinery, the storage, the mathematics of maps) imports
nothing from ``integrations``, ``views`` or ``cli``: those plug into it or sit
on top of it.  And no module of the package imports, directly or through
others, a module that imports it back (lazy imports inside functions count).
"""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "visualizer")
UPPER = ("integrations", "views", "cli")


def _modules():
    """``{dotted name: path}`` of every module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                parts = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].split(os.sep)
                if parts[-1] == "__init__":
                    parts = parts[:-1]
                found[".".join(parts)] = path
    return found


def _imports(name, path, modules):
    """The modules of the package that module ``name`` imports (anywhere in its code)."""
    is_package = path.endswith("__init__.py")
    here = name.split(".") if is_package else name.split(".")[:-1]
    with open(path, encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # ``from pkg import sub`` imports the submodule; ``from mod import name`` the module.
            targets = ["{}.{}".format(module, a.name) if "{}.{}".format(module, a.name) in modules
                       else module for a in node.names]
        else:
            continue
        out.update(t for t in targets if t in modules and t != name)
    return out


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _is_core(name):
    parts = name.split(".")
    if name == "visualizer.__main__":
        return False  # the entry point of ``python -m visualizer``: the CLI's
    return len(parts) == 1 or (len(parts) == 2 and parts[1].startswith("_")) or \
        parts[1] in ("events", "storage", "attention")


def test_the_core_imports_nothing_from_integrations_views_or_cli():
    graph = _graph()
    core = sorted(name for name in graph if _is_core(name))
    assert "visualizer._state" in core and "visualizer.storage.npz" in core
    reaching = ["{} imports {}".format(name, target) for name in core
                for target in sorted(graph[name])
                if target.split(".")[1:2] and target.split(".")[1] in UPPER]
    assert not reaching, "the core reaches up: " + "; ".join(reaching)


def test_no_import_circle_in_the_package():
    graph = _graph()
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, "import circles: {}".format(circles)


def test_from_integrations_transformers_import_star():
    namespace = {}
    exec("from visualizer.integrations.transformers import *", namespace)
    import visualizer.integrations.transformers as module

    assert set(module.__all__) <= set(namespace)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_public_name_is_documented(name):
    """Each name in a module's ``__all__`` that is a function or class has a docstring."""
    import importlib
    import inspect

    if name.startswith("visualizer.views") or name.startswith("visualizer.cli") or \
            name in ("visualizer.plotting", "visualizer.generation"):
        pytest.importorskip("numpy")
    try:
        module = importlib.import_module(name)
    except ImportError as exc:  # a module of an optional library (matplotlib, torch)
        pytest.skip("needs {}".format(exc.name))
    assert module.__doc__, "{} has no docstring".format(name)
    missing = [attr for attr in getattr(module, "__all__", ())
               if (inspect.isfunction(getattr(module, attr, None))
                   or inspect.isclass(getattr(module, attr, None)))
               and not inspect.getdoc(getattr(module, attr))]
    assert not missing, "{}: undocumented public names {}".format(name, missing)
