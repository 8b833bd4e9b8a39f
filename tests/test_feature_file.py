"""Feature files: write, reopen/resume, crash recovery, mismatch and corruption errors."""
from __future__ import annotations

import logging
import re

import h5py
import numpy as np
import pytest

from asmk_index.feature_file import (CorruptFeatureFileError, CorruptRecordError, FeatureFile,
                                     FeatureFileWriter, _append_strings)

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


# ---------------------------------------------------------------------- image fields
IMAGE_FIELDS = {"global": ("float32", (16,)), "image_size": ("int32", (2,)), "quality": "float64"}


def make_image_values(rng):
    return {"global": rng.standard_normal(16).astype(np.float32),
            "image_size": rng.integers(1, 4000, 2).astype(np.int32),
            "quality": float(rng.random())}


def test_image_fields_round_trip_resume_and_errors(tmp_path):
    rng = np.random.default_rng(10)
    path = tmp_path / "both.h5"
    images = {f"im{i}.jpg": (*make_image(rng, rows), make_image_values(rng))
              for i, rows in enumerate([4, 0, 7])}
    with open_writer(path, image_fields=IMAGE_FIELDS) as writer:
        for name, (descriptors, fields, values) in list(images.items())[:2]:
            writer.add(name, descriptors, image_values=values, **fields)
        descriptors, fields, values = images["im2.jpg"]
        with pytest.raises(ValueError, match="image values given"):
            writer.add("im2.jpg", descriptors, image_values={"global": values["global"]}, **fields)
        with pytest.raises(ValueError, match=r"'global' has shape \(15,\), expected \(16,\)"):
            writer.add("im2.jpg", descriptors, **fields,
                       image_values={**values, "global": values["global"][:15]})
        with pytest.raises(ValueError, match="'quality' has NaN"):
            writer.add("im2.jpg", descriptors, image_values={**values, "quality": np.nan}, **fields)
    with pytest.raises(ValueError, match="mismatch.*image_fields"):
        open_writer(path)                                     # resumed without the image fields
    with open_writer(path, image_fields=IMAGE_FIELDS) as writer:
        assert writer.done == {"im0.jpg", "im1.jpg"} and writer.corrupt == []
        descriptors, fields, values = images["im2.jpg"]
        writer.add("im2.jpg", descriptors, image_values=values, **fields)
    with FeatureFile(path) as reader:
        assert reader.image_field_names == ["global", "image_size", "quality"]
        assert reader.image_fields["image_size"] == (np.dtype(np.int32), (2,))
        for name, (descriptors, fields, values) in images.items():
            stored = reader.get(name)
            check_image(reader, name, descriptors, fields)
            np.testing.assert_array_equal(stored["global"], values["global"])
            assert stored["global"].dtype == np.float32 and stored["global"].shape == (16,)
            np.testing.assert_array_equal(stored["image_size"], values["image_size"])
            assert stored["quality"].shape == () and stored["quality"] == values["quality"]
        bulk = reader.image_field("global")
        assert bulk.shape == (3, 16) and bulk.dtype == np.float32
        np.testing.assert_array_equal(bulk, np.stack([v["global"] for *_, v in images.values()]))
        np.testing.assert_array_equal(reader.image_field("image_size")[1],
                                      images["im1.jpg"][2]["image_size"])
        with pytest.raises(KeyError, match="no image field"):
            reader.image_field("attention")
    with pytest.raises(ValueError, match="also a per-row field"):
        open_writer(tmp_path / "x.h5", image_fields={"attention": "float32"})
    with pytest.raises(ValueError, match="invalid image field name"):
        open_writer(tmp_path / "x.h5", image_fields={"image_values": "float32"})


def test_cut_off_image_values_are_discarded(tmp_path):
    """A crash after an image's values and checksum were written, before its commit."""
    rng = np.random.default_rng(11)
    path = tmp_path / "both.h5"
    kept = (*make_image(rng, 3), make_image_values(rng))
    with open_writer(path, image_fields=IMAGE_FIELDS) as writer:
        writer.add("kept", kept[0], image_values=kept[2], **kept[1])
    with h5py.File(path, "a") as handle:
        for name in ("images/global", "images/image_size", "images/quality", "checksums"):
            handle[name].resize(2, axis=0)
        handle["images/global"][1] = np.full(16, 7, np.float32)
    with FeatureFile(path) as reader:
        assert reader.names == ["kept"] and reader.image_field("global").shape == (1, 16)
    with open_writer(path, image_fields=IMAGE_FIELDS) as writer:
        lost = (*make_image(rng, 2), make_image_values(rng))
        writer.add("lost", lost[0], image_values=lost[2], **lost[1])
    with FeatureFile(path) as reader:
        np.testing.assert_array_equal(reader.image_field("global")[1], lost[2]["global"])
        assert reader.verify() == []


# ---------------------------------------------------------------------- checksums
REAL_SIZE = dict(images=50, rows=300, dim=128)


@pytest.fixture(scope="module")
def real_size_file(tmp_path_factory):
    """A feature file of real size (50 images x 300 x 128 descriptors with fields), its bytes."""
    rng = np.random.default_rng(12)
    path = tmp_path_factory.mktemp("real") / "local.h5"
    images = {}
    with FeatureFileWriter(path, kind="local", dim=REAL_SIZE["dim"], fields=LOCAL_FIELDS,
                           attributes=ATTRIBUTES) as writer:
        for i in range(REAL_SIZE["images"]):
            descriptors = rng.standard_normal((REAL_SIZE["rows"], REAL_SIZE["dim"])).astype(np.float32)
            fields = {name: (rng.random(REAL_SIZE["rows"]) * 100).astype(dtype)
                      for name, dtype in LOCAL_FIELDS.items()}
            images[f"img{i:03d}.jpg"] = (descriptors, fields)
            writer.add(f"img{i:03d}.jpg", descriptors, **fields)
    return path.read_bytes(), images


def flipped_copy(tmp_path, data: bytes, fraction: float):
    position = int(len(data) * fraction)
    damaged = bytearray(data)
    damaged[position] ^= 0xFF
    path = tmp_path / "flipped.h5"
    path.write_bytes(bytes(damaged))
    return path


@pytest.mark.parametrize("fraction", [0.05, 0.25, 0.75])
def test_flipped_byte_is_detected_and_the_image_extracted_again(tmp_path, real_size_file, fraction,
                                                                caplog):
    data, images = real_size_file
    path = flipped_copy(tmp_path, data, fraction)
    with FeatureFile(path) as reader:
        assert reader.names == list(images)
        with pytest.raises(CorruptRecordError) as error:
            reader.all_descriptors()
        assert str(path) in str(error.value) and "checksum mismatch" in str(error.value)
        corrupt = error.value.names
        assert len(corrupt) == 1 and corrupt[0] in images
        with pytest.raises(CorruptRecordError, match=re.escape(corrupt[0])):
            reader.get(corrupt[0])
        with pytest.raises(CorruptRecordError):
            reader.field("attention")
        assert reader.verify() == corrupt
        for name in images:                           # every other image reads back unchanged
            if name != corrupt[0]:
                check_image(reader, name, *images[name])
    fields = {"kind": "local", "dim": REAL_SIZE["dim"], "fields": LOCAL_FIELDS,
              "attributes": ATTRIBUTES}
    with caplog.at_level(logging.WARNING, logger="asmk_index.feature_file"):
        with FeatureFileWriter(path, **fields) as writer:
            assert writer.done == set(images) - set(corrupt) and writer.corrupt == corrupt
            writer.add(corrupt[0], images[corrupt[0]][0], **images[corrupt[0]][1])  # re-extracted
    assert "failed their checksum" in caplog.text and corrupt[0] in caplog.text
    with FeatureFile(path) as reader:
        assert sorted(reader.names) == sorted(images) and reader.names[-1] == corrupt[0]
        assert reader.verify() == []
        descriptors, image_index = reader.all_descriptors()
        np.testing.assert_array_equal(
            descriptors, np.concatenate([images[name][0] for name in reader.names]))
        np.testing.assert_array_equal(np.bincount(image_index), [REAL_SIZE["rows"]] * len(images))
        np.testing.assert_array_equal(reader.offsets, np.arange(len(images) + 1) * REAL_SIZE["rows"])
        check_image(reader, corrupt[0], *images[corrupt[0]])
    with FeatureFileWriter(path, **fields) as writer:          # the next resume finds all intact
        assert writer.done == set(images) and writer.corrupt == []


def test_damaged_header_and_truncated_file_have_clear_errors(tmp_path, real_size_file):
    data, _ = real_size_file
    kind = data.index(b"local")                      # the 'kind' attribute's text
    damaged = bytearray(data)
    damaged[kind + 2] ^= 0x20                        # 'local' -> 'loCal'
    path = tmp_path / "header.h5"
    path.write_bytes(bytes(damaged))
    with pytest.raises(CorruptFeatureFileError, match="corrupt.*header fails its checksum"):
        FeatureFile(path)
    with pytest.raises(CorruptFeatureFileError, match="corrupt"):
        open_writer(path, dim=REAL_SIZE["dim"])
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(data[:len(data) // 2])
    for open_file in (FeatureFile, lambda p: open_writer(p, dim=REAL_SIZE["dim"])):
        with pytest.raises(CorruptFeatureFileError) as error:
            open_file(truncated)
        message = str(error.value)
        assert "truncated" in message and "locked" not in message and str(truncated) in message
        assert f"{len(data) // 2} of the {len(data)} bytes" in message


LOCKING_WRITER = """
import sys
from asmk_index.feature_file import FeatureFileWriter
writer = FeatureFileWriter(sys.argv[1], kind="global", dim=4)
print("open", flush=True)
sys.stdin.read()
writer.close()
"""


def test_file_open_for_writing_elsewhere_says_locked(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    path = tmp_path / "busy.h5"
    process = subprocess.Popen([sys.executable, "-c", LOCKING_WRITER, str(path)],
                               cwd=Path(__file__).resolve().parents[1], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "open"
        with pytest.raises(OSError, match="locked"):
            FeatureFile(path)
    finally:
        process.communicate("", timeout=60)
    FeatureFile(path).close()                        # free again once the writer closed


def test_older_format_version_says_extract_again(tmp_path):
    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as handle:               # a version-1 file's header
        handle.attrs.update({"format_version": 1, "kind": "local", "dim": DIM, "fields": "{}",
                             "attributes": "{}"})
        handle.create_dataset("descriptors", shape=(0, DIM), dtype=np.float32)
    for open_file in (FeatureFile, open_writer):
        with pytest.raises(ValueError, match="stored 1, this code reads 2; extract the features "
                                             "again"):
            open_file(path)


def test_corrupt_record_superseded_by_a_new_one(tmp_path):
    """An image whose record fails is added again; the earlier record stays in the file, retracted."""
    rng = np.random.default_rng(13)
    path = tmp_path / "local.h5"
    images = {name: make_image(rng, rows) for name, rows in [("a", 3), ("b", 5), ("c", 2)]}
    with open_writer(path) as writer:
        for name, (descriptors, fields) in images.items():
            writer.add(name, descriptors, **fields)
    with h5py.File(path, "a") as handle:                 # one changed value in b's attention
        handle["fields/attention"][4] = np.float32(handle["fields/attention"][4]) * 2
    with FeatureFile(path) as reader:
        with pytest.raises(CorruptRecordError, match=r"'b'.*per-row fields"):
            reader.get("b")
        check_image(reader, "a", *images["a"])
    with open_writer(path) as writer:
        assert writer.done == {"a", "c"} and writer.corrupt == ["b"]
        with pytest.raises(ValueError, match="already stored"):
            writer.add("a", *images["a"][:1], **images["a"][1])
    with FeatureFile(path) as reader:                   # retracted: b is no longer listed
        assert reader.names == ["a", "c"] and reader.verify() == []
    with open_writer(path) as writer:
        writer.add("b", images["b"][0], **images["b"][1])
        writer.add_failure("d", "cannot identify image file")
    with FeatureFile(path) as reader:
        assert reader.names == ["a", "c", "b"]
        np.testing.assert_array_equal(reader.offsets, [0, 3, 5, 10])
        check_image(reader, "b", *images["b"])
        np.testing.assert_array_equal(reader.field("head"), np.concatenate(
            [images[name][1]["head"] for name in ("a", "c", "b")]))
        assert reader.failures == [("d", "cannot identify image file")]


def test_non_utf8_file_names_round_trip(tmp_path):
    """Names of files whose bytes are not UTF-8 (os.fsdecode gives surrogate escapes) are stored
    as their bytes and read back equal, in records and in the failure log."""
    import os

    rng = np.random.default_rng(14)
    path = tmp_path / "local.h5"
    good, bad = os.fsdecode(b"caf\xe9/ph\xf6to.jpg"), os.fsdecode(b"broken \xff.jpg")
    image = make_image(rng, 4)
    with open_writer(path) as writer:
        writer.add(good, *image[:1], **image[1])
        writer.add_failure(bad, f"cannot load image {bad}: truncated")
        with pytest.raises(ValueError, match="cannot be stored"):
            writer.add("\ud800.jpg", *image[:1], **image[1])   # not a file system name
    with open_writer(path) as writer:
        assert writer.done == {good} and writer.failed == {bad}
    with FeatureFile(path) as reader:
        assert reader.names == [good] and os.fsencode(reader.names[0]) == b"caf\xe9/ph\xf6to.jpg"
        check_image(reader, good, *image)
        assert reader.failures == [(bad, f"cannot load image {bad}: truncated")]
    with h5py.File(path, "r") as handle:                  # the stored bytes are the file's bytes
        assert handle["names/utf8"][:].tobytes() == b"caf\xe9/ph\xf6to.jpg"


def test_damaged_chunk_index_is_a_file_error(tmp_path, real_size_file):
    """A chunk address in HDF5's chunk index pointing at another dataset's chunk: reads fail their
    checksums, and a writer refuses the file (writing there would overwrite other data)."""
    import io
    import struct

    data, images = real_size_file
    with h5py.File(io.BytesIO(data), "r") as handle:
        moved = handle["descriptors"].id.get_chunk_info(1).byte_offset
        target = handle["fields/attention"].id.get_chunk_info(0).byte_offset
        rows_per_chunk = handle["descriptors"].chunks[0]
    assert data.count(struct.pack("<Q", moved)) == 1           # its entry in the chunk index
    path = tmp_path / "index.h5"
    path.write_bytes(data.replace(struct.pack("<Q", moved), struct.pack("<Q", target)))
    with FeatureFile(path) as reader:
        with pytest.raises(CorruptRecordError) as error:
            reader.all_descriptors()
        damaged = {reader.names[int(i)] for i in
                   np.arange(rows_per_chunk, 2 * rows_per_chunk) // REAL_SIZE["rows"]}
        assert set(error.value.names) == damaged
    with pytest.raises(CorruptFeatureFileError, match="overlaps.*chunk index is damaged"):
        FeatureFileWriter(path, kind="local", dim=REAL_SIZE["dim"], fields=LOCAL_FIELDS,
                          attributes=ATTRIBUTES)
