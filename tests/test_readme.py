"""The README's Python blocks run as pasted, each in a fresh interpreter.

Every fenced ``python`` block of README.md is one test.  The rules a block
follows, so that what a reader sees is what runs:

* it runs on its own, in a new interpreter, in an empty working folder;
* a block whose first line is ``# continues the block above`` runs after the
  block before it (and that one after its own predecessor, and so on);
* a block whose first line is ``# NAME.py`` is that file: it is checked to run,
  and is written into the working folder of the blocks after it;
* every ``print(...)`` line ends with a comment that is exactly what it prints,
  and the block (with the blocks it continues) prints those lines and no others,
  in that order;
* a block that imports torch, timm, transformers or any other library that is
  not installed is skipped (a failure under ``VISUALIZER_REQUIRE_ALL=1``).

The blocks import the checkout's ``visualizer``, or the installed one when
``VISUALIZER_README_INSTALLED=1`` (CI sets it after installing the package as
the README's Install section says).
"""
import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, require

README = os.path.join(ROOT, "README.md")
CONTINUES = "# continues the block above"
FILE_LINE = re.compile(r"# ([A-Za-z_][A-Za-z0-9_]*\.py)$")
FENCE = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)


class Block:
    """One fenced python block: its source, its line in the file, and what it continues."""

    def __init__(self, source, line, previous):
        self.source = source
        self.line = line
        first = source.split("\n", 1)[0].strip()
        self.continues = previous if first == CONTINUES else None
        if first == CONTINUES and previous is None:
            raise ValueError("README.md:{}: the first block cannot continue another".format(line))
        match = FILE_LINE.match(first)
        self.file = match.group(1) if match else None

    def chain(self):
        """This block and those it continues, first to last."""
        blocks, block = [], self
        while block is not None:
            blocks.insert(0, block)
            block = block.continues
        return blocks


def parse(text):
    """The python blocks of a markdown text, in order."""
    blocks = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(Block(match.group(1), line, blocks[-1] if blocks else None))
    return blocks


def expected_output(source, where):
    """The lines that the ``print(...)`` lines of ``source`` say they print."""
    lines = source.split("\n")
    tree = ast.parse(source)
    expected = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "print":
            text = lines[node.end_lineno - 1] if hasattr(node, "end_lineno") \
                else lines[node.lineno - 1]
            comment = _comment(text)
            if comment is None:
                raise AssertionError("{}: a print(...) line without a comment that says what it "
                                     "prints: {!r}".format(where, text.strip()))
            expected.append((node.lineno, comment))
    return [comment for _, comment in sorted(expected)]


def _comment(line):
    """The trailing ``# comment`` of a line of code, or None (strings are respected)."""
    import io
    import tokenize

    try:
        for token in tokenize.generate_tokens(io.StringIO(line + "\n").readline):
            if token.type == tokenize.COMMENT:
                return token.string[1:].strip()
    except (tokenize.TokenError, IndentationError):
        pass
    return None


def imported_modules(source):
    """The top-level names of the modules ``source`` imports."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def run_block(block, files, folder, env=None):
    """Run ``block`` after the blocks it continues; return (returncode, stdout, stderr)."""
    for name, source in files.items():
        with open(os.path.join(str(folder), name), "w") as fh:
            fh.write(source)
    script = "\n".join(b.source for b in block.chain())
    result = subprocess.run([sys.executable, "-c", script], cwd=str(folder),
                            env=env or block_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=900)
    return result.returncode, result.stdout, result.stderr


def block_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MPLBACKEND="Agg")
    if os.environ.get("VISUALIZER_README_INSTALLED"):
        env.pop("PYTHONPATH", None)
    else:
        env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
    return env


def check_block(block, files, folder, env=None):
    """Run ``block`` and fail with its output unless it runs and prints what it says."""
    where = "README.md:{}".format(block.line)
    expected = []
    for b in block.chain():
        expected += expected_output(b.source, "README.md:{}".format(b.line))
    code, stdout, stderr = run_block(block, files, folder, env)
    assert code == 0, "{} failed:\n{}".format(where, stderr[-4000:])
    printed = stdout.splitlines()
    assert printed == expected, "{} printed {!r}, its comments say {!r}\n{}".format(
        where, printed, expected, stderr[-2000:])


with open(README, encoding="utf-8") as _fh:
    BLOCKS = parse(_fh.read())


def files_before(block):
    """The ``# NAME.py`` file blocks above ``block``: {name: source}."""
    files = {}
    for b in BLOCKS:
        if b is block:
            break
        if b.file:
            files[b.file] = b.source
    return files


def test_readme_has_its_examples():
    assert len(BLOCKS) >= 6
    assert any(b.file for b in BLOCKS) and any(b.continues for b in BLOCKS)
    assert sum(len(expected_output(b.source, b.line)) for b in BLOCKS) >= 5


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: "README.md:{}".format(b.line))
def test_readme_block(block, tmp_path):
    files = files_before(block)
    local = {name[:-3] for name in files}
    sources = [b.source for b in block.chain()] + list(files.values())
    for name in sorted(set().union(*map(imported_modules, sources)) - local - {"visualizer"}):
        require(name)
    check_block(block, files, tmp_path)


def test_the_stream_block_run_twice_refuses_to_mix_the_runs(tmp_path):
    block = next(b for b in BLOCKS if "capture(stream='run.vz')" in b.source)
    for name in sorted(imported_modules(block.source) - {"visualizer"}):
        require(name)
    check_block(block, files_before(block), tmp_path)
    code, stdout, stderr = run_block(block, files_before(block), tmp_path)
    assert code != 0 and not stdout
    assert "stream='run.vz' holds 18 captures already" in stderr, stderr[-2000:]
    assert "append=True" in stderr


# -- the machinery itself ------------------------------------------------------------

SAMPLE = '''
text

```python
x = [1, 2]
print(len(x))  # 2
```

```python
# continues the block above
print(x + [3])  # [1, 2, 3]
```

```python
# helper.py
VALUE = "# not a comment"
```

```python
from helper import VALUE
print(VALUE)  # # not a comment
```
'''


def test_parse_chains_and_files():
    blocks = parse(SAMPLE)
    assert [b.line for b in blocks] == [4, 9, 14, 19]
    assert blocks[1].continues is blocks[0] and blocks[0].continues is None
    assert [b.file for b in blocks] == [None, None, "helper.py", None]
    assert expected_output(blocks[1].source, "x") == ["[1, 2, 3]"]


def test_sample_blocks_pass(tmp_path):
    blocks = parse(SAMPLE)
    env = dict(os.environ)
    for block in blocks:
        files = {b.file: b.source for b in blocks[:blocks.index(block)] if b.file}
        check_block(block, files, tmp_path, env)


@pytest.mark.parametrize("wrong", [
    "```python\nprint(1 + 1)  # 3\n```\n",                     # a wrong value
    "```python\nprint(2)\n```\n",                               # a print that says nothing
    "```python\nprint(2)  # 2\nprint('extra', end='')\n```\n",  # says it once, prints more
    "```python\nimport sys\nsys.stdout.write('hidden\\n')\n```\n",  # prints what no comment says
    "```python\nx = 1\n```\n\n```python\nprint(x)  # 1\n```\n",  # does not run on its own
    "```python\nraise SystemExit(3)\n```\n",
])
def test_wrong_blocks_fail(wrong, tmp_path):
    block = parse(wrong)[-1]
    with pytest.raises(AssertionError):
        check_block(block, {}, tmp_path, dict(os.environ))
