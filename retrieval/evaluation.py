"""Evaluation of an index on a revisitop-layout dataset, for the three search modes.

The revisited Oxford/Paris protocol (``imagedata.revisitop``: mAP Easy/Medium/Hard, mP@1/5/10,
query boxes applied, junk ignored), the UKBench N-S score when the ground truth is made of groups
of four consecutive images, the median latency per query split into feature extraction, stage 1
and stage 2, and the index size per image.

Rankings are complete (every database image ranked), as the protocol expects: ``global`` and
``asmk`` rank the whole collection (images ASMK* does not return come after, in global order);
``two_stage`` re-ranks the global top-``shortlist`` by ASMK* and keeps the global order after it.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from asmk_index.persistence import current_version
from imagedata.revisitop import evaluate_revisitop, load_revisitop, ukbench_ns_score

from .searcher import MODES, Searcher, get_searcher

logger = logging.getLogger(__name__)


def _stem(name: str) -> str:
    path = Path(name)
    return path.with_suffix("").as_posix() if path.suffix else path.as_posix()


def directory_bytes(path: str | os.PathLike) -> int:
    """Total size of the files under ``path``."""
    return sum(entry.stat().st_size for entry in Path(path).rglob("*") if entry.is_file())


def is_ukbench_layout(gnd: Sequence[dict], query_positions: Sequence[int | None],
                      group_size: int = 4) -> bool:
    """True when every query is a database image whose positives are exactly the other members
    of its group of ``group_size`` consecutive images (UKBench)."""
    if not gnd:
        return False
    for entry, position in zip(gnd, query_positions):
        if position is None:
            return False
        start = (position // group_size) * group_size
        expected = set(range(start, start + group_size)) - {position}
        positives = {int(i) for key in ("easy", "hard") for i in (entry.get(key) or [])}
        if positives != expected:
            return False
    return True


@dataclass
class ModeEvaluation:
    """One mode's figures: revisitop result dict, N-S score, per-query stage timings (seconds)."""
    revisitop: dict
    ns_score: float | None
    stage1_seconds: list[float] = field(default_factory=list)
    stage2_seconds: list[float] = field(default_factory=list)


def _full_ranking(result_positions: Sequence[int], fallback: np.ndarray, n_database: int
                  ) -> np.ndarray:
    """The ranked positions followed by ``fallback``'s remaining ones (then any never ranked)."""
    sequence = np.concatenate([np.asarray(result_positions, dtype=np.int64).reshape(-1),
                               np.asarray(fallback, dtype=np.int64).reshape(-1),
                               np.arange(n_database, dtype=np.int64)])
    sequence = sequence[sequence >= 0]
    _, first = np.unique(sequence, return_index=True)
    return sequence[np.sort(first)]


def evaluate_index(dataset: str | os.PathLike, index: str | os.PathLike | Searcher, *,
                   modes: Sequence[str] = MODES, shortlist: int | None = None,
                   max_queries: int | None = None, progress: bool = True) -> dict:
    """Evaluate ``index`` (built from ``dataset/jpg``) on the dataset's queries.

    Returns ``{"dataset", "n_database", "n_queries", "modes": {mode: {"mAP": {easy, medium, hard},
    "mP@k": {...}, "ns_score"}}, "latency_ms": {mode: {extraction, stage1, stage2, total}}
    (medians), "index_bytes_per_image", "index_bytes"}``.
    """
    data = load_revisitop(dataset)
    searcher = index if isinstance(index, Searcher) else get_searcher(index)
    shortlist = int(shortlist or searcher.config.search.shortlist)
    position_of = {name: position for position, name in enumerate(data.imlist)}
    id_position = {}
    for name, image_id in zip(searcher.index.names, searcher.index.ids):
        position = position_of.get(_stem(name), -1)
        id_position[int(image_id)] = position
    missing = len(data.imlist) - sum(1 for p in id_position.values() if p >= 0)
    if missing:
        logger.warning("%d of the dataset's %d database images are not in the index (they rank "
                       "last)", missing, len(data.imlist))
    n_database = len(data.imlist)
    query_count = len(data.qimlist) if max_queries is None else min(max_queries,
                                                                    len(data.qimlist))
    n_index = len(searcher.index)
    rankings = {mode: [] for mode in modes}
    stage_times = {mode: ([], []) for mode in modes}
    extraction_times = []
    iterator = range(query_count)
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="queries", unit="query", dynamic_ncols=True)
    for query_index in iterator:
        query = searcher.prepare(data.image_path(data.qimlist[query_index]),
                                 bbox=data.query_bbox(query_index),
                                 label=data.qimlist[query_index])
        extraction_times.append(query.extraction_seconds)
        global_order = searcher.search_features(query, k=n_index, mode="global")
        global_positions = np.array([id_position[hit.image_id] for hit in global_order])
        for mode in modes:
            if mode == "global":
                result = global_order
            else:
                result = searcher.search_features(
                    query, k=shortlist if mode == "two_stage" else n_index,
                    shortlist=shortlist, mode=mode)
            positions = [id_position[hit.image_id] for hit in result]
            rankings[mode].append(_full_ranking(positions, global_positions, n_database))
            stage_times[mode][0].append(result.timings["stage1"])
            stage_times[mode][1].append(result.timings["stage2"])
    gnd = data.gnd[:query_count]
    query_positions = [position_of.get(name) for name in data.qimlist[:query_count]]
    ukbench = is_ukbench_layout(gnd, query_positions)
    report = {"dataset": str(dataset), "n_database": n_database, "n_queries": query_count,
              "shortlist": shortlist, "modes": {}, "latency_ms": {}}
    median_extraction = 1000 * float(np.median(extraction_times)) if extraction_times else 0.0
    for mode in modes:
        ranks = np.stack(rankings[mode]) if rankings[mode] else np.zeros((0, n_database), int)
        result = evaluate_revisitop(ranks, gnd, query_major=True)
        entry = {"mAP": result["mAP"], "mP@k": result["mP@k"],
                 "n_queries": result["n_queries"], "ns_score": None}
        if ukbench:
            entry["ns_score"] = ukbench_ns_score(ranks, query_indices=query_positions)
        report["modes"][mode] = entry
        stage1 = 1000 * float(np.median(stage_times[mode][0]))
        stage2 = 1000 * float(np.median(stage_times[mode][1]))
        report["latency_ms"][mode] = {"extraction": median_extraction, "stage1": stage1,
                                      "stage2": stage2,
                                      "total": median_extraction + stage1 + stage2}
    index_dir = getattr(searcher, "index_directory", None)
    if index_dir is not None:
        two_stage_dir = current_version(index_dir) / "two_stage"
        total = directory_bytes(two_stage_dir)
        report["index_bytes"] = total
        report["index_bytes_per_image"] = total / max(1, n_index)
        report["index_bytes_per_image_parts"] = {
            part: directory_bytes(two_stage_dir / part) / max(1, n_index)
            for part in ("global", "asmk") if (two_stage_dir / part).is_dir()}
    report["memory_bytes_per_image"] = searcher.index.two_stage.memory_bytes() / max(1, n_index)
    return report


def format_evaluation(report: dict) -> str:
    """A plain-text table of :func:`evaluate_index`'s report."""
    lines = [f"dataset {report['dataset']}: {report['n_database']} database images, "
             f"{report['n_queries']} queries, shortlist {report['shortlist']}",
             f"{'mode':<10} {'mAP E':>7} {'mAP M':>7} {'mAP H':>7} {'mP@1 M':>7} {'mP@5 M':>7} "
             f"{'mP@10 M':>8} {'N-S':>6} | {'extract':>8} {'stage1':>8} {'stage2':>8} ms"]
    for mode, entry in report["modes"].items():
        m, precision = entry["mAP"], entry["mP@k"]["medium"]
        ns = "-" if entry["ns_score"] is None else f"{entry['ns_score']:.3f}"
        latency = report["latency_ms"][mode]
        lines.append(f"{mode:<10} {m['easy']:7.2f} {m['medium']:7.2f} {m['hard']:7.2f} "
                     f"{precision[1]:7.2f} {precision[5]:7.2f} {precision[10]:8.2f} {ns:>6} | "
                     f"{latency['extraction']:8.1f} {latency['stage1']:8.2f} "
                     f"{latency['stage2']:8.2f}")
    if "index_bytes_per_image" in report:
        parts = ", ".join(f"{name} {value / 1024:.1f} KiB"
                          for name, value in report.get("index_bytes_per_image_parts", {}).items())
        lines.append(f"index size per image: {report['index_bytes_per_image'] / 1024:.1f} KiB on "
                     f"disk ({parts}); {report['memory_bytes_per_image'] / 1024:.1f} KiB in memory")
    return "\n".join(lines)


__all__ = ["evaluate_index", "format_evaluation", "is_ukbench_layout", "directory_bytes"]
