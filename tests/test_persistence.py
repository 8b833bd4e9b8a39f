"""Crash-safe, checksummed storage (asmk_index.persistence)."""
import json

import numpy as np
import pytest

from asmk_index import persistence
from asmk_index.persistence import IndexFormatError


def _arrays():
    rng = np.random.default_rng(0)
    return {"codes": rng.integers(0, 2**63, size=(50, 2), dtype=np.uint64),
            "ids": np.arange(50, dtype=np.int64)}


def test_directory_round_trip(tmp_path):
    target = tmp_path / "index"
    persistence.save_directory(target, kind="toy", params={"alpha": 3.0}, counts={"images": 50},
                               arrays=_arrays())
    manifest, arrays = persistence.read_arrays(target, kind="toy")
    assert manifest["params"] == {"alpha": 3.0} and manifest["counts"] == {"images": 50}
    for name, array in _arrays().items():
        np.testing.assert_array_equal(arrays[name], array)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary dirs left"


def test_crash_while_writing_keeps_old_directory(tmp_path):
    target = tmp_path / "index"
    persistence.save_directory(target, kind="toy", params={}, counts={}, arrays=_arrays())
    with pytest.raises(RuntimeError):
        with persistence.atomic_directory(target) as temporary:
            persistence.write_arrays(temporary, kind="toy", params={}, counts={},
                                     arrays={"ids": np.zeros(3)})
            raise RuntimeError("simulated crash")
    _, arrays = persistence.read_arrays(target, kind="toy")
    assert arrays["ids"].shape == (50,)
    assert [p.name for p in tmp_path.iterdir()] == ["index"]


@pytest.mark.parametrize("damage, words", [
    ("flip", ("checksum",)), ("truncate", ("checksum", "corrupt")), ("delete", ("missing",)),
    ("manifest", ("corrupt",)), ("version", ("version", "mismatch")), ("kind", ("kind", "mismatch")),
])
def test_damage_is_refused_with_a_clear_error(tmp_path, damage, words):
    target = tmp_path / "index"
    persistence.save_directory(target, kind="toy", params={}, counts={}, arrays=_arrays())
    codes = target / "codes.npy"
    manifest_path = target / "manifest.json"
    if damage == "flip":
        data = bytearray(codes.read_bytes())
        data[-1] ^= 0xFF
        codes.write_bytes(bytes(data))
    elif damage == "truncate":
        codes.write_bytes(codes.read_bytes()[:100])
    elif damage == "delete":
        codes.unlink()
    elif damage == "manifest":
        manifest_path.write_text("{not json")
    else:
        manifest = json.loads(manifest_path.read_text())
        manifest["format_version" if damage == "version" else "kind"] = 999 if damage == "version" else "other"
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(IndexFormatError) as error:
        persistence.read_arrays(target, kind="toy")
    message = str(error.value)
    assert any(word in message for word in words), message
    assert str(target) in message


def test_single_file_round_trip_and_corruption(tmp_path):
    path = tmp_path / "codebook.npz"
    centroids = np.random.default_rng(1).standard_normal((16, 8)).astype(np.float32)
    persistence.save_arrays_file(path, kind="codebook", params={"size": 16},
                                 arrays={"centroids": centroids})
    manifest, arrays = persistence.load_arrays_file(path, kind="codebook")
    np.testing.assert_array_equal(arrays["centroids"], centroids)
    assert manifest["params"]["size"] == 16
    with pytest.raises(IndexFormatError, match="kind mismatch"):
        persistence.load_arrays_file(path, kind="index")
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(IndexFormatError, match="corrupt"):
        persistence.load_arrays_file(path, kind="codebook")


def test_object_arrays_are_refused(tmp_path):
    with pytest.raises(TypeError, match="object"):
        persistence.save_directory(tmp_path / "x", kind="toy", params={}, counts={},
                                   arrays={"names": np.array(["a", None], dtype=object)})
    assert not (tmp_path / "x").exists()


def test_written_files_and_directories_get_the_usual_permissions(tmp_path):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700); the result must not stay private."""
    import os
    umask = os.umask(0o022)
    try:
        persistence.save_directory(tmp_path / "index", kind="toy", params={}, counts={},
                                   arrays=_arrays())
        persistence.save_arrays_file(tmp_path / "codebook.npz", kind="codebook", params={},
                                     arrays={"centroids": np.zeros((2, 2), np.float32)})
        with persistence.atomic_file(tmp_path / "model.bin") as temporary:
            temporary.write_bytes(b"weights")
    finally:
        os.umask(umask)
    assert (tmp_path / "index").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "codebook.npz").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model.bin").read_bytes() == b"weights"
    assert (tmp_path / "model.bin").stat().st_mode & 0o777 == 0o644


def test_atomic_file_leaves_the_old_file_on_a_crash(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with persistence.atomic_file(target) as temporary:
            temporary.write_bytes(b"half")
            raise RuntimeError("simulated crash")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.bin"]
