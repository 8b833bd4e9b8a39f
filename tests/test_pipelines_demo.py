"""The README's main command, ``python pipelines/demo.py``, end to end on a smaller version of
the built-in demo collection (real photos shipped by scikit-learn; no download, no GPU)."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_demo_script_runs_end_to_end(tmp_path, capsys):
    from pipelines import demo
    out = tmp_path / "demo"
    assert demo.main(["--out", str(out), "--max-size", "128", "--views", "2",
                      "--distractors", "2", "--k", "3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "HTML page with the results:" in printed
    from asmk_index.persistence import current_version
    for path in ("results.html", "results.json", "config.yaml", "collection/groundtruth.json"):
        assert (out / path).is_file(), path
    assert (current_version(out / "index") / "manifest.json").is_file()
    assert (current_version(out / "codebook") / "codebook.npz").is_file()
    # the index found every image's features in the store the codebook run filled
    assert "found in the feature store, 0 extracted" in printed
    results = json.loads((out / "results.json").read_text())
    assert len(results) == 5 and all(len(r["results"]) == 3 for r in results)
    assert (out / "results.html").read_text().count("data:image/jpeg;base64,") >= 5 * (1 + 6)
