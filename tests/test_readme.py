"""The README's example runs as written."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.tooling


def test_readme_example_runs(tmp_path):
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Example\n\n```python\n(.*?)```", text, re.S)
    assert block, "README.md lost its '## Example' python block"
    script = tmp_path / "example.py"
    script.write_text(block.group(1))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    assert all(line.startswith("(128, 8, 4)") for line in lines)
    for line in lines:  # a random policy ends dozens of CartPole episodes per batch
        n_episodes = int(line.split(")")[1].split()[0])
        assert n_episodes > 5, line
