"""watch/unwatch on a real package written to disk: by dotted path, no edits to its source."""
import importlib
import sys
import textwrap

import pytest

from visualizer import VisualizerError

SOURCE = '''
import functools

class Attention:
    def __init__(self, scale):
        self.scale = scale

    def forward(self, x):
        attn = [v * self.scale for v in x]
        return sum(attn)

    @staticmethod
    def helper(x):
        doubled = x * 2
        return doubled

    @classmethod
    def build(cls, scale):
        made = cls(scale)
        return made


class Child(Attention):
    pass


def attention_forward(module, x):
    attn_weights = [v + module.scale for v in x]
    return attn_weights[0]


def _traced(fn):
    @functools.wraps(fn)
    def wrapper(*args):
        return fn(*args)
    return wrapper


@_traced
def wrapped(x):
    inner = x + 100
    return inner
'''


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A package 'watchpkg' with module 'watchpkg.model', not imported yet."""
    name = "watchpkg_{}".format(abs(hash(str(tmp_path))) % 10 ** 8)
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "model.py").write_text(textwrap.dedent(SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]


def test_watch_before_import(gl, package):
    assert package + ".model" not in sys.modules
    gl.watch(package + ".model.Attention.forward", "attn")
    model = importlib.import_module(package + ".model")
    assert model.Attention(2).forward([1, 2]) == 6
    assert gl.cache == {"Attention.forward": [[2, 4]]}


def test_watch_after_import_reaches_existing_instances_and_bound_methods(gl, package):
    model = importlib.import_module(package + ".model")
    existing = model.Attention(10)
    bound = existing.forward
    gl.watch(package + ".model.Attention.forward", "attn")
    bound([1])
    model.Child(3).forward([1])
    assert gl.cache == {"Attention.forward": [[10], [3]]}


def test_module_function_static_class_methods_and_wrapped(gl, package):
    model = importlib.import_module(package + ".model")
    gl.watch(package + ".model.attention_forward", "attn_weights")
    gl.watch(package + ".model.Attention.helper", "doubled")
    gl.watch(package + ".model.Attention.build", "made")
    gl.watch(package + ".model.wrapped", "inner")
    module = model.Attention(1)
    model.attention_forward(module, [5])
    model.Attention.helper(4)
    built = model.Attention.build(7)
    model.wrapped(1)
    assert gl.cache["attention_forward"] == [[6]]
    assert gl.cache["Attention.helper"] == [8]
    assert gl.cache["Attention.build"] == [built]
    assert gl.cache["wrapped"] == [101]


def test_watching_twice_captures_once(gl, package):
    path = package + ".model.Attention.forward"
    gl.watch(path, "attn")
    gl.watch(path, "attn")
    model = importlib.import_module(package + ".model")
    model.Attention(1).forward([1])
    assert gl.cache == {"Attention.forward": [[1]]}
    assert gl.watched() == {package + ".model.Attention.forward": ("attn",)}


def test_unwatch_restores_the_original_code_object(gl, package):
    model = importlib.import_module(package + ".model")
    original = model.Attention.forward.__code__
    gl.watch(package + ".model.Attention.forward", "attn")
    assert model.Attention.forward.__code__ is not original
    gl.unwatch(package + ".model.Attention.forward")
    assert model.Attention.forward.__code__ is original
    model.Attention(1).forward([1])
    assert gl.cache == {}
    assert gl.watched() == {}
    gl.activate()  # re-activating must not bring an unwatched function back
    assert model.Attention.forward.__code__ is original


def test_unwatch_of_something_not_watched(gl, package):
    with pytest.raises(ValueError, match="is not being watched"):
        gl.unwatch(package + ".model.Attention.forward")


@pytest.mark.parametrize("suffix, pattern", [
    (".model.Attention.forwrd",
     r"'\w+\.model\.Attention' resolved, but it has no attribute 'forwrd'\. Did you mean 'forward'\?"),
    (".modle.Attention.forward", r"'\w+' resolved, but it has no attribute 'modle'"),
    (".model.Atention.forward", r"Did you mean 'Attention'\?"),
])
def test_path_that_does_not_resolve_says_which_part_failed(gl, package, suffix, pattern):
    with pytest.raises(ValueError, match=pattern) as info:
        gl.watch(package + suffix, "attn")
    assert isinstance(info.value, VisualizerError)


def test_missing_top_level_package(gl):
    with pytest.raises(ValueError, match="no module named 'no_such_package_xyz'"):
        gl.watch("no_such_package_xyz.mod.f", "x")


def test_import_error_inside_the_target_module_propagates(gl, tmp_path, monkeypatch):
    (tmp_path / "broken_mod_xyz.py").write_text("import not_installed_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="not_installed_dependency_xyz"):
        gl.watch("broken_mod_xyz.f", "x")


def test_name_that_is_not_a_local(gl, package):
    with pytest.raises(ValueError, match=r"no local variable 'atn' \(did you mean 'attn'\?\)"):
        gl.watch(package + ".model.Attention.forward", "atn")
    assert gl.watched() == {}


@pytest.mark.parametrize("target, error", [
    (42, TypeError),
    ("not a path", ValueError),
    ("", ValueError),
])
def test_bad_targets(gl, target, error):
    with pytest.raises(error):
        gl.watch(target, "x")


def test_source_must_be_an_argument(gl, package):
    with pytest.raises(ValueError, match="source 'attn' is not an argument of attention_forward"):
        gl.watch(package + ".model.attention_forward", "attn_weights", source="attn")
    gl.watch(package + ".model.attention_forward", "attn_weights", source="module")


OVERRIDE_SOURCE = '''
class Attention:
    def __init__(self):
        self.fused_attn = True

    def forward(self, x):
        if self.fused_attn:
            out = x
        else:
            attn = x * 2
            out = attn
        return out
'''


def test_overrides_apply_only_while_capturing(gl, tmp_path, monkeypatch):
    (tmp_path / "override_mod_xyz.py").write_text(textwrap.dedent(OVERRIDE_SOURCE))
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("override_mod_xyz")
    try:
        existing = module.Attention()
        gl.watch("override_mod_xyz.Attention.forward", "attn", overrides={"fused_attn": False})
        assert existing.forward(1) == 2
        assert gl.cache == {"Attention.forward": [2]}
        gl.deactivate()
        assert existing.forward(1) == 1  # fused again when capture stops
        gl.activate()
        assert existing.forward(3) == 6
        gl.unwatch("override_mod_xyz.Attention.forward")
        assert existing.forward(1) == 1
        assert existing.fused_attn is True  # the instance was never touched
        with pytest.raises(ValueError, match="never reads the attribute 'fused'"):
            gl.watch("override_mod_xyz.Attention.forward", "attn", overrides={"fused": False})
        with pytest.raises(TypeError, match="overrides must be a dict"):
            gl.watch("override_mod_xyz.Attention.forward", "attn", overrides=[("a", 1)])
        gl.watch("override_mod_xyz.Attention.forward", overrides={"fused_attn": False})
        assert existing.forward(5) == 10
        assert gl.cache == {"Attention.forward": [2, 6]}
    finally:
        del sys.modules["override_mod_xyz"]
