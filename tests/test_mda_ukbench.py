"""MDA on real photos (ukbench-dev): default model local features -> asmk_index retrieval ranks an
image's mates above non-mates; extract_folder writes a resumable feature file and reports bad files."""
import shutil

import numpy as np
import pytest
from PIL import Image

from asmk_index.asmk import AsmkIndex
from asmk_index.codebook import Codebook
from asmk_index.feature_file import FeatureFile
from mda.config import ExtractionConfig, MdaConfig
from mda.extract import LOCAL_FIELDS, extract_folder, extract_local_features
from mda.model import MdaModel
from real_data import UKBENCH, require_ukbench


require_ukbench(module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

OBJECTS = 5                                   # 5 objects x 4 views = 20 photos
EXTRACTION = ExtractionConfig(scales=(1.0, 0.707), max_size=192, top_n=150)


@pytest.fixture(scope="module")
def photos():
    return [UKBENCH / "jpg" / f"ukbench{i:05d}.jpg" for i in range(4 * OBJECTS)]


@pytest.fixture(scope="module")
def model(photos):
    model = MdaModel(MdaConfig())
    model.fit_reduction(photos, features_per_image=60, scales=(1.0,), max_size=EXTRACTION.max_size)
    return model


def test_mates_rank_above_non_mates(model, photos):
    features = [extract_local_features(model, path, config=EXTRACTION) for path in photos]
    for path, item in zip(photos, features):
        with Image.open(path) as original:
            width, height = original.size
        assert item.descriptors.shape[1] == 128 and item.image_size == (height, width)
        assert (item.x < width).all() and (item.y < height).all() and len(item) == EXTRACTION.top_n
    descriptors = np.concatenate([f.descriptors for f in features])
    ids = np.concatenate([np.full(len(f), i) for i, f in enumerate(features)])
    codebook = Codebook.train(descriptors, 32, seed=0)
    index = AsmkIndex(codebook, binary=True)
    index.add(descriptors, ids)
    mate_ranks, other_ranks, top1 = [], [], 0
    for query, item in enumerate(features):
        found, _ = index.search(item.descriptors, len(photos))
        ranking = [i for i in found.tolist() if i != query]
        group = query // 4
        for rank, image in enumerate(ranking):
            (mate_ranks if image // 4 == group else other_ranks).append(rank)
        top1 += ranking[0] // 4 == group
    # chance: both means ~9.5; a working local feature puts mates far ahead (measured 2.7 vs 10.2, top-1 19/20)
    assert np.mean(mate_ranks) < 0.5 * np.mean(other_ranks)
    assert top1 >= 0.7 * len(photos)


def test_extract_folder_feature_file_with_bad_image(model, photos, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for path in photos[:3]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    out = tmp_path / "local.h5"
    report = extract_folder(model, folder, out, config=EXTRACTION, num_workers=0, progress=False,
                            report_path=tmp_path / "bad.txt")
    assert report.extracted == 3 and report.failed == 1
    assert "broken.jpg" in (tmp_path / "bad.txt").read_text()
    with FeatureFile(out) as stored:
        assert stored.kind == "local" and stored.dim == 128
        assert set(stored.field_names) == set(LOCAL_FIELDS)
        assert stored.attributes["extractor"] == "mda"
        first = stored.get(photos[0].stem)
        direct = extract_local_features(model, photos[0], config=EXTRACTION)
        np.testing.assert_allclose(first["descriptors"], direct.descriptors, atol=1e-5)
        np.testing.assert_allclose(first["x"], direct.x, atol=1e-3)      # original pixels
        np.testing.assert_array_equal(first["head"], direct.head)
    # resume: nothing left to do
    again = extract_folder(model, folder, out, config=EXTRACTION, num_workers=0, progress=False)
    assert again.skipped == 3 and again.extracted == 0
