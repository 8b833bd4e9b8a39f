"""The layering of DESIGN.md: imports only point down, and asmk_index never imports torch."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# package -> project packages it may import (besides itself)
ALLOWED = {
    "asmk_index": set(),
    "backbones": {"asmk_index"},
    "imagedata": {"asmk_index", "backbones"},
    "mda": {"asmk_index", "backbones", "imagedata"},
    "glam": {"asmk_index", "backbones", "imagedata"},
    "retrieval": {"asmk_index", "backbones", "imagedata", "mda", "glam"},
    "pipelines": {"asmk_index", "backbones", "imagedata", "mda", "glam", "retrieval"},
}
THIRD_PARTY_FORBIDDEN = {"asmk_index": {"torch", "torchvision", "kornia"}}


def _imported_top_level_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_only_point_down(package):
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        imported = _imported_top_level_names(path)
        upward = (imported & set(ALLOWED)) - ALLOWED[package] - {package}
        forbidden = imported & THIRD_PARTY_FORBIDDEN.get(package, set())
        if upward or forbidden:
            offenders.append(f"{path.relative_to(ROOT)}: {sorted(upward | forbidden)}")
    assert not offenders, "imports against the layering:\n" + "\n".join(offenders)


def test_asmk_index_runs_without_torch_loaded():
    code = ("import sys, asmk_index, asmk_index.feature_file, asmk_index.two_stage; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
