"""Evaluation of an index on a revisitop-layout dataset: every search variant side by side.

The revisited Oxford/Paris protocol (``imagedata.revisitop``: mAP Easy/Medium/Hard, mP@1/5/10,
query boxes applied, junk ignored), the UKBench N-S score when the ground truth is made of groups
of four consecutive images, the median latency per query of feature extraction and of each stage,
and the index size per image.

Variants (:data:`VARIANTS`): ``global`` (stage 1 alone), ``global+qe`` (alpha-QE), ``global+dba``
and ``global+dba+qe`` (alpha-DBA of the indexed descriptors), ``asmk`` (ASMK* over the whole
collection), ``two_stage`` (global shortlist ranked by the fusion of global and ASMK* scores),
``two_stage+sv`` (and stage 3: spatial verification of the top ``verify_top``, the inlier counts
fused in), ``two_stage+sv+qe`` and ``two_stage+sv+dba+qe`` (all three stages with both
expansions of the global stage), ``two_stage+sv+dba+qe+vqe`` (and the query expanded again with
the verified images: the default search). Rankings are complete (every database image ranked),
as the protocol expects: after a variant's results come the others in its stage-1 order.

``queries``: "all", or "even" / "odd": the queries of every other object (objects are the
connected groups of queries and their positives, in order of first appearance), so settings can
be chosen on one half and reported on the other.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from asmk_index.persistence import current_version
from imagedata.revisitop import evaluate_revisitop, load_revisitop, ukbench_ns_score

from .searcher import Searcher, get_searcher

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


def full_ranking(result_positions: Sequence[int], fallback: np.ndarray, n_database: int
                 ) -> np.ndarray:
    """The ranked positions followed by ``fallback``'s remaining ones (then any never ranked)."""
    sequence = np.concatenate([np.asarray(result_positions, dtype=np.int64).reshape(-1),
                               np.asarray(fallback, dtype=np.int64).reshape(-1),
                               np.arange(n_database, dtype=np.int64)])
    sequence = sequence[sequence >= 0]
    _, first = np.unique(sequence, return_index=True)
    return sequence[np.sort(first)]


# variants without "+dba" search the indexed descriptors as they are; "+dba" ones their alpha-DBA
# (the config's neighbours); "+vqe": verified query expansion after stage 3. The "+qe" / "+dba" /
# "+sv" / "+vqe" variants' neighbours and verified images where the config has them off (0):
DEFAULT_EXPANSION_NEIGHBORS = 2
DEFAULT_VERIFY_TOP = 20
DEFAULT_VERIFIED_EXPANSION = 20
VARIANTS: dict[str, dict] = {
    "global": {"mode": "global", "query_expansion": 0},
    "global+qe": {"mode": "global", "qe": True},
    "global+dba": {"mode": "global", "query_expansion": 0, "dba": True},
    "global+dba+qe": {"mode": "global", "qe": True, "dba": True},
    "asmk": {"mode": "asmk", "query_expansion": 0},
    "two_stage": {"mode": "two_stage", "verify_top": 0, "query_expansion": 0},
    "two_stage+sv": {"mode": "two_stage", "sv": True, "query_expansion": 0, "verified_expansion": 0},
    "two_stage+sv+qe": {"mode": "two_stage", "sv": True, "qe": True, "verified_expansion": 0},
    "two_stage+sv+dba+qe": {"mode": "two_stage", "sv": True, "qe": True, "dba": True,
                            "verified_expansion": 0},
    "two_stage+sv+dba+qe+vqe": {"mode": "two_stage", "sv": True, "qe": True, "dba": True, "vqe": True},
}
QUERY_SPLITS = ("all", "even", "odd")


def query_objects(gnd: Sequence[dict], query_positions: Sequence[int | None]) -> list[int]:
    """The object of every query: connected groups of queries and their positives (easy, hard),
    numbered in order of first appearance."""
    parent: dict = {}

    def find(node):
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for query, (entry, position) in enumerate(zip(gnd, query_positions)):
        members = [("q", query)] + [("d", int(i)) for key in ("easy", "hard") for i in (entry.get(key) or [])]
        if position is not None:
            members.append(("d", int(position)))
        for member in members[1:]:
            parent[find(member)] = find(members[0])
    numbers: dict = {}
    return [numbers.setdefault(find(("q", query)), len(numbers)) for query in range(len(gnd))]


def _database_positions(data) -> dict[str, int]:
    """Image name -> its position among the database images of a revisitop dataset."""
    return {name: position for position, name in enumerate(data.imlist)}


def query_positions_of(data) -> list[int | None]:
    """Each query's position among the database images of a revisitop dataset (None: not one)."""
    position_of = _database_positions(data)
    return [position_of.get(name) for name in data.qimlist]


def query_split(data, queries: str) -> list[int]:
    """The queries of a revisitop dataset in a split: "all", or "even" / "odd" (those of every
    other object, :func:`query_objects`)."""
    if queries not in QUERY_SPLITS:
        raise ValueError(f"queries must be one of {QUERY_SPLITS}, got {queries!r}")
    objects = query_objects(data.gnd, query_positions_of(data))
    return [q for q in range(len(data.qimlist))
            if queries == "all" or objects[q] % 2 == (0 if queries == "even" else 1)]


def index_positions(data, index) -> dict[int, int]:
    """Image id of a retrieval index -> its position among the dataset's database images (-1:
    not one of them)."""
    position_of = _database_positions(data)
    return {int(image_id): position_of.get(_stem(name), -1) for name, image_id in zip(index.names, index.ids)}


def _variant_options(name: str, settings) -> dict:
    """Searcher.search_features options of a variant (see :data:`VARIANTS`)."""
    options = dict(VARIANTS[name])
    options.pop("dba", None)
    if options.pop("qe", False):
        options["query_expansion"] = settings.query_expansion or DEFAULT_EXPANSION_NEIGHBORS
    if options.pop("sv", False):
        options["verify_top"] = settings.verify_top or DEFAULT_VERIFY_TOP
    if options.pop("vqe", False):
        options["verified_expansion"] = settings.verified_expansion or DEFAULT_VERIFIED_EXPANSION
    return options


def evaluate_index(dataset: str | os.PathLike, index: str | os.PathLike | Searcher, *,
                   variants: Sequence[str] = tuple(VARIANTS), shortlist: int | None = None,
                   max_queries: int | None = None, queries: str = "all",
                   progress: bool = True, prepared: dict | None = None) -> dict:
    """Evaluate ``index`` (built from ``dataset/jpg``) on the dataset's queries, every variant.

    Returns ``{"dataset", "n_database", "n_queries", "queries", "shortlist", "verify_top",
    "modes": {variant: {"mAP": {easy, medium, hard}, "mP@k": {...}, "ns_score"}}, "latency_ms":
    {variant: {extraction, stage1, stage2, stage3, total}} (medians), "index_bytes_per_image",
    "index_bytes", "memory_bytes_per_image"}``. ``prepared``: a dict that keeps every query's
    features between calls (query index -> features), so several settings of one index are
    evaluated with one extraction per query.
    """
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    data = load_revisitop(dataset)
    searcher = index if isinstance(index, Searcher) else get_searcher(index)
    settings = searcher.config.search
    shortlist = int(shortlist or settings.shortlist)
    id_position = index_positions(data, searcher.index)
    missing = len(data.imlist) - sum(1 for p in id_position.values() if p >= 0)
    if missing:
        logger.warning("%d of the dataset's %d database images are not in the index (they rank "
                       "last)", missing, len(data.imlist))
    n_database, n_index = len(data.imlist), len(searcher.index)
    all_positions = query_positions_of(data)
    chosen = query_split(data, queries)
    chosen = chosen[:max_queries] if max_queries is not None else chosen
    cache = prepared if prepared is not None else {}
    iterator = [q for q in chosen if q not in cache]
    if progress:
        from tqdm import tqdm
        iterator = tqdm(iterator, desc="query features", unit="query", dynamic_ncols=True)
    for query_index in iterator:
        cache[query_index] = searcher.prepare(data.image_path(data.qimlist[query_index]),
                                              bbox=data.query_bbox(query_index), label=data.qimlist[query_index])
    prepared = [cache[q] for q in chosen]
    rankings = {name: [] for name in variants}
    stage_times = {name: {"stage1": [], "stage2": [], "stage3": []} for name in variants}
    global_index = searcher.index.two_stage.global_index
    dba_neighbors = settings.dba_neighbors or DEFAULT_EXPANSION_NEIGHBORS
    try:
        for with_dba in (False, True):                       # DBA changes the indexed descriptors
            names = [name for name in variants if bool(VARIANTS[name].get("dba")) == with_dba]
            if not names:
                continue
            global_index.use_expansion(dba_neighbors=dba_neighbors if with_dba else 0)
            for name in names:
                options = _variant_options(name, settings)
                for query in prepared:
                    stage1 = searcher.search_features(query, k=n_index, mode="global",
                                                      query_expansion=options.get("query_expansion", 0))
                    fallback = np.array([id_position[hit.image_id] for hit in stage1])
                    result = stage1
                    if options["mode"] != "global":
                        k = shortlist if options["mode"] == "two_stage" else n_index
                        result = searcher.search_features(query, k=k, shortlist=shortlist, **options)
                    positions = [id_position[hit.image_id] for hit in result]
                    rankings[name].append(full_ranking(positions, fallback, n_database))
                    for stage in stage_times[name]:
                        stage_times[name][stage].append(result.timings[stage])
    finally:
        global_index.use_expansion(dba_neighbors=settings.dba_neighbors)
    gnd = [data.gnd[q] for q in chosen]
    query_positions = [all_positions[q] for q in chosen]
    ukbench = is_ukbench_layout(gnd, query_positions)
    report = {"dataset": str(dataset), "n_database": n_database, "n_queries": len(chosen),
              "queries": queries, "shortlist": shortlist, "verify_top": settings.verify_top,
              "fusion": settings.fusion, "modes": {}, "latency_ms": {}}
    extraction = 1000 * float(np.median([q.extraction_seconds for q in prepared])) if prepared else 0.0
    for name in variants:
        ranks = np.stack(rankings[name]) if rankings[name] else np.zeros((0, n_database), int)
        result = evaluate_revisitop(ranks, gnd, query_major=True)
        entry = {"mAP": result["mAP"], "mP@k": result["mP@k"], "n_queries": result["n_queries"],
                 "ns_score": ukbench_ns_score(ranks, query_indices=query_positions) if ukbench else None}
        report["modes"][name] = entry
        latency = {stage: 1000 * float(np.median(values)) if values else 0.0
                   for stage, values in stage_times[name].items()}
        report["latency_ms"][name] = {"extraction": extraction, **latency,
                                      "total": extraction + sum(latency.values())}
    index_dir = getattr(searcher, "index_directory", None)
    if index_dir is not None:
        two_stage_dir = current_version(index_dir) / "two_stage"
        total = directory_bytes(two_stage_dir)
        report["index_bytes"] = total
        report["index_bytes_per_image"] = total / max(1, n_index)
        report["index_bytes_per_image_parts"] = {
            part: directory_bytes(two_stage_dir / part) / max(1, n_index)
            for part in ("global", "asmk", "local") if (two_stage_dir / part).is_dir()}
    report["memory_bytes_per_image"] = searcher.index.two_stage.memory_bytes() / max(1, n_index)
    return report


def format_evaluation(report: dict) -> str:
    """A plain-text table of :func:`evaluate_index`'s report."""
    lines = [f"dataset {report['dataset']}: {report['n_database']} database images, "
             f"{report['n_queries']} queries ({report['queries']}), shortlist {report['shortlist']}, "
             f"fusion {report['fusion']}, verify top {report['verify_top']}",
             f"{'variant':<23} {'mAP E':>6} {'mAP M':>6} {'mAP H':>6} {'mP@1':>6} {'mP@5':>6} "
             f"{'mP@10':>6} {'N-S':>6} | {'extract':>7} {'stage1':>7} {'stage2':>7} {'stage3':>7} ms"]
    for name, entry in report["modes"].items():
        m, precision = entry["mAP"], entry["mP@k"]["medium"]
        ns = "-" if entry["ns_score"] is None else f"{entry['ns_score']:.3f}"
        latency = report["latency_ms"][name]
        lines.append(f"{name:<23} {m['easy']:6.2f} {m['medium']:6.2f} {m['hard']:6.2f} "
                     f"{precision[1]:6.2f} {precision[5]:6.2f} {precision[10]:6.2f} {ns:>6} | "
                     f"{latency['extraction']:7.1f} {latency['stage1']:7.2f} {latency['stage2']:7.2f} "
                     f"{latency['stage3']:7.2f}")
    if "index_bytes_per_image" in report:
        parts = ", ".join(f"{name} {value / 1024:.1f} KiB"
                          for name, value in report.get("index_bytes_per_image_parts", {}).items())
        lines.append(f"index size per image: {report['index_bytes_per_image'] / 1024:.1f} KiB on "
                     f"disk ({parts}); {report['memory_bytes_per_image'] / 1024:.1f} KiB in memory")
    lines.append("mP@k: medium protocol; latency: median per query (extraction once per query)")
    return "\n".join(lines)


__all__ = ["evaluate_index", "format_evaluation", "is_ukbench_layout", "directory_bytes", "query_objects",
           "query_split", "query_positions_of", "index_positions", "full_ranking", "VARIANTS", "QUERY_SPLITS"]
