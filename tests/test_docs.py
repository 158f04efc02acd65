"""The example in docs/writing-a-backend.md is real: its code blocks run as a test module."""

import re
import subprocess
import sys

from core_helpers import REPO


def test_writing_a_backend_example(tmp_path):
    text = (REPO / "docs" / "writing-a-backend.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the doc lost its example"
    (tmp_path / "test_doc_example.py").write_text("\n".join(blocks))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert re.search(r"\d+ passed", r.stdout)
