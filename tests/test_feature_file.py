"""Feature files: write, reopen/resume, crash recovery, mismatch and corruption errors."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from asmk_index.feature_file import FeatureFile, FeatureFileWriter, _append_strings

LOCAL_FIELDS = {"attention": "float32", "head": "int16", "x": "float32", "y": "float32",
                "scale": "float32"}
ATTRIBUTES = {"model": "mda", "heads": 4, "scales": [0.5, 1.0]}
DIM = 8


def make_image(rng, rows):
    descriptors = rng.standard_normal((rows, DIM)).astype(np.float32)
    fields = {"attention": rng.random(rows).astype(np.float32),
              "head": rng.integers(0, 4, rows).astype(np.int16),
              "x": rng.random(rows).astype(np.float32) * 100,
              "y": rng.random(rows).astype(np.float32) * 100,
              "scale": rng.choice([0.5, 1.0], rows).astype(np.float32)}
    return descriptors, fields


def open_writer(path, **overrides):
    settings = dict(kind="local", dim=DIM, fields=LOCAL_FIELDS, attributes=ATTRIBUTES)
    settings.update(overrides)
    return FeatureFileWriter(path, **settings)


def check_image(reader, name, descriptors, fields):
    stored = reader.get(name)
    np.testing.assert_array_equal(stored["descriptors"], descriptors)
    assert stored["descriptors"].dtype == np.float32
    for field, value in fields.items():
        np.testing.assert_array_equal(stored[field], value)
        assert stored[field].dtype == np.dtype(LOCAL_FIELDS[field])


def test_write_read_roundtrip_with_unicode_names_and_empty_images(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "local.h5"
    images = {"a.jpg": make_image(rng, 5), "ñandú/Ωmega 猫.jpg": make_image(rng, 0),
              "c.jpg": make_image(rng, 7)}
    with open_writer(path) as writer:
        for name, (descriptors, fields) in images.items():
            writer.add(name, descriptors, **fields)
        writer.add_failure("broken.jpg", "cannot identify image file")
        assert writer.done == set(images)
        assert len(writer) == 3
    with FeatureFile(path) as reader:
        assert reader.names == list(images)
        assert len(reader) == 3
        assert reader.kind == "local" and reader.dim == DIM
        assert reader.attributes == ATTRIBUTES
        assert sorted(reader.field_names) == sorted(LOCAL_FIELDS)
        np.testing.assert_array_equal(reader.offsets, [0, 5, 5, 12])
        assert reader.offsets.dtype == np.int64
        assert reader.failures == [("broken.jpg", "cannot identify image file")]
        for name, (descriptors, fields) in images.items():
            check_image(reader, name, descriptors, fields)
        assert reader.get(1)["descriptors"].shape == (0, DIM)
        assert reader.get(1)["head"].shape == (0,)
        assert reader.index_of("c.jpg") == 2
        check_image(reader, -1, *images["c.jpg"])
        descriptors, image_index = reader.all_descriptors()
        np.testing.assert_array_equal(descriptors, np.concatenate([d for d, _ in images.values()]))
        np.testing.assert_array_equal(image_index, [0] * 5 + [2] * 7)
        np.testing.assert_array_equal(
            reader.field("head"), np.concatenate([f["head"] for _, f in images.values()]))
        with pytest.raises(KeyError, match="no image named"):
            reader.index_of("missing.jpg")
        with pytest.raises(IndexError):
            reader.get(3)
        with pytest.raises(KeyError, match="no field"):
            reader.field("nope")


def test_resume_appends_and_keeps_finished_images(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "local.h5"
    first, second = make_image(rng, 4), make_image(rng, 3)
    with open_writer(path) as writer:
        writer.add("first", first[0], **first[1])
    with open_writer(path) as writer:
        assert writer.done == {"first"}
        with pytest.raises(ValueError, match="already stored"):
            writer.add("first", first[0], **first[1])
        writer.add("second", second[0], **second[1])
    with FeatureFile(path) as reader:
        assert reader.names == ["first", "second"]
        check_image(reader, "first", *first)
        check_image(reader, "second", *second)


def test_simulated_crash_partial_write_is_discarded(tmp_path):
    rng = np.random.default_rng(2)
    path = tmp_path / "local.h5"
    kept, lost, after = make_image(rng, 6), make_image(rng, 9), make_image(rng, 2)
    with open_writer(path) as writer:
        writer.add("kept", kept[0], **kept[1])
    # A crash after the rows (and the name) of "lost" were written, before its offset (commit).
    with h5py.File(path, "a") as handle:
        rows = handle["descriptors"].shape[0]
        for dataset, value in [(handle["descriptors"], lost[0])] + [
                (handle[f"fields/{name}"], lost[1][name]) for name in LOCAL_FIELDS]:
            dataset.resize(rows + 9, axis=0)
            dataset[rows:] = value
        _append_strings(handle["names"], ["lost"])
    with FeatureFile(path) as reader:
        assert reader.names == ["kept"]
        descriptors, image_index = reader.all_descriptors()
        assert descriptors.shape == (6, DIM) and image_index.tolist() == [0] * 6
        assert reader.field("x").shape == (6,)
    with open_writer(path) as writer:
        assert writer.done == {"kept"}
        writer.add("lost", lost[0], **lost[1])      # the cut-off image is simply redone
        writer.add("after", after[0], **after[1])
    with FeatureFile(path) as reader:
        assert reader.names == ["kept", "lost", "after"]
        np.testing.assert_array_equal(reader.offsets, [0, 6, 15, 17])
        for name, image in [("kept", kept), ("lost", lost), ("after", after)]:
            check_image(reader, name, *image)


@pytest.mark.parametrize("override", [{"kind": "global"}, {"dim": DIM + 1},
                                      {"fields": {"attention": "float32"}},
                                      {"fields": {**LOCAL_FIELDS, "head": "int32"}},
                                      {"attributes": {"model": "other"}}, {"attributes": None}])
def test_resume_with_other_settings_is_a_mismatch(tmp_path, override):
    path = tmp_path / "features.h5"
    open_writer(path).close()
    with pytest.raises(ValueError, match="mismatch") as error:
        open_writer(path, **override)
    assert str(path) in str(error.value)
    open_writer(path).close()          # the same settings still resume


def test_bad_input_leaves_the_file_unchanged(tmp_path):
    rng = np.random.default_rng(3)
    path = tmp_path / "local.h5"
    good = make_image(rng, 3)
    with open_writer(path) as writer:
        writer.add("good", good[0], **good[1])
        descriptors, fields = make_image(rng, 4)
        with pytest.raises(ValueError, match="dimensionality"):
            writer.add("bad", descriptors[:, :-1], **fields)
        nan = descriptors.copy()
        nan[2, 1] = np.nan
        with pytest.raises(ValueError, match="NaN"):
            writer.add("bad", nan, **fields)
        with pytest.raises(ValueError, match="fields"):
            writer.add("bad", descriptors, attention=fields["attention"])
        with pytest.raises(ValueError, match="shape"):
            writer.add("bad", descriptors, **{**fields, "x": fields["x"][:2]})
        with pytest.raises(ValueError, match="non-empty string"):
            writer.add("", descriptors, **fields)
        with pytest.raises(ValueError, match="already stored"):
            writer.add_failure("good", "oops")
        assert writer.done == {"good"}
    with FeatureFile(path) as reader:
        assert reader.names == ["good"]
        assert reader.all_descriptors()[0].shape == (3, DIM)
    with pytest.raises(ValueError, match="kind"):
        FeatureFileWriter(tmp_path / "x.h5", kind="medium", dim=DIM)


def test_failures_are_recorded_updated_and_cleared_by_success(tmp_path):
    rng = np.random.default_rng(4)
    path = tmp_path / "global.h5"
    with FeatureFileWriter(path, kind="global", dim=DIM) as writer:
        writer.add_failure("a.jpg", "truncated")
        writer.add_failure("b.jpg", "empty")
    with FeatureFileWriter(path, kind="global", dim=DIM) as writer:
        assert writer.failed == {"a.jpg", "b.jpg"}
        writer.add_failure("a.jpg", "still truncated")            # a retry failed again
        writer.add("b.jpg", rng.standard_normal((1, DIM)))         # a retry succeeded
        assert writer.failed == {"a.jpg"}
    with FeatureFile(path) as reader:
        assert reader.failures == [("a.jpg", "still truncated")]
        assert reader.names == ["b.jpg"]
        assert reader.field_names == [] and reader.attributes == {}


def test_corrupt_and_missing_files(tmp_path):
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"this is not an HDF5 file" * 10)
    with pytest.raises((ValueError, OSError), match="corrupt") as error:
        FeatureFile(garbage)
    assert str(garbage) in str(error.value)
    with pytest.raises((ValueError, OSError), match="corrupt"):
        open_writer(garbage)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as handle:
        handle["something"] = np.zeros(3)
    with pytest.raises(ValueError, match="corrupt"):
        FeatureFile(foreign)
    with pytest.raises(FileNotFoundError):
        FeatureFile(tmp_path / "absent.h5")
    # no temporary files are left beside a created file
    open_writer(tmp_path / "new.h5").close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.h5", "garbage.h5", "new.h5"]


CRASHING_WRITER = """
import os, sys
import numpy as np
import asmk_index.feature_file as feature_file

append = feature_file._append
def crash_before_commit(dataset, values):
    if dataset.name == sys.argv[2] and dataset.shape[0] == 4:  # while adding the 4th image
        os._exit(3)                                             # dies without closing the file
    append(dataset, values)
feature_file._append = crash_before_commit

writer = feature_file.FeatureFileWriter(sys.argv[1], kind="global", dim=4, fields={"x": "int32"})
for i in range(5):
    writer.add(f"image{i}", np.full((i + 1, 4), i, np.float32), x=np.arange(i + 1))
"""


@pytest.mark.parametrize("crash_at", ["/names/offsets", "/offsets"])
def test_killed_writer_process_keeps_finished_images(tmp_path, crash_at):
    """The writer process dies before committing its 4th image's name, or the image itself."""
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "killed.h5"
    repository = Path(__file__).resolve().parents[1]
    finished = subprocess.run([sys.executable, "-c", CRASHING_WRITER, str(path), crash_at],
                              cwd=repository,
                              capture_output=True, text=True, timeout=120)
    assert finished.returncode == 3, finished.stderr
    with FeatureFile(path) as reader:
        assert reader.names == ["image0", "image1", "image2"]
        np.testing.assert_array_equal(reader.offsets, [0, 1, 3, 6])
        descriptors, image_index = reader.all_descriptors()
        np.testing.assert_array_equal(descriptors[:, 0], image_index)
    with FeatureFileWriter(path, kind="global", dim=4, fields={"x": "int32"}) as writer:
        assert writer.done == {"image0", "image1", "image2"}
        writer.add("image3", np.full((4, 4), 3, np.float32), x=np.arange(4))
    with FeatureFile(path) as reader:
        assert reader.names[-1] == "image3"
        np.testing.assert_array_equal(reader.get("image3")["x"], np.arange(4))
        np.testing.assert_array_equal(reader.offsets, [0, 1, 3, 6, 10])
