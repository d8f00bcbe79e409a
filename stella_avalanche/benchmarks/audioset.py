"""Continual-AS: AudioSet in 7 tasks (``docs/benchmarks.md`` §3.2).

The split CSVs are produced once by ``benchmarks/prepare_audioset.py``
(:func:`~stella_avalanche.benchmarks.splits.prepare_audioset_splits`); this factory only reads them.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from stella_avalanche.benchmarks.common import scenario_from_split_csvs
from stella_avalanche.benchmarks.splits import AUDIOSET_FILES, AUDIOSET_TASKS

if TYPE_CHECKING:
    from avalanche.benchmarks import CLScenario

    from stella_avalanche.data.features import FeatureConfig

__all__ = ["AUDIOSET_TASKS", "audioset_benchmark"]


def audioset_benchmark(root: str | os.PathLike, *, split_dir: str | os.PathLike | None = None,
                       features: "FeatureConfig | None" = None, cache: Any = None, on_error: str = "raise",
                       tasks: Sequence[str] | None = None, seed: int = 0) -> "CLScenario":
    """Continual-AS scenario over prepared split CSVs.

    Files read from ``split_dir``: ``audioset_2m_cleaned.csv``, ``audioset_2m_eval_cleaned.csv``,
    ``audioset_2m_eval_5_per_class_for_retrieval_cleaned.csv``, ``class_labels_indices_audioset.csv``
    (171 rows). Task order: human, vehicle, nature, animal, others, home, music. Labels are multi-hot
    over the 171-row table.

    :param root: data root (the CSV paths are relative to it).
    :param split_dir: folder of the split CSVs (default ``root``).
    :param features: preprocessing config (default ``FeatureConfig.paper()``).
    :param cache: feature-cache directory (one decode-once cache per dataset) or a ``FeatureCache``
        covering every clip; None decodes every sample.
    :param on_error: dataset error policy (``"raise"``: never substitute another sample).
    :param tasks: subset of the task names (stream order as given); ``None`` = all 7 in paper order.
    :param seed: base seed of the training augmentation.
    :returns: ``CLScenario`` with ``train_stream``, ``test_stream``, ``retrieval_stream`` (one experience
        per task) and ``task_names``, ``features``, ``name == "continual_as"``.
    :raises ValueError: unknown task name (valid names listed); a task without clips (task and file named).
    """
    return scenario_from_split_csvs(root, split_dir=split_dir, files=AUDIOSET_FILES, all_tasks=AUDIOSET_TASKS,
                                    tasks=tasks, features=features, cache=cache, on_error=on_error,
                                    multi_label=True, name="continual_as", seed=seed)
