"""Smoke run of benchmarks/asmk_vs_reference.py on a tiny configuration: both engines build and
answer queries, the table has one row per configuration (and per quantizer of ours) with its
ratios, the reference run on the same subset is reused, and the builds after quantization are
repeated from recorded words."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from asmk_index.codebook import Codebook

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
                    "--reference-images", "60", "--queries", "2", "--build-repeats", "2",
                    "--quantizers", "auto", "blas"])
    out = capsys.readouterr().out
    # every later row (the 120-image one, and both rows of the second quantizer) reuses the
    # reference run on 60 images
    assert len(reference_builds) == 1
    assert out.count("(same run as above)") == 3
    assert "median of 2 builds" in out
    rows = [line for line in out.splitlines() if line.startswith("| 256 |")]
    assert len(rows) == 4
    auto = Codebook.from_centroids(np.eye(2, dtype=np.float32)).quantizer
    for row, quantizer in zip(rows, [auto, auto, "blas", "blas"]):
        assert row.startswith(f"| 256 | {quantizer} |")
    assert "| 60 / 60 |" in rows[0] and "| 120 (60 distinct x2) / 60 (subset) |" in rows[1]
    for row in rows:
        ratios = [float(value) for value in re.findall(r"\(([0-9.]+)x", row)]
        assert len(ratios) >= 3 and all(ratio > 0 for ratio in ratios)
    # ours indexed all 120 images of the second row (60 distinct, each twice)
    assert re.search(r"ours +K=256 \(blas\) images=120: .*\(AsmkIndex\(images=120,", out)
