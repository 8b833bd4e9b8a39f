"""Smoke run of benchmarks/asmk_vs_reference.py on a tiny configuration: both engines build and
answer queries, the table has one row per configuration with its ratios, the reference run on the
same subset is reused, and the builds after quantization are repeated from recorded words."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("asmk.asmk_method")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "asmk_vs_reference.py"


@pytest.fixture(scope="module")
def benchmark():
    spec = importlib.util.spec_from_file_location("asmk_vs_reference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def test_tiny_run_prints_one_row_per_configuration(benchmark, capsys, monkeypatch):
    reference_builds = []
    original = benchmark.run_reference

    def counting_run_reference(*args, **kwargs):
        reference_builds.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(benchmark, "run_reference", counting_run_reference)
    benchmark.main(["--codebooks", "256", "--images", "60", "120", "--distinct-images", "60",
                    "--reference-images", "60", "--queries", "2", "--build-repeats", "2"])
    out = capsys.readouterr().out
    assert len(reference_builds) == 1  # the second row reuses the reference run on 60 images
    assert "(same run as above)" in out
    assert "median of 2 builds" in out
    rows = [line for line in out.splitlines() if line.startswith("| 256 |")]
    assert len(rows) == 2
    assert rows[0].startswith("| 256 | 60 / 60 |")
    assert rows[1].startswith("| 256 | 120 (60 distinct x2) / 60 (subset) |")
    for row in rows:
        ratios = [float(value) for value in re.findall(r"\(([0-9.]+)x", row)]
        assert len(ratios) >= 3 and all(ratio > 0 for ratio in ratios)
    # ours indexed all 120 images of the second row (60 distinct, each twice)
    assert re.search(r"ours +K=256 images=120: .*\(AsmkIndex\(images=120,", out)
