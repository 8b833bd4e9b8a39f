"""The whole system on real photos (ukbench-dev at small resolution): codebook directory, index
(reusing the codebook run's features, referring to its model), append, remove, two-stage search
(the query's own object first), evaluation of every search variant, an interrupted index run that
resumes without extracting any image twice, broken files skipped and reported, the command-line
scripts and the HTML page."""
from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest

from asmk_index.feature_file import FeatureFile
import retrieval.extraction as extraction_module
from asmk_index.persistence import IndexFormatError, current_version
from retrieval import Searcher, search
from retrieval.builder import SmallCollectionWarning, build_codebook, build_index
from retrieval.config import SystemConfig
from retrieval.evaluation import evaluate_index
from retrieval.index_store import RetrievalIndex
from retrieval.models import ModelBundle
from real_data import UKBENCH, copy_ukbench_photos, require_ukbench


require_ukbench(module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

BASE_OBJECTS = 6          # objects 0..5 (4 views each) are indexed first
EXTRA_OBJECTS = 2         # objects 6..7 are appended
REQUESTED_WORDS = 4096    # far too many for this collection: capped, with a warning
CONFIG = SystemConfig().updated({
    "extraction": {"max_size": 200, "scales": [1.0, 0.7071], "top_n": 200, "device": "cpu"},
    "codebook": {"fit_images": 12, "min_descriptors_per_word": 30},   # words for tiny test collections
    "network": {"glam": {"whitening_power": 0.0}},
    "search": {"shortlist": 20},
})


def ukbench_name(number: int) -> str:
    return f"ukbench{number:05d}.jpg"


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    """A revisitop-layout dataset of the base objects; codebook and index built from it."""
    root = tmp_path_factory.mktemp("retrieval")
    dataset = root / "dataset"
    names = copy_ukbench_photos(range(4 * BASE_OBJECTS), dataset / "jpg")
    stems = [name[:-4] for name in names]
    gnd = [{"easy": [j for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i], "hard": [],
            "junk": [i], "bbx": None} for i in range(len(names))]
    with open(dataset / "gnd_ukbench-test.pkl", "wb") as handle:
        pickle.dump({"imlist": stems, "qimlist": stems, "gnd": gnd}, handle)
    with pytest.warns(SmallCollectionWarning, match="too few"):
        codebook_report = build_codebook(dataset / "jpg", root / "codebook", config=CONFIG,
                                          size=REQUESTED_WORDS, progress=False)
    index_report = build_index(root / "index", images=dataset / "jpg",
                               codebook=root / "codebook", progress=False)
    return {"root": root, "dataset": dataset, "names": names, "codebook": root / "codebook",
            "index": root / "index", "codebook_report": codebook_report,
            "index_report": index_report, "store": root / ".codebook.features"}


def test_codebook_directory_carries_one_model_and_capped_size(collection):
    report = collection["codebook_report"]
    directory = collection["codebook"]
    assert sorted(p.name for p in current_version(directory).iterdir()) == [
        "codebook.npz", "config.yaml", "manifest.json", "model.pt"]
    assert report.images == 4 * BASE_OBJECTS and report.requested_size == REQUESTED_WORDS
    assert report.size == report.training_descriptors // CONFIG.codebook.min_descriptors_per_word < REQUESTED_WORDS
    assert report.extracted == 4 * BASE_OBJECTS and report.reused == 0
    bundle = ModelBundle.load(directory)
    assert bundle.codebook.size == report.size and bundle.model_hash == report.model_sha256
    assert bundle.config.extraction.max_size == 200
    # the index uses exactly that model and codebook, by reference: no copy of the weights
    index = RetrievalIndex.load(collection["index"])
    assert index.models.model_hash == bundle.model_hash
    assert index.models.codebook.hash == bundle.codebook.hash
    assert not list(collection["index"].rglob("*.pt"))
    # a damaged model file is refused with a message naming it
    broken = collection["root"] / "codebook_broken"
    shutil.copytree(directory, broken)
    with open(current_version(broken) / "model.pt", "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x01\x02\x03")
    with pytest.raises(IndexFormatError, match="model.pt"):
        ModelBundle.load(broken)


def test_index_reuses_the_codebook_runs_features(collection):
    report = collection["index_report"]
    assert report.extracted == 0 and report.reused == 4 * BASE_OBJECTS
    stores = list(collection["store"].glob("*/features.h5"))
    assert len(stores) == 1  # keyed by the model's hash and the settings
    with FeatureFile(stores[0]) as stored:
        assert len(stored) == 4 * BASE_OBJECTS


def test_index_report_and_search_ranks_own_object_first(collection):
    report = collection["index_report"]
    assert report.images == 4 * BASE_OBJECTS and not report.failures
    assert sorted(report.added) == sorted(collection["names"])
    searcher = Searcher(collection["index"])
    assert len(searcher) == 4 * BASE_OBJECTS
    mates_in_top4 = []
    for number in (0, 6, 9, 15, 22):
        query = collection["dataset"] / "jpg" / ukbench_name(number)
        group = {ukbench_name(4 * (number // 4) + j) for j in range(4)}
        results = searcher.search(query, k=4)
        assert results.hits[0].name == ukbench_name(number)  # the query itself first
        assert [hit.rank for hit in results] == [1, 2, 3, 4]
        scores = [hit.score for hit in results]
        assert scores == sorted(scores, reverse=True)
        assert all(np.isfinite([hit.global_score, hit.asmk_score]).all() for hit in results)
        # stage 3 verified the top of the shortlist: the query itself with many inliers, and every
        # inlier correspondence is drawn from the stored features
        assert results.hits[0].inliers >= 40 and len(results.hits[0].matches) == results.hits[0].inliers
        assert all(hit.inliers >= 0 for hit in results) and results.timings["stage3"] > 0
        mates_in_top4.append(len(group & set(results.names)))
        # global descriptors alone put the whole group first on these photos
        assert set(searcher.search(query, k=4, mode="global").names) == group
    # the two-stage ranking puts the query's own object first: on average >= 2 of its
    # 4 views in the top 4 (random: ~1.4 counting the query itself)
    assert np.mean(mates_in_top4) >= 2.0, mates_in_top4
    # module-level search() caches one Searcher per index directory
    first = search(collection["index"], str(query), k=2)
    second = search(collection["index"], [str(query), np.asarray(
        __import__("PIL.Image", fromlist=["Image"]).open(query).convert("RGB"))], k=2)
    assert isinstance(second, list) and len(second) == 2
    assert second[0].names == first.names == second[1].names


def test_append_and_remove_without_rebuilding(collection, tmp_path):
    index_dir = tmp_path / "index"
    shutil.copytree(collection["index"], index_dir)
    folder = tmp_path / "all"
    shutil.copytree(collection["dataset"] / "jpg", folder)
    extra = copy_ukbench_photos(range(4 * BASE_OBJECTS, 4 * (BASE_OBJECTS + EXTRA_OBJECTS)), folder)
    report = build_index(index_dir, images=folder, append=True, progress=False)
    assert sorted(report.added) == sorted(extra)
    assert len(report.already_indexed) == 4 * BASE_OBJECTS
    assert report.images == 4 * (BASE_OBJECTS + EXTRA_OBJECTS)
    searcher = Searcher(index_dir)
    query = folder / extra[1]
    first = searcher.search(query, k=1, verify_top=5).hits[0]
    assert first.name == extra[1] and first.inliers >= 40  # verified against appended features
    removed = extra[:2] + [collection["names"][0]]
    report = build_index(index_dir, remove=removed[:2] + [removed[2][:-len(".jpg")],
                                                          "not-there.jpg"], progress=False)
    assert sorted(report.removed) == sorted(removed) and report.not_found == ["not-there.jpg"]
    reloaded = Searcher(index_dir)
    assert len(reloaded) == 4 * (BASE_OBJECTS + EXTRA_OBJECTS) - 3
    names = reloaded.search(query, k=len(reloaded), mode="global").names
    assert not set(removed) & set(names)
    verified = reloaded.search(folder / extra[2], k=3, verify_top=len(reloaded))
    assert verified.hits[0].name == extra[2] and verified.hits[0].inliers >= 40
    assert not set(removed) & set(verified.names)
    assert RetrievalIndex.report(index_dir)["removed"] == report.removed


def test_evaluate_every_variant_side_by_side_with_stage_latencies(collection):
    from retrieval.evaluation import VARIANTS
    report = evaluate_index(collection["dataset"], collection["index"], max_queries=8,
                            progress=False)
    assert list(report["modes"]) == list(VARIANTS)
    for name, entry in report["modes"].items():
        assert 0.0 <= entry["mAP"]["medium"] <= 100.0
        assert entry["mAP"]["easy"] == pytest.approx(entry["mAP"]["medium"])  # no hard positives
        assert 0.0 <= entry["ns_score"] <= 4.0
        latency = report["latency_ms"][name]
        assert latency["extraction"] > 0 and latency["stage1"] > 0
        assert (latency["stage3"] > 0) == ("+sv" in name)
        assert (latency["stage2"] > 0) == (name.startswith(("asmk", "two_stage")))
    # on 6 objects the images' mates are found well above chance (random mAP ~ 15)
    for name in ("two_stage", "two_stage+sv", "global"):
        assert report["modes"][name]["mAP"]["medium"] > 80, name
    assert report["modes"]["two_stage+sv"]["ns_score"] >= 3.0
    assert report["index_bytes_per_image"] > 0 and report["memory_bytes_per_image"] > 0
    assert set(report["index_bytes_per_image_parts"]) == {"global", "asmk", "local"}
    # every other object's queries: two halves that together are all the queries
    halves = [evaluate_index(collection["dataset"], collection["index"], queries=split,
                             variants=["global"], progress=False) for split in ("even", "odd")]
    assert [half["n_queries"] for half in halves] == [12, 12]


def test_interrupted_index_run_resumes_without_extracting_twice(collection, tmp_path,
                                                                 monkeypatch):
    folder = tmp_path / "photos"
    names = copy_ukbench_photos(range(28, 34), folder)
    calls = []
    original = extraction_module.BatchExtractor.__call__

    def counting(self, images, interrupt_after=None):
        if interrupt_after is not None and len(calls) == interrupt_after:
            raise KeyboardInterrupt  # the user presses Ctrl-C during the 4th image
        calls.append(tuple(images.shape))
        return original(self, images)

    monkeypatch.setattr(extraction_module.BatchExtractor, "__call__",
                        lambda self, images: counting(self, images, interrupt_after=3))
    store, index_dir = tmp_path / "store", tmp_path / "index"
    with pytest.raises(KeyboardInterrupt):
        build_index(index_dir, images=folder, codebook=collection["codebook"], feature_store=store,
                    progress=False)
    assert not index_dir.exists()  # no half-written index
    assert len(calls) == 3
    [features_file] = store.glob("*/features.h5")
    with FeatureFile(features_file) as stored:
        assert len(stored) == 3
    monkeypatch.setattr(extraction_module.BatchExtractor, "__call__",
                        lambda self, images: counting(self, images))
    report = build_index(index_dir, images=folder, codebook=collection["codebook"],
                         feature_store=store, progress=False)
    assert len(calls) == len(names)  # 3 before the interruption + 3 after: none twice
    assert report.extracted == 3 and report.reused == 3
    assert sorted(report.added) == sorted(names) and report.images == len(names)
    with FeatureFile(features_file) as stored:
        assert len(stored) == len(names)


def test_broken_files_are_skipped_and_named(collection, tmp_path):
    folder = tmp_path / "mixed"
    good = copy_ukbench_photos(range(32, 35), folder)
    data = (UKBENCH / "jpg" / ukbench_name(40)).read_bytes()
    (folder / "truncated.jpg").write_bytes(data[:len(data) // 2])
    (folder / "notes.jpg").write_text("this is a text file, not a photo\n")
    index_dir = tmp_path / "index"
    report = build_index(index_dir, images=folder, codebook=collection["codebook"],
                         feature_store=tmp_path / "store", progress=False)
    assert sorted(report.added) == sorted(good) and report.images == 3
    assert sorted(report.failures) == ["notes.jpg", "truncated.jpg"]
    assert "truncated" in report.failures["truncated.jpg"].lower()
    saved = RetrievalIndex.report(index_dir)
    assert sorted(saved["failures"]) == ["notes.jpg", "truncated.jpg"]
    assert len(Searcher(index_dir)) == 3


def test_command_line_scripts_and_html(collection, tmp_path, capsys):
    from pipelines import evaluate as evaluate_script
    from pipelines import index as index_script
    from pipelines import search as search_script

    query = collection["dataset"] / "jpg" / ukbench_name(13)
    html = tmp_path / "page.html"
    assert search_script.main(["--index", str(collection["index"]), "--query", str(query),
                               "--k", "3", "--json", "--html", str(html)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed[0]["results"][0]["name"] == ukbench_name(13)
    assert {"rank", "name", "score", "global_score", "asmk_score"} <= set(printed[0]["results"][0])
    page = html.read_text()
    assert page.count("data:image/jpeg;base64,") >= 1 + 2 * 3  # query + 3 rows of pairs
    assert "<line " in page  # matched local features drawn
    assert search_script.main(["--index", str(collection["index"]), "--query", str(query),
                               "--bbox", "20", "20", "200", "180", "--k", "2"]) == 0
    assert "rank" in capsys.readouterr().out

    figures = tmp_path / "figures.json"
    assert evaluate_script.main(["--dataset", str(collection["dataset"]), "--index",
                                 str(collection["index"]), "--max-queries", "2", "--json",
                                 str(figures), "--no-progress"]) == 0
    assert "two_stage" in capsys.readouterr().out
    assert "two_stage+sv" in json.loads(figures.read_text())["modes"]

    copy = tmp_path / "index"
    shutil.copytree(collection["index"], copy)
    removals = tmp_path / "remove.txt"
    removals.write_text(f"{ukbench_name(0)}\n{ukbench_name(1)}\n")
    assert index_script.main(["--out", str(copy), "--remove-list", str(removals),
                              "--no-progress"]) == 0
    assert len(RetrievalIndex.load(copy)) == 4 * BASE_OBJECTS - 2
    assert index_script.main(["--out", str(tmp_path / "missing"), "--remove", "x.jpg"]) == 2

