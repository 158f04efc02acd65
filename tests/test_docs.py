"""The examples in docs/ are real: each page's python blocks run as a test module."""

import re
import subprocess
import sys

import pytest

from core_helpers import REPO


@pytest.mark.parametrize("page", ["writing-a-backend.md", "embedding.md"])
def test_doc_examples_run(tmp_path, page):
    text = (REPO / "docs" / page).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"{page} lost its example"
    (tmp_path / "test_doc_example.py").write_text("\n".join(blocks))
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert re.search(r"\d+ passed", r.stdout)
