"""retrieval/ pieces that need no model: config YAML, codebook size cap, the demo collection,
query preparation, the HTML page, ranking completion, argument parsing."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image

from retrieval.config import AsmkConfig, CodebookConfig, ExtractionConfig, SystemConfig
from retrieval.demo_collection import make_demo_collection, make_view
from retrieval.evaluation import full_ranking, is_ukbench_layout
from retrieval.html import HtmlResult, render_results_page, write_results_page
from retrieval.searcher import prepare_query_image


# ----------------------------------------------------------------------------- config
def test_config_yaml_round_trip_and_partial_files(tmp_path):
    config = SystemConfig()
    path = tmp_path / "config.yaml"
    config.save(path)
    assert SystemConfig.load(path) == config
    partial = tmp_path / "partial.yaml"
    partial.write_text("extraction: {max_size: 256, scales: [1.0, 0.5]}\n"
                       "codebook: {size: 1024}\nnetwork: {mda: {num_heads: 2}, glam: {output_dim: 256},\n"
                       "          backbone: {name: efficientnet_lite2}}\n"
                       "train: {local_loss: none, trainable_stages: null}\nmodel: runs/a/model.pt\n")
    loaded = SystemConfig.load(partial)
    assert loaded.extraction.max_size == 256 and loaded.extraction.scales == (1.0, 0.5)
    assert loaded.codebook.size == 1024 and loaded.network.mda.num_heads == 2
    assert loaded.network.glam.output_dim == 256
    # one backbone: both heads' backbone settings follow it, each at its own tap
    assert loaded.network.backbone.name == "efficientnet_lite2" and loaded.network.backbone.tap == "stride32"
    assert loaded.network.mda.backbone.name == "efficientnet_lite2" == loaded.network.glam.backbone.name
    assert (loaded.network.mda.backbone.tap, loaded.network.glam.backbone.tap) == ("stride16", "stride32")
    assert loaded.train.local_loss == "none" and loaded.train.trainable_stages is None
    assert loaded.model == str(tmp_path / "runs/a/model.pt")  # relative to the config file
    assert loaded.asmk == AsmkConfig() and loaded.extraction.top_n == ExtractionConfig().top_n  # defaults kept
    assert SystemConfig.load(path).network == SystemConfig().network


@pytest.mark.parametrize("text, message", [
    ("extraction: {max_sise: 3}\n", "unknown key"),
    ("asmk: {binary: 3}\n", "true/false"),
    ("- a list\n", "mapping"),
    ("extraction: [unclosed\n", "not valid YAML"),
    ("network: {mda: {num_heads: 0}}\n", "num_heads"),
    ("train: {global_loss: none, local_loss: none}\n", "nothing to train"),
    ("extraction: {precision: half}\n", "precision"),
])
def test_config_errors_name_the_file_and_the_problem(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        SystemConfig.load(path)
    assert "bad.yaml" in str(info.value)
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        SystemConfig.load(tmp_path / "missing.yaml")


def test_codebook_size_is_capped_for_small_collections():
    settings = CodebookConfig(size=65536, min_descriptors_per_word=30)
    assert settings.size_for(10_000_000) == 65536
    assert settings.size_for(30_000) == 1000
    assert settings.size_for(30_000, requested=512) == 512
    assert settings.size_for(10) == 2


# ----------------------------------------------------------------------------- demo data
def test_demo_collection_is_real_photos_with_views_and_distractors(tmp_path):
    collection = make_demo_collection(tmp_path / "demo", views_per_object=3, distractors=4,
                                      max_side=96)
    database = sorted(p.name for p in collection.database.iterdir())
    assert len(database) == 5 * 3 + 4 and len(collection.query_paths) == 5
    for query, members in collection.groundtruth.items():
        assert (collection.queries / query).is_file()
        assert len(members) == 3 and set(members) <= set(database)
    for path in list(collection.database.iterdir()) + collection.query_paths:
        with Image.open(path) as image:
            assert image.mode == "RGB" and max(image.size) <= 96
    assert json.loads((collection.root / "groundtruth.json").read_text()) == \
        collection.groundtruth
    again = make_demo_collection(tmp_path / "demo2", views_per_object=3, distractors=4,
                                 max_side=96)
    first = np.asarray(Image.open(collection.query_paths[0]))
    assert np.array_equal(first, np.asarray(Image.open(again.query_paths[0])))  # same seed


def test_generated_views_change_the_image():
    rng = np.random.default_rng(0)
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), np.uint8))
    for kind in ("crop", "rotate", "perspective", "light", "mixed"):
        view = make_view(image, kind, rng)
        assert view.mode == "RGB"
        assert view.size != image.size or not np.array_equal(np.asarray(view),
                                                             np.asarray(image))


# ----------------------------------------------------------------------------- queries
def test_prepare_query_crops_in_original_pixels_then_downscales(tmp_path):
    array = np.zeros((400, 600, 3), np.uint8)
    array[100:300, 200:400] = 255
    path = tmp_path / "query.png"
    Image.fromarray(array).save(path)
    cropped = prepare_query_image(path, max_size=100, bbox=(200, 100, 400, 300))
    assert cropped.shape == (100, 100, 3) and cropped.min() == 255
    whole = prepare_query_image(Image.fromarray(array), max_size=300)
    assert whole.shape == (200, 300, 3)
    floats = prepare_query_image(array.astype(np.float32) / 255.0, max_size=600)
    assert floats.dtype == np.uint8 and floats.max() == 255
    with pytest.raises(TypeError, match="unsupported query type"):
        prepare_query_image(42, max_size=100)
    with pytest.raises(ValueError, match=r"bbox \(700.0, 0.0, 800.0, 10.0\) lies outside the 600x400 image"):
        prepare_query_image(array, max_size=100, bbox=(700, 0, 800, 10))


# ----------------------------------------------------------------------------- HTML
def test_html_page_is_self_contained_with_a_line_per_inlier(tmp_path):
    rng = np.random.default_rng(0)
    query = rng.integers(0, 255, (120, 160, 3), np.uint8)
    results = [HtmlResult(rank=1, name="a <b>.jpg", image=query, score=0.5, global_score=0.9,
                          asmk_score=0.5, inliers=2,
                          matches=np.array([[10, 10, 20, 20], [50, 60, 70, 80]], np.float32)),
               HtmlResult(rank=2, name="c.jpg", image=query[:60], score=0.1, global_score=0.2,
                          asmk_score=float("nan"), inliers=0),
               HtmlResult(rank=3, name="d.jpg", image=query, score=0.0)]
    page = render_results_page([("q.jpg", query, results)], title="T")
    assert page.count("data:image/jpeg;base64,") == 1 + 2 * 3
    assert page.count("<line ") == 2
    assert ">2<" in page and ">rejected<" in page and ">not verified<" in page
    assert "a &lt;b&gt;.jpg" in page and "http" not in page.replace("http://www.w3.org", "")
    assert re.search(r">0\.9000<", page) and re.search(r">-<", page)  # NaN shown as '-'
    path = write_results_page(tmp_path / "sub" / "page.html", [("q.jpg", query, results)])
    assert path.read_text() == render_results_page([("q.jpg", query, results)])


# ----------------------------------------------------------------------------- evaluation
def test_full_ranking_appends_unranked_images_in_fallback_order():
    ranking = full_ranking([3, -1, 1], np.array([1, 0, 4, 2, 3]), 6)
    assert ranking.tolist() == [3, 1, 0, 4, 2, 5]


def test_ukbench_layout_detection():
    gnd = [{"easy": [j for j in range(4 * (i // 4), 4 * (i // 4) + 4) if j != i], "hard": [],
            "junk": [i]} for i in range(8)]
    assert is_ukbench_layout(gnd, list(range(8)))
    assert not is_ukbench_layout(gnd, [None] + list(range(1, 8)))
    gnd[0] = {"easy": [1, 2], "hard": [], "junk": [0]}
    assert not is_ukbench_layout(gnd, list(range(8)))


# ----------------------------------------------------------------------------- CLI parsing
def test_index_script_refuses_incomplete_arguments(capsys):
    from pipelines import index as index_script
    with pytest.raises(SystemExit):
        index_script.parse_arguments(["--out", "x"])
    with pytest.raises(SystemExit):
        index_script.parse_arguments(["--out", "x", "--images", "folder"])
    args = index_script.parse_arguments(["--out", "x", "--images", "f", "--append"])
    assert args.append and args.codebook is None
    assert "--codebook" in capsys.readouterr().err


def test_build_codebook_script_applies_overrides(tmp_path):
    from pipelines import build_codebook as script
    from pipelines._common import config_from_arguments
    (tmp_path / "c.yaml").write_text("extraction: {top_n: 300}\n")
    args = script.parse_arguments(["--images", "i", "--out", "o", "--config",
                                   str(tmp_path / "c.yaml"), "--max-size", "128",
                                   "--scales", "1", "0.5"])
    config = config_from_arguments(args)
    assert config.extraction.max_size == 128 and config.extraction.scales == (1.0, 0.5)
    assert config.extraction.top_n == 300


# ----------------------------------------------------------------------------- feature cache
def test_feature_store_is_keyed_by_model_and_settings_and_records_by_file(tmp_path):
    import os
    from retrieval.config import ExtractionConfig
    from retrieval.extraction import FeatureStore, record_key
    settings = ExtractionConfig(max_size=256, scales=(1.0, 0.5), top_n=300)
    store = FeatureStore(tmp_path, "a" * 64, settings)
    # where or how fast features are computed does not change them: same store
    same = ExtractionConfig(max_size=256, scales=(1.0, 0.5), top_n=300, device="cpu", batch_size=4,
                            channels_last=False)
    assert FeatureStore(tmp_path, "a" * 64, same).path == store.path
    # another model, or settings that change the features: another store
    assert FeatureStore(tmp_path, "b" * 64, settings).path != store.path
    for other in (ExtractionConfig(max_size=320, scales=(1.0, 0.5), top_n=300),
                  ExtractionConfig(max_size=256, scales=(1.0,), top_n=300),
                  ExtractionConfig(max_size=256, scales=(1.0, 0.5), top_n=200),
                  ExtractionConfig(max_size=256, scales=(1.0, 0.5), top_n=300, precision="mixed")):
        assert FeatureStore(tmp_path, "a" * 64, other).path != store.path
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"first")
    key = record_key(photo)
    assert key.startswith(str(photo)) and record_key(tmp_path / "." / "photo.jpg") == key
    photo.write_bytes(b"changed!")  # another size: extracted again
    resized = record_key(photo)
    assert resized != key
    os.utime(photo, ns=(1, 1))  # the same size but another modification time: again
    assert record_key(photo) not in (key, resized)


def test_presets_load_from_yaml_and_the_defaults_are_the_fast_one(tmp_path):
    from retrieval.config import PRESETS
    assert set(PRESETS) == {"fast", "accurate"}
    fast, accurate = SystemConfig.load("fast"), SystemConfig.load("accurate")
    assert fast == SystemConfig()   # the defaults are the fast preset, chosen on development data
    assert accurate.extraction.max_size == 1024 and len(accurate.extraction.scales) == 7
    assert accurate.extraction.top_n > fast.extraction.top_n and accurate.search.verify_top > fast.search.verify_top
    assert accurate.search.fusion == fast.search.fusion     # the rest comes from the fast preset
    mine = tmp_path / "mine.yaml"
    mine.write_text("preset: accurate\nextraction: {max_size: 800}\n")
    loaded = SystemConfig.load(mine)
    assert loaded.extraction.max_size == 800 and loaded.extraction.scales == accurate.extraction.scales
    mine.write_text("preset: quick\n")
    with pytest.raises(ValueError, match="mine.yaml: unknown preset 'quick'"):
        SystemConfig.load(mine)
    with pytest.raises(FileNotFoundError, match="a preset: accurate, fast"):
        SystemConfig.load("quick")
