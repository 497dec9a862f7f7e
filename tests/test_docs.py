"""The README's Python examples run as written (each ```python block, in a fresh namespace)."""
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "examples" / "README.md"]
BLOCKS = [(path, index, code) for path in DOCS if path.exists()
          for index, code in enumerate(re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S))]


def test_the_readme_has_examples():
    assert sum(path.name == "README.md" and path.parent == ROOT for path, _, _ in BLOCKS) >= 4


@pytest.mark.parametrize("path, index, code", BLOCKS, ids=[f"{p.relative_to(ROOT)}-{i}" for p, i, _ in BLOCKS])
def test_example_runs(path, index, code):
    torch.manual_seed(0)
    exec(compile(code, f"{path.name} block {index}", "exec"), {"__name__": "__docs__"})
