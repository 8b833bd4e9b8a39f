"""Revisited Oxford/Paris data layout and evaluation protocol (numpy only).

Layout: ``DIR/gnd_NAME.pkl`` (keys ``imlist``, ``qimlist``, ``gnd``; ``gnd[i]`` holds ``easy``,
``hard``, ``junk`` index lists into ``imlist`` and ``bbx`` = query box (x0, y0, x1, y1) or None)
and images in ``DIR/jpg/NAME.jpg``.

Protocol (Radenovic et al., CVPR 2018, as in the public revisitop code, re-written here):
  * Easy:   positives = easy,        ignored (junk) = junk + hard
  * Medium: positives = easy + hard, ignored = junk
  * Hard:   positives = hard,        ignored = junk + easy
Ignored images are removed from the ranking before AP is computed. AP uses the trapezoidal
interpolation of revisitop's ``compute_ap``; mP@k uses revisitop's capped denominator
``kq = min(max rank of a positive, k)``. Queries without positives under a setting are excluded
from that setting's averages.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from asmk_index.safe_pickle import load_restricted

PROTOCOL_SETTINGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # setting: (positive keys, ignored keys)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)


@dataclass
class RevisitopDataset:
    """A revisitop-layout dataset: database list, query list and per-query ground truth."""

    root: Path
    name: str
    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, Any]]
    image_extension: str = ".jpg"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def image_dir(self) -> Path:
        return self.root / "jpg"

    def image_path(self, name: str) -> Path:
        """Path of the image called ``name`` (``DIR/jpg/NAME.jpg``)."""
        return self.image_dir / f"{name}{self.image_extension}"

    def database_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.imlist]

    def query_paths(self) -> list[Path]:
        return [self.image_path(n) for n in self.qimlist]

    def query_bbox(self, query_index: int) -> tuple[float, float, float, float] | None:
        """Query box (x0, y0, x1, y1) in pixels or None (whole image)."""
        bbx = self.gnd[query_index].get("bbx")
        if bbx is None:
            return None
        return tuple(float(v) for v in bbx)  # type: ignore[return-value]

    def query_bboxes(self) -> list[tuple[float, float, float, float] | None]:
        """Every query's box (for ``extract_to_file(..., boxes=)``)."""
        return [self.query_bbox(q) for q in range(len(self.qimlist))]

    def positives(self, query_index: int, setting: str = "medium") -> list[int]:
        """Database indices that count as positives of a query under a protocol setting."""
        keys = PROTOCOL_SETTINGS[setting][0]
        return sorted({int(i) for k in keys for i in self.gnd[query_index].get(k, [])})

    def __len__(self) -> int:
        return len(self.imlist)


def load_revisitop(root: str | os.PathLike, name: str | None = None) -> RevisitopDataset:
    """Read ``root/gnd_NAME.pkl``. ``name`` defaults to the single gnd file found in ``root``.

    The pickle is read with a restricted unpickler (plain containers and numpy arrays only, see
    :mod:`asmk_index.safe_pickle`): a file that asks for any other global raises
    ``UnsafePickleError`` (a ValueError naming the file and the global) and runs nothing.

    Raises FileNotFoundError when no (or no such) gnd file exists, ValueError when several exist and
    no name is given, the file is not a readable pickle or lacks the required keys.
    """
    root = Path(root)
    if name is None:
        candidates = sorted(root.glob("gnd_*.pkl"))
        if not candidates:
            raise FileNotFoundError(f"no gnd_*.pkl ground-truth file in {root}")
        if len(candidates) > 1:
            raise ValueError(f"several ground-truth files in {root}: {[c.name for c in candidates]}; pass name=")
        gnd_path = candidates[0]
        name = gnd_path.stem[len("gnd_"):]
    else:
        gnd_path = root / f"gnd_{name}.pkl"
        if not gnd_path.is_file():
            raise FileNotFoundError(f"ground-truth file not found: {gnd_path}")
    cfg = load_restricted(gnd_path, encoding="latin1")
    if not isinstance(cfg, dict):
        raise ValueError(f"{gnd_path}: expected a dict with imlist, qimlist, gnd; got {type(cfg).__name__}")
    missing = [k for k in ("imlist", "qimlist", "gnd") if k not in cfg]
    if missing:
        raise ValueError(f"{gnd_path} lacks keys {missing} (revisitop layout needs imlist, qimlist, gnd)")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{gnd_path}: {len(cfg['gnd'])} gnd entries for {len(cfg['qimlist'])} queries")
    extra = {k: v for k, v in cfg.items() if k not in ("imlist", "qimlist", "gnd")}
    return RevisitopDataset(root=root, name=name, imlist=list(cfg["imlist"]), qimlist=list(cfg["qimlist"]),
                            gnd=list(cfg["gnd"]), image_extension=cfg.get("ext", ".jpg"), extra=extra)


def ranks_from_scores(scores: np.ndarray) -> np.ndarray:
    """``(n_q, n_db)`` similarity scores -> ``(n_q, n_db)`` database indices by decreasing score (stable)."""
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be (n_q, n_db), got shape {scores.shape}")
    return np.argsort(-scores, axis=1, kind="stable")


def compute_ap(positive_ranks: np.ndarray, n_positives: int) -> float:
    """Revisitop AP from the sorted 0-based ranks of the retrieved positives (junk already removed).

    Trapezoidal rule over the precision-recall curve: each positive at rank r (j-th positive, 0-based)
    adds recall_step * (P_before + P_at) / 2 with P_before = j / r (1 when r = 0), P_at = (j+1)/(r+1).
    """
    if n_positives <= 0:
        raise ValueError("n_positives must be positive")
    recall_step = 1.0 / n_positives
    ap = 0.0
    for j, rank in enumerate(np.asarray(positive_ranks, dtype=np.int64)):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_at = (j + 1) / (rank + 1)
        ap += (precision_before + precision_at) * recall_step / 2.0
    return float(ap)


def _positive_ranks(ranking: np.ndarray, positives: np.ndarray, ignored: np.ndarray) -> np.ndarray:
    """Sorted 0-based ranks of ``positives`` in ``ranking`` after removing ``ignored`` entries."""
    keep = ~np.isin(ranking, ignored) if ignored.size else np.ones(len(ranking), dtype=bool)
    cleaned = ranking[keep]
    return np.flatnonzero(np.isin(cleaned, positives))


def _as_query_major(ranks: np.ndarray, n_queries: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D, got shape {ranks.shape}")
    if ranks.shape[1] == n_queries and ranks.shape[0] != n_queries:
        return ranks.T
    if ranks.shape[0] == n_queries:
        return ranks
    raise ValueError(f"ranks shape {ranks.shape} does not match {n_queries} queries")


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[dict[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    *,
    query_major: bool | None = None,
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Revisitop mAP and mP@k.

    Args:
        ranks: database indices sorted by decreasing similarity, revisitop's ``(n_db, n_q)`` layout
            (column i = ranking of query i) or ``(n_q, n_db)`` when ``query_major=True``. With
            ``query_major=None`` the layout is inferred from ``len(gnd)`` (ambiguous only when
            n_db == n_q, which then raises ValueError asking for ``query_major``). A ranking may be
            truncated (top-k); positives not in it contribute nothing.
        gnd: per query ``{'ok': [...], 'junk': [...]}`` (positives and ignored indices).
        kappas: the k of mP@k.

    Returns:
        (mAP, aps (n_q,), mP@k (len(kappas),), P@k per query (n_q, len(kappas))); queries without
        positives get NaN and are excluded from the means.
    """
    n_queries = len(gnd)
    ranks = np.asarray(ranks)
    if query_major is None:
        if ranks.ndim == 2 and ranks.shape[0] == ranks.shape[1]:
            raise ValueError(
                f"ranks is square {ranks.shape}: the layout is ambiguous; pass query_major=True when rows are "
                "queries ((n_q, n_db)) or query_major=False for revisitop's (n_db, n_q) layout")
        query_rows = _as_query_major(ranks, n_queries)
    else:
        query_rows = ranks if query_major else ranks.T
    if query_rows.shape[0] != n_queries:
        raise ValueError(f"ranks shape {ranks.shape} does not match {n_queries} queries")
    kappas = [int(k) for k in kappas]
    aps = np.full(n_queries, np.nan)
    precisions = np.full((n_queries, len(kappas)), np.nan)
    for q in range(n_queries):
        positives = np.asarray(gnd[q].get("ok", []), dtype=np.int64)
        if positives.size == 0:
            continue
        ignored = np.asarray(gnd[q].get("junk", []), dtype=np.int64)
        pos_ranks = _positive_ranks(np.asarray(query_rows[q]), positives, ignored)
        aps[q] = compute_ap(pos_ranks, positives.size)
        if pos_ranks.size == 0:
            precisions[q] = 0.0
            continue
        one_based = pos_ranks + 1
        for j, k in enumerate(kappas):
            kq = min(int(one_based.max()), k)
            precisions[q, j] = float((one_based <= kq).sum()) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return float("nan"), aps, np.full(len(kappas), np.nan), precisions
    return float(aps[valid].mean()), aps, precisions[valid].mean(axis=0), precisions


def protocol_gnd(gnd: Sequence[dict[str, Any]], setting: str) -> list[dict[str, list[int]]]:
    """Turn revisitop gnd (easy/hard/junk) into {'ok', 'junk'} for 'easy' | 'medium' | 'hard'."""
    if setting not in PROTOCOL_SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; use one of {list(PROTOCOL_SETTINGS)}")
    positive_keys, ignored_keys = PROTOCOL_SETTINGS[setting]
    out = []
    for entry in gnd:
        ok = [int(i) for k in positive_keys for i in (entry.get(k) or [])]
        junk = [int(i) for k in ignored_keys for i in (entry.get(k) or [])]
        out.append({"ok": ok, "junk": junk})
    return out


def evaluate_revisitop(
    ranks: np.ndarray,
    gnd: Sequence[dict[str, Any]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
    *,
    query_major: bool | None = None,
) -> dict[str, Any]:
    """Revisited Oxford/Paris evaluation (Easy / Medium / Hard).

    ``ranks``: see :func:`compute_map` (``(n_db, n_q)`` revisitop layout, or ``(n_q, n_db)``;
    pass ``query_major`` when n_db == n_q and rows are queries).

    Returns ``{'mAP': {'easy','medium','hard'} (percent), 'mP@k': {setting: {k: percent}},
    'aps': {setting: (n_q,) array}, 'n_queries': {setting: count with positives}}``. Settings in
    which no query has positives (e.g. 'hard' on UKBench) report NaN.
    """
    result: dict[str, Any] = {"mAP": {}, "mP@k": {}, "aps": {}, "n_queries": {}}
    for setting in PROTOCOL_SETTINGS:
        m_ap, aps, m_pr, _ = compute_map(ranks, protocol_gnd(gnd, setting), kappas, query_major=query_major)
        result["mAP"][setting] = 100.0 * m_ap
        result["mP@k"][setting] = {k: 100.0 * float(v) for k, v in zip(kappas, m_pr)}
        result["aps"][setting] = aps
        result["n_queries"][setting] = int((~np.isnan(aps)).sum())
    return result


def format_revisitop(result: dict[str, Any]) -> str:
    """One line 'mAP E/M/H: a / b / c | mP@k ...' for logs."""
    m = result["mAP"]
    parts = [f"mAP E/M/H: {m['easy']:.2f} / {m['medium']:.2f} / {m['hard']:.2f}"]
    for setting in PROTOCOL_SETTINGS:
        prs = ", ".join(f"@{k} {v:.2f}" for k, v in result["mP@k"][setting].items())
        parts.append(f"mP {setting}: {prs}")
    return " | ".join(parts)


def ukbench_ns_score(ranks: np.ndarray, group_size: int = 4, *, query_major: bool = True,
                     query_indices: Sequence[int] | None = None) -> float:
    """UKBench N-S score: mean number of same-group images among the top ``group_size`` results.

    Images are grouped by index // group_size (UKBench: 4 consecutive images per object). The query
    itself is counted when it is in its own top-4, so the perfect score is ``group_size`` (4.0).

    Args:
        ranks: ``(n_q, n_db)`` database indices by decreasing similarity (``query_major=True``,
            default) or ``(n_db, n_q)``.
        query_indices: database index of each query (default: query q is database image q).
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"ranks must be 2-D, got {ranks.shape}")
    rows = ranks if query_major else ranks.T
    if rows.shape[1] < group_size:
        raise ValueError(f"need at least {group_size} results per query, got {rows.shape[1]}")
    queries = np.arange(rows.shape[0]) if query_indices is None else np.asarray(query_indices)
    top = rows[:, :group_size] // group_size
    return float((top == (queries // group_size)[:, None]).sum(axis=1).mean())
