"""scripts/device_check.py, the one run a GPU machine gets: its steps run on the CPU paths here
(--allow-cpu), pass on correct paths and fail, saying what differed, on a broken one."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import faiss
import pytest

from asmk_index.codebook import Codebook

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device_check.py"


@pytest.fixture(scope="module")
def device_check():
    spec = importlib.util.spec_from_file_location("device_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_all_steps_pass_on_the_cpu_paths(device_check, capsys):
    assert device_check.main(["--allow-cpu", "--quick", "--skip-benchmark"]) == 0
    out = capsys.readouterr().out
    for step in ("1. faiss", "2. quantization, 256 words", "3. k-means", "4. ASMK*",
                 "5. global index"):
        assert step in out
    assert "all device checks passed" in out


def test_wrong_words_fail_the_quantization_step(device_check, capsys, monkeypatch):
    """The automatic path giving a far centroid for some descriptors must be caught."""
    quantize = Codebook.quantize

    def shifted_when_automatic(self, descriptors, multiple_assignment=1):
        words = quantize(self, descriptors, multiple_assignment)
        if self._choice == "auto" and len(descriptors) > 1000:
            words[::50] = (words[::50] + 1) % self.size
        return words

    monkeypatch.setattr(Codebook, "quantize", shifted_when_automatic)
    assert device_check.main(["--allow-cpu", "--quick", "--skip-benchmark"]) == 1
    assert "are not near-ties of the exact ones" in capsys.readouterr().err


@pytest.mark.skipif(faiss.get_num_gpus() > 0, reason="this machine has a GPU")
def test_without_a_gpu_it_stops_and_says_so(device_check, capsys):
    assert device_check.main([]) == 2
    assert "no GPU" in capsys.readouterr().err

