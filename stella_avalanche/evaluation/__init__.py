"""Evaluation: retrieval ranks and recall, continual metrics, loggers and reports.

Names are re-exported lazily: ``retrieval`` needs only torch, while ``metrics``, ``loggers`` and
``report`` import Avalanche (several seconds).
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "RetrievalRanks": "retrieval", "retrieval_ranks": "retrieval", "recall_report": "retrieval",
    "median_rank": "retrieval",
    "average_accuracy": "metrics", "forgetting": "metrics", "RecallMatrix": "metrics",
    "RetrievalEmbeddingStore": "metrics", "RetrievalRecallPerExperience": "metrics",
    "RecallMatrixPlugin": "metrics", "retrieval_metrics": "metrics", "find_recall_matrix_plugin": "metrics",
    "JSONLLogger": "loggers", "make_loggers": "loggers",
    "build_results": "report", "validate_results": "report", "write_results_json": "report",
    "load_results": "report", "summary_table_markdown": "report", "plot_recall_matrix": "report",
    "plot_task_curves": "report", "write_report": "report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
