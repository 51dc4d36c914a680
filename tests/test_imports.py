"""nunchaku_lite imports nothing at run time beyond the standard library and its declared dependencies."""
import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "nunchaku_lite"
ALLOWED = {"torch", "safetensors", "sentencepiece", "tokenizers", "PIL", "numpy", "cffi", "nunchaku_lite"}


def _imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str) and not node.args[0].value.startswith("."):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_every_module_imports_only_allowed_packages():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 5
    bad = {}
    for f in files:
        extra = _imported_top_levels(f) - ALLOWED - set(sys.stdlib_module_names)
        if extra:
            bad[str(f.relative_to(PACKAGE.parent))] = sorted(extra)
    assert not bad, f"disallowed imports: {bad}"


def test_checker_sees_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os, einops\nfrom regex import sub\nimport importlib\nimportlib.import_module('tqdm')\n"
                 "from . import sibling\n")
    assert _imported_top_levels(f) - set(sys.stdlib_module_names) == {"einops", "regex", "tqdm"}
