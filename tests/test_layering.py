"""The house rules a reader relies on: imports run one way down the layers, and no module outgrows 400 lines."""

import ast
from pathlib import Path

from core_helpers import REPO

# Lower layers never import higher ones (DESIGN.md's arrows). Same-layer modules do not import each other.
LAYERS = [
    ["errors"],
    ["parse", "hookspecs", "threads", "extra_config"],
    ["config", "metrics", "keys", "identity", "events"],
    ["plugins", "storage", "memory", "transfer"],
    ["registry"],
    ["controller", "integrations"],
    ["cache", "sglang", "vllm"],
    ["engine", "testing", "faults"],
    ["bench", "certify", "serve"],
    ["cli"],
]
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
MAX_LINES = 400


def _imports(path: Path) -> set[str]:
    """Top-level hicache_core components imported by a module (type-checking-only imports excluded)."""
    tree = ast.parse(path.read_text())
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(n) for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if node.module == "hicache_core" else node.module for a in node.names]
        else:
            continue
        out |= {n.split(".")[1] for n in names if n.startswith("hicache_core.")}
    return out


def test_imports_run_one_way():
    wrong = []
    for path in sorted((REPO / "hicache_core").rglob("*.py")):
        parts = path.relative_to(REPO / "hicache_core").with_suffix("").parts
        src = parts[0]
        if src == "__init__":
            continue
        assert src in RANK, f"hicache_core/{src} is in no layer: add it to LAYERS (and DESIGN.md's map)"
        for dst in _imports(path) - {src}:
            if dst == "__version__" and src == "cli":
                continue
            assert dst in RANK, f"{path}: imports hicache_core.{dst}, which is in no layer"
            if RANK[dst] >= RANK[src]:
                wrong.append(f"{path.relative_to(REPO)} ({src}, layer {RANK[src]}) imports {dst} (layer {RANK[dst]})")
    assert not wrong, "imports back up the layers:\n" + "\n".join(wrong)


def test_no_module_over_400_lines():
    roots = [REPO / "hicache_core"] + sorted((REPO / "plugins").glob("*/hicache_plugin_*"))
    long = [
        f"{p.relative_to(REPO)}: {n}"
        for root in roots
        for p in sorted(root.rglob("*.py"))
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    ]
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n" + "\n".join(long)
