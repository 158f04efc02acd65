"""The house rules a reader relies on: imports run one way down the layers, and no module outgrows 400 lines."""

import ast
from pathlib import Path

from core_helpers import REPO

# Lower layers never import higher ones (DESIGN.md's arrows). Same-layer modules do not import each other.
LAYERS = [
    ["errors"],
    ["parse", "hookspecs", "threads", "extra_config", "fit"],
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


def _modules() -> dict[str, Path]:
    out = {}
    for path in (REPO / "hicache_core").rglob("*.py"):
        parts = ("hicache_core", *path.relative_to(REPO / "hicache_core").with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _every_import(path: Path, modules: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) for every hicache_core import of a file: module level, inside functions and
    under TYPE_CHECKING alike. ``from pkg import submodule`` counts as importing the submodule."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name in modules]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
            subs = [a.name for a in node.names if f"{node.module}.{a.name}" in modules]
            out += [(f"{node.module}.{s}", []) for s in subs]
            names = [a.name for a in node.names if a.name not in subs]
            if names:
                out.append((node.module, names))
    return out


def test_no_two_modules_import_each_other_and_none_takes_a_private_name():
    """Import circles (engine/gguf.py <-> engine/tokenizer.py, serve/metrics.py <-> serve/state.py were two) hide
    which module is the lower one, even as function-level or type-checking imports; a private name taken from
    another module is a part of it used as if it were the caller's own."""
    modules = _modules()
    edges = {m: {dst for dst, _ in _every_import(p, modules)} - {m} for m, p in modules.items()}
    circles = sorted(
        f"{a} <-> {b}"
        for a in edges
        for b in edges[a]
        if a < b and a in edges.get(b, ()) and not b.startswith(a + ".") and not a.startswith(b + ".")
    )
    assert not circles, "modules that import each other:\n" + "\n".join(circles)
    private = sorted(
        f"{path.relative_to(REPO)} takes {name} from {dst}"
        for m, path in modules.items()
        for dst, names in _every_import(path, modules)
        if dst != m
        for name in names
        if name.startswith("_") and not name.startswith("__")
    )
    assert not private, "private names taken from other modules:\n" + "\n".join(private)
