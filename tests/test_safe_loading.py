"""Loading files that may come from elsewhere runs no code: revisitop ground truth and asmk codebook
states (restricted unpickler), training checkpoints (torch.load with weights_only)."""
from __future__ import annotations

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest

from asmk_index.interop import codebook_from_asmk_state
from asmk_index.safe_pickle import UnsafePickleError, load_restricted, loads_restricted
from imagedata.revisitop import load_revisitop
from real_data import UKBENCH, require_ukbench


MKDIR = f"{os.mkdir.__module__}.mkdir"       # how a pickle names os.mkdir ('posix.mkdir')


class WritesMarker:
    """A pickle payload: unpickling it calls ``os.mkdir(marker)``, creating the marker."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def malicious_payload(marker: Path, wrap) -> bytes:
    """Pickle of ``wrap(payload)``, checked to be live: a plain ``pickle.loads`` creates the marker."""
    data = pickle.dumps(wrap(WritesMarker(marker)))
    pickle.loads(data)
    assert marker.exists(), "the payload must really run code under a plain pickle.load"
    marker.rmdir()
    return data


def gnd_with(value) -> dict:
    return {"imlist": ["a"], "qimlist": ["a"], "gnd": [{"easy": [0], "hard": [], "junk": [],
                                                       "bbx": value}]}


def test_malicious_revisitop_ground_truth_runs_nothing(tmp_path: Path):
    marker = tmp_path / "marker"
    (tmp_path / "gnd_evil.pkl").write_bytes(malicious_payload(marker, gnd_with))
    with pytest.raises(UnsafePickleError) as error:
        load_revisitop(tmp_path)
    assert not marker.exists()
    message = str(error.value)
    assert str(tmp_path / "gnd_evil.pkl") in message and MKDIR in message
    assert isinstance(error.value, ValueError)


def test_malicious_asmk_codebook_state_runs_nothing(tmp_path: Path):
    marker = tmp_path / "marker"
    path = tmp_path / "codebook.pkl"
    path.write_bytes(malicious_payload(marker, lambda payload: {
        "type": "Codebook", "params": {"size": 2}, "state": {"centroids": payload}}))
    with pytest.raises(UnsafePickleError, match=rf"codebook\.pkl: refused to unpickle the global "
                                                rf"{MKDIR}"):
        codebook_from_asmk_state(path)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_reads_plain_data_and_numpy_arrays(protocol):
    value = {"list": [1, 2.5, "x", None, True], "tuple": (1, (2, 3)), "set": {1, 2},
             "frozenset": frozenset({"a"}), "bytes": b"\x00\xff", "complex": 1 + 2j,
             "float32": np.arange(6, dtype=np.float32).reshape(2, 3),
             "fortran": np.asfortranarray(np.arange(6.0).reshape(3, 2)),
             "strided": np.arange(16.0).reshape(4, 4)[:, ::2], "int64": np.int64(7),
             "record": np.zeros(2, dtype=[("a", "<f4"), ("b", "<i8")]), "text": np.array(["ab", "c"]),
             "objects": np.array([1, "two", None], dtype=object), "dtype": np.dtype(">u2")}
    loaded = loads_restricted(pickle.dumps(value, protocol=protocol))
    assert loaded.keys() == value.keys()
    for key, expected in value.items():
        if isinstance(expected, np.ndarray):
            np.testing.assert_array_equal(loaded[key], expected)
            assert loaded[key].dtype == expected.dtype
        else:
            assert loaded[key] == expected and type(loaded[key]) is type(expected)


@pytest.mark.parametrize("payload", [
    b"cos\nsystem\n(S'true'\ntR.",                                   # protocol 0 os.system call
    pickle.dumps(getattr),                                            # builtins.getattr
    pickle.dumps(np.load),                                            # a numpy function
    b"c__builtin__\neval\n(S'1'\ntR.",                                # Python 2 spelling
])
def test_restricted_unpickler_refuses_other_globals(payload):
    with pytest.raises(UnsafePickleError, match="refused to unpickle the global"):
        loads_restricted(payload, source="test data")


def test_restricted_unpickler_file_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        load_restricted(tmp_path / "missing.pkl")
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04garbage")
    with pytest.raises(ValueError, match=r"garbage\.pkl: not a readable pickle"):
        load_restricted(garbage)


def test_real_ground_truth_files_still_load():
    ukbench = load_revisitop(require_ukbench())
    assert len(ukbench.imlist) == 400 and ukbench.gnd[0]["easy"] == [1, 2, 3]
    grocery_root = UKBENCH.parent / "grocery-dev"
    if not (grocery_root / "jpg").is_dir():
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"CI: the real test photos are missing at {grocery_root}")
        pytest.skip(f"grocery-dev not found at {grocery_root}")
    grocery = load_revisitop(grocery_root)
    assert len(grocery.imlist) == 964 and len(grocery.gnd) == len(grocery.qimlist)
    assert grocery.image_path(grocery.imlist[0]).is_file()


def test_real_asmk_codebook_pickled_as_how_does(tmp_path: Path):
    """A codebook trained by the asmk package and cached with its own io_helpers.save_pickle (what
    HOW's ASMKMethod.train_codebook writes) loads through the restricted unpickler."""
    from asmk import codebook as asmk_codebook
    from asmk import index as asmk_index_factory
    from asmk import io_helpers

    points = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    reference = asmk_codebook.Codebook(asmk_index_factory.initialize_index(None), size=32)
    reference.train(points)
    path = tmp_path / "codebook.pkl"
    io_helpers.save_pickle(str(path), reference.state_dict())
    codebook = codebook_from_asmk_state(path)
    np.testing.assert_array_equal(codebook.centroids, reference.centroids)
    _, words = reference.quantize(points[:100], multiple_assignment=1)[:2]
    np.testing.assert_array_equal(codebook.quantize(points[:100], 1), words)


# ---------------------------------------------------------------- checkpoints -------
def _tiny_training():
    import torch

    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    scheduler.step()
    return model, optimizer, scheduler


def test_checkpoint_loads_with_weights_only_and_restores_every_rng(tmp_path: Path):
    import torch

    from imagedata.training import TrainState, load_checkpoint, save_checkpoint

    model, optimizer, scheduler = _tiny_training()
    np.random.normal()                                   # numpy's cached gaussian is part of its state
    state = TrainState(epoch=2, step=5, best_metric=np.float64(0.25),
                       extra={"last_loss": np.float32(1.5), "out": tmp_path})
    path = save_checkpoint(tmp_path / "checkpoint.pt", model=model, state=state, optimizer=optimizer,
                           scheduler=scheduler, config={"model": {"dim": 4, "scales": (0.5, 1.0)}})
    torch.load(path, weights_only=True)                  # plain types only
    expected = (random.random(), np.random.normal(), np.random.rand(3), torch.rand(2))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    restored, checkpoint = load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    assert (random.random(), np.random.normal()) == expected[:2]
    np.testing.assert_array_equal(np.random.rand(3), expected[2])
    assert torch.equal(torch.rand(2), expected[3])
    assert restored.best_metric == 0.25 and restored.extra == {"last_loss": 1.5, "out": str(tmp_path)}
    assert checkpoint["config"] == {"model": {"dim": 4, "scales": (0.5, 1.0)}}
    with pytest.raises(TypeError, match=r"config\['model'\]\['bad'\] holds a object"):
        save_checkpoint(tmp_path / "bad.pt", model=model, state=state,
                        config={"model": {"bad": object()}})


def test_malicious_checkpoint_runs_nothing(tmp_path: Path):
    import torch

    from imagedata.training import TrainState, load_checkpoint, save_checkpoint

    model, optimizer, _ = _tiny_training()
    path = save_checkpoint(tmp_path / "checkpoint.pt", model=model, state=TrainState(),
                           optimizer=optimizer)
    checkpoint = torch.load(path, weights_only=True)
    marker = tmp_path / "marker"
    checkpoint["config"] = WritesMarker(marker)
    torch.save(checkpoint, path)
    torch.load(path, weights_only=False)                       # the payload is live...
    assert marker.exists()
    marker.rmdir()
    with pytest.raises(ValueError) as error:                   # ...and load_checkpoint refuses it
        load_checkpoint(path, model=model)
    assert not marker.exists()
    message = str(error.value)
    assert str(path) in message and "refused to load" in message and MKDIR in message


def test_checkpoint_of_the_older_format_is_refused_clearly(tmp_path: Path):
    """Version 1 stored numpy's RNG state as a pickled array: only a full unpickle reads it."""
    import torch

    from imagedata.training import load_checkpoint

    model = torch.nn.Linear(4, 2)
    old = {"format_version": 1, "model": model.state_dict(), "optimizer": None, "scheduler": None,
           "scaler": None, "train_state": {"epoch": 1, "step": 1, "best_metric": None, "extra": {}},
           "rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                   "torch": torch.get_rng_state()}, "config": None}
    path = tmp_path / "old.pt"
    torch.save(old, path)
    with pytest.raises(ValueError, match=r"multiarray\._reconstruct.*start the run again"):
        load_checkpoint(path, model=model)
