"""Index directories under hostile or unusual use, on real photos (ukbench-dev, tiny settings):
two index.py --append processes at once, image names that leave their folder, appending from
another folder, folders of symbolic links, an unreadable or oddly named file, a codebook
directory missing its codebook."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from asmk_index.persistence import IndexFormatError, current_version, publish_directory, read_arrays, write_arrays
from real_data import UKBENCH, copy_ukbench_photos, require_ukbench
from retrieval import Searcher
from retrieval.builder import build_codebook, build_index
from retrieval.config import SystemConfig
from retrieval.index_store import INDEX_KIND, RetrievalIndex

require_ukbench(module_level=True)
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

ROOT = Path(__file__).resolve().parents[1]
CONFIG = SystemConfig().updated({
    "extraction": {"max_size": 160, "scales": [1.0, 0.7071], "top_n": 150, "device": "cpu"},
    "codebook": {"fit_images": 8, "size": 48, "min_descriptors_per_word": 30},
    "network": {"glam": {"local_reduced_channels": 16, "global_reduced_channels": 16}},
    "search": {"shortlist": 12, "verify_top": 4},
})


@pytest.fixture(scope="module")
def codebook(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    copy_ukbench_photos(range(12), root / "photos")
    build_codebook(root / "photos", root / "codebook", config=CONFIG, progress=False)
    return root / "codebook"


def test_two_append_processes_at_once_keep_each_others_images(codebook, tmp_path):
    copy_ukbench_photos(range(4), tmp_path / "base")
    build_index(tmp_path / "index", images=tmp_path / "base", codebook=codebook, progress=False)
    batches = [copy_ukbench_photos(range(4 + 3 * k, 7 + 3 * k), tmp_path / f"batch{k}") for k in range(2)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, str(ROOT / "pipelines" / "index.py"), "--images",
                              str(tmp_path / f"batch{k}"), "--out", str(tmp_path / "index"), "--append",
                              "--no-progress"], env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for k in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert all("+3 added" in out for out, _ in outputs)
    index = RetrievalIndex.load(tmp_path / "index")
    assert sorted(index.names) == sorted(copy_ukbench_photos(range(4), tmp_path / "base") + batches[0] + batches[1])
    # each batch's images keep their own folder: every one of them resolves to its file
    assert all(index.image_path(name).is_file() for name in index.names)


def test_image_names_that_leave_their_folder_are_refused(codebook, tmp_path):
    copy_ukbench_photos(range(3), tmp_path / "photos")
    build_index(tmp_path / "index", images=tmp_path / "photos", codebook=codebook, progress=False)
    index = RetrievalIndex.load(tmp_path / "index")
    with pytest.raises(ValueError, match="not a relative path inside its image folder"):
        index.add(["../outside.jpg"], np.zeros((1, 512), np.float32), np.zeros((0, 128), np.float32),
                  np.zeros(0, np.int64), np.zeros((0, 3), np.float32), root=tmp_path / "photos")
    # an attacker rewrites the names (checksums recomputed): refused at load, no file read outside
    for bad_name in ("../../etc/passwd", "/etc/passwd"):
        version = current_version(tmp_path / "index")
        manifest, arrays = read_arrays(version, kind=INDEX_KIND)
        names = arrays["image_names"].tolist()
        names[0] = bad_name
        with publish_directory(tmp_path / "tampered") as target:
            shutil.copytree(version / "two_stage", target / "two_stage")
            write_arrays(target, kind=INDEX_KIND, params=manifest["params"] | {
                "codebook_directory": os.path.relpath(codebook, tmp_path / "tampered")},
                counts=manifest["counts"], arrays={**arrays, "image_names": np.asarray(names)},
                components={"two_stage": target / "two_stage"})
        with pytest.raises(IndexFormatError, match="not a relative path inside its image folder"):
            RetrievalIndex.load(tmp_path / "tampered")


def test_images_appended_from_another_folder_are_shown(codebook, tmp_path):
    copy_ukbench_photos(range(4), tmp_path / "first")
    build_index(tmp_path / "index", images=tmp_path / "first", codebook=codebook, progress=False)
    added = copy_ukbench_photos(range(4, 8), tmp_path / "second")
    report = build_index(tmp_path / "index", images=tmp_path / "second", append=True, progress=False)
    assert sorted(report.added) == sorted(added)
    searcher = Searcher(tmp_path / "index")
    results = searcher.search(tmp_path / "second" / added[1], k=3, with_matches=True)
    assert results.hits[0].name == added[1] and results.hits[0].inliers > 0
    for hit in results:
        assert searcher.indexed_image(hit.name) is not None, hit.name   # found in its own folder
    page = searcher.write_html(tmp_path / "page.html", results).read_text()
    assert page.count("data:image/jpeg;base64,") == 1 + 2 * 3 and "<line " in page


def test_a_folder_of_symbolic_links_is_indexed_under_the_links_names(codebook, tmp_path):
    copy_ukbench_photos(range(3), tmp_path / "elsewhere")
    links = tmp_path / "links"
    (links / "sub").mkdir(parents=True)
    for number, name in enumerate(sorted(os.listdir(tmp_path / "elsewhere"))):
        (links / ("sub" if number else "") / f"link{number}.jpg").symlink_to(tmp_path / "elsewhere" / name)
    report = build_index(tmp_path / "index", images=links, codebook=codebook, progress=False)
    assert sorted(report.added) == ["link0.jpg", "sub/link1.jpg", "sub/link2.jpg"] and not report.failures
    searcher = Searcher(tmp_path / "index")
    assert searcher.search(links / "sub" / "link2.jpg", k=1).hits[0].name == "sub/link2.jpg"


def test_a_codebook_directory_missing_its_codebook_says_so(codebook, tmp_path):
    copy = tmp_path / "codebook"
    shutil.copytree(codebook, copy)
    (current_version(copy) / "codebook.npz").unlink()
    with pytest.raises(IndexFormatError, match=r"codebook\.npz: file missing"):
        build_index(tmp_path / "index", images=UKBENCH / "jpg", codebook=copy, progress=False)
    assert not (tmp_path / "index").exists()


def test_odd_names_unreadable_formats_and_link_loops_are_named_never_fatal(codebook, tmp_path):
    folder = tmp_path / "photos"
    good = copy_ukbench_photos(range(3), folder)
    latin1 = os.fsdecode(b"caf\xe9.jpg")                      # not UTF-8: a surrogate-escaped name
    shutil.copyfile(UKBENCH / "jpg" / "ukbench00005.jpg", folder / latin1)
    (folder / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")
    (folder / "loop").symlink_to(folder)
    report = build_index(tmp_path / "index", images=folder, codebook=codebook, progress=False)
    assert sorted(report.added) == sorted(good + [latin1])
    assert "phone.heic" in report.failures and "loop" in report.failures, report.failures
    index = RetrievalIndex.load(tmp_path / "index")
    assert latin1 in index.names and index.image_path(latin1).is_file()
    assert Searcher(tmp_path / "index").search(folder / latin1, k=1).hits[0].name == latin1
    assert set(RetrievalIndex.report(tmp_path / "index")["failures"]) == {"phone.heic", "loop"}


def test_a_damaged_feature_store_is_extracted_again_not_read(codebook, tmp_path, caplog):
    folder = tmp_path / "photos"
    copy_ukbench_photos(range(4), folder)
    store = tmp_path / "store"
    build_index(tmp_path / "index", images=folder, codebook=codebook, feature_store=store, progress=False)
    [features] = store.glob("*/features.h5")
    import h5py
    with h5py.File(features, "r") as handle:                  # where the first descriptors lie
        position = handle["descriptors"].id.get_chunk_info(0).byte_offset + 4 * 128 + 7
    data = bytearray(features.read_bytes())
    data[position] ^= 0xFF                                    # one byte of the first image's second row
    features.write_bytes(bytes(data))
    report = build_index(tmp_path / "again", images=folder, codebook=codebook, feature_store=store,
                         progress=False)
    assert report.images == 4 and not report.failures
    assert (report.extracted, report.reused) == (1, 3)        # the damaged image again, only it
    assert "checksum" in caplog.text or "corrupt" in caplog.text.lower()
