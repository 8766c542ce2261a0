"""The README's usage example runs as written (so the front page never shows broken code)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_blocks_run():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README.md has no python example"
    for block in blocks:
        ns: dict = {}
        exec(compile(block, "README.md", "exec"), ns)
    assert ns["logits"].shape == (2, 7)
    assert len(ns["replaced"]) == 2


def test_readme_states_the_two_commands_and_main_job():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert 'pip install -e ".[dev]"' in text
    assert "\npytest\n" in text
    assert "python examples/ssm_reference.py" in text
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install -e ".[dev]"' in ci and "\npytest\n" in ci
    assert (ROOT / "examples" / "ssm_reference.py").is_file()
