"""Index directories under concurrent processes: writers serialise on the writer lock, readers
always see one whole version, a killed writer's temporaries are removed by the next write.

Every test here runs real processes: this file is also the worker script
(``python tests/test_concurrent_writers.py ACTION ...``).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:           # when run as a worker script
    sys.path.insert(0, str(REPO))

from asmk_index import persistence                          # noqa: E402
from asmk_index.asmk import AsmkIndex                       # noqa: E402
from asmk_index.codebook import Codebook                    # noqa: E402
from asmk_index.two_stage import TwoStageIndex              # noqa: E402

LOCAL_DIM, GLOBAL_DIM, WORDS, LOCALS_PER_IMAGE = 16, 32, 16, 12
BASE_IMAGES, APPENDED_IMAGES = 20, 6
APPEND_HOLD_SECONDS = 0.5          # a writer keeps the lock this long: the other one must wait
HOLD_SECONDS = 1.5                 # the holder in the refusal test
BIG_IMAGES, BIG_GLOBAL_DIM = 3000, 128     # reader test: saves long enough for loads to overlap
REWRITE_ROUNDS = 20
MIN_LOADS, MIN_OVERLAPPING_LOADS = 30, 5
WORKER_TIMEOUT_SECONDS = 60


# ------------------------------------------------------------------------------ synthetic data
def codebook() -> Codebook:
    centroids = np.random.default_rng(0).standard_normal((WORDS, LOCAL_DIM)).astype(np.float32)
    return Codebook.from_centroids(centroids)


def add_images(index: TwoStageIndex, first_id: int, count: int, seed: int) -> np.ndarray:
    """Add ``count`` random images with ids first_id.. to ``index``; returns their ids."""
    rng = np.random.default_rng(seed)
    ids = np.arange(first_id, first_id + count, dtype=np.int64)
    local = rng.standard_normal((count * LOCALS_PER_IMAGE, LOCAL_DIM)).astype(np.float32)
    index.add(rng.standard_normal((count, index.global_dim)).astype(np.float32), ids, local,
              np.repeat(ids, LOCALS_PER_IMAGE))
    return ids


def new_index(first_id: int, count: int, seed: int, global_dim: int = GLOBAL_DIM) -> TwoStageIndex:
    index = TwoStageIndex.create(codebook(), global_dim)
    add_images(index, first_id, count, seed)
    return index


def ids_of(index: TwoStageIndex) -> list[int]:
    return sorted(int(i) for i in index.image_ids)


# ------------------------------------------------------------------------------ worker actions
def _wait_for(path: Path, workers: tuple[subprocess.Popen, ...] = ()) -> None:
    """Wait until ``path`` exists (a worker's signal); fail early when a worker has died."""
    deadline = time.monotonic() + WORKER_TIMEOUT_SECONDS
    while not path.exists():
        for worker in workers:
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited ({worker.returncode}): {worker.stderr.read()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)


def worker_append(target, first_id, count, ready, go) -> None:
    """Read-modify-write under the writer lock: load, add ``count`` images, save."""
    Path(ready).touch()
    _wait_for(Path(go))
    with persistence.writer_lock(target):
        index = TwoStageIndex.load(target)
        add_images(index, int(first_id), int(count), seed=int(first_id))
        time.sleep(APPEND_HOLD_SECONDS)
        index.save(target)
    print(f"+{count} added", flush=True)


def worker_hold(target, ready, seconds) -> None:
    with persistence.writer_lock(target):
        Path(ready).touch()
        time.sleep(float(seconds))


def worker_rewrite(target, source_a, source_b, rounds, log) -> None:
    """Save two different indexes to ``target`` in turn; log each save's monotonic interval."""
    indexes = [TwoStageIndex.load(source_a), TwoStageIndex.load(source_b)]
    intervals = []
    for number in range(int(rounds)):
        start = time.monotonic()
        indexes[number % 2].save(target)
        intervals.append([start, time.monotonic()])
    Path(log).write_text(json.dumps(intervals))


def worker_killed_save(target, source) -> None:
    """Save ``source`` to ``target`` but stop in the middle (both components written, the top
    manifest not yet) and wait there to be killed."""
    index = TwoStageIndex.load(source)
    original = AsmkIndex.save

    def save_then_stall(self, directory):
        original(self, directory)
        print("mid-save", flush=True)
        time.sleep(WORKER_TIMEOUT_SECONDS)

    AsmkIndex.save = save_then_stall
    index.save(target)


def worker_killed_legacy_save(target) -> None:
    """The older writer (persistence.atomic_directory, a temporary beside the target), killed."""
    with persistence.atomic_directory(target) as temporary:
        (Path(temporary) / "big.bin").write_bytes(os.urandom(1 << 20))
        print("mid-save", flush=True)
        time.sleep(WORKER_TIMEOUT_SECONDS)


WORKERS = {"append": worker_append, "hold": worker_hold, "rewrite": worker_rewrite,
           "killed-save": worker_killed_save, "killed-legacy-save": worker_killed_legacy_save}


def spawn(action: str, *args) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, __file__, action, *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=WORKER_TIMEOUT_SECONDS)
    assert process.returncode == 0, f"worker failed ({process.returncode}):\n{stderr}"
    return stdout, stderr


# ------------------------------------------------------------------------------ tests
def test_two_appending_processes_both_keep_their_images(tmp_path):
    target = tmp_path / "index"
    new_index(0, BASE_IMAGES, seed=0).save(target)
    first_ids = [1000, 2000]
    ready = [tmp_path / f"ready{n}" for n in range(2)]
    go = tmp_path / "go"
    workers = [spawn("append", target, first, APPENDED_IMAGES, flag, go)
               for first, flag in zip(first_ids, ready)]
    for flag in ready:
        _wait_for(flag, tuple(workers))
    go.touch()                                       # both start their read-modify-write now
    outputs = [finish(worker) for worker in workers]
    assert all(f"+{APPENDED_IMAGES} added" in out for out, _ in outputs)
    expected = list(range(BASE_IMAGES)) + [first + n for first in first_ids
                                           for n in range(APPENDED_IMAGES)]
    assert ids_of(TwoStageIndex.load(target)) == sorted(expected)
    # they did contend: one of them waited, and said for whom
    waits = [err for _, err in outputs if "waiting for it to finish" in err]
    assert len(waits) == 1
    other = workers[0].pid if waits[0] == outputs[1][1] else workers[1].pid
    assert f"pid {other}" in waits[0]


def test_a_held_lock_refuses_at_once_naming_the_holder(tmp_path):
    target = tmp_path / "index"
    new_index(0, BASE_IMAGES, seed=0).save(target)
    ready = tmp_path / "ready"
    holder = spawn("hold", target, ready, HOLD_SECONDS)
    try:
        _wait_for(ready, (holder,))
        started = time.monotonic()
        with pytest.raises(persistence.WriterLockedError) as refused:
            with persistence.writer_lock(target, timeout=0):
                pass
        assert time.monotonic() - started < 1.0
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "hold" in message and str(target) in message
        assert refused.value.holder["pid"] == holder.pid
        with pytest.raises(persistence.WriterLockedError):       # a save waits, up to a limit
            with persistence.publish_directory(target, lock_timeout=0.2):
                pass
    finally:
        finish(holder)
    with persistence.writer_lock(target, timeout=0):              # free once the holder is done
        pass


def test_a_reader_never_sees_half_a_write(tmp_path):
    target, source_a, source_b = tmp_path / "index", tmp_path / "a", tmp_path / "b"
    index_a = new_index(0, BIG_IMAGES, seed=1, global_dim=BIG_GLOBAL_DIM)
    index_b = new_index(0, BIG_IMAGES + 1, seed=2, global_dim=BIG_GLOBAL_DIM)
    valid = {tuple(ids_of(index_a)), tuple(ids_of(index_b))}
    index_a.save(source_a)
    index_b.save(source_b)
    index_a.save(target)
    log = tmp_path / "intervals.json"
    writer = spawn("rewrite", target, source_a, source_b, REWRITE_ROUNDS, log)
    loads, failures = [], []
    while writer.poll() is None or len(loads) < MIN_LOADS:
        start = time.monotonic()
        try:
            loaded = TwoStageIndex.load(target)
            if tuple(ids_of(loaded)) not in valid:
                failures.append(f"a mixed index of {len(loaded)} images")
        except Exception as error:  # noqa: BLE001 - every failure is counted
            failures.append(f"{type(error).__name__}: {error}")
        loads.append((start, time.monotonic()))
    finish(writer)
    saves = json.loads(log.read_text())
    overlapping = sum(any(start < save_end and save_start < end for save_start, save_end in saves)
                      for start, end in loads)
    summary = f"{len(loads)} loads, {overlapping} during a save, {len(failures)} failed"
    assert overlapping >= MIN_OVERLAPPING_LOADS, summary
    assert failures == [], f"{summary}: {failures[:3]}"


def _temporaries(target: Path) -> list[str]:
    inside = [p.name for p in target.iterdir() if p.name.startswith(".tmp-")]
    beside = [p.name for p in target.parent.iterdir()
              if p.name.startswith((f".{target.name}.tmp-", f".{target.name}.old-"))]
    return inside + beside


def test_a_killed_writer_leaves_temporaries_that_the_next_save_removes(tmp_path):
    target, source = tmp_path / "index", tmp_path / "source"
    first, second = new_index(0, BASE_IMAGES, seed=0), new_index(500, BASE_IMAGES, seed=3)
    first.save(target)
    second.save(source)
    for action, args in (("killed-save", (target, source)), ("killed-legacy-save", (target,))):
        worker = spawn(action, *args)
        assert worker.stdout.readline().strip() == "mid-save", worker.stderr.read()
        worker.send_signal(signal.SIGKILL)
        worker.wait(timeout=WORKER_TIMEOUT_SECONDS)
    assert len(_temporaries(target)) >= 2, _temporaries(target)
    assert ids_of(TwoStageIndex.load(target)) == ids_of(first)     # the last good version
    second.save(target)                      # the dead writer's lock is free: this does not wait
    assert _temporaries(target) == []
    assert ids_of(TwoStageIndex.load(target)) == ids_of(second)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    WORKERS[sys.argv[1]](*sys.argv[2:])
