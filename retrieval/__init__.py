"""Layer 3: the two-stage search engine, index building from images, evaluation.

    from retrieval import search, Searcher
    results = search("INDEX_DIR", "query.jpg", k=10)      # SearchResults: hits with name, scores

See :mod:`retrieval.searcher` (search API), :mod:`retrieval.builder` (codebook and index
directories), :mod:`retrieval.evaluation` (revisitop / UKBench figures), :mod:`retrieval.config`.
"""
from .builder import CodebookReport, IndexReport, build_codebook, build_index
from .config import SystemConfig
from .evaluation import evaluate_index, format_evaluation
from .index_store import RetrievalIndex
from .searcher import Searcher, SearchHit, SearchResults, clear_searcher_cache, search

__all__ = ["search", "Searcher", "SearchResults", "SearchHit", "clear_searcher_cache",
           "RetrievalIndex", "SystemConfig", "build_codebook", "build_index", "CodebookReport",
           "IndexReport", "evaluate_index", "format_evaluation"]
