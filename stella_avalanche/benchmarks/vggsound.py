"""Continual-VS: VGGSound in 8 tasks (``docs/benchmarks.md`` §3.1).

The split CSVs are produced once by ``benchmarks/prepare_vggsound.py``
(:func:`~stella_avalanche.benchmarks.splits.prepare_vggsound_splits`); this factory only reads them.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Sequence

from stella_avalanche.benchmarks.common import scenario_from_split_csvs
from stella_avalanche.benchmarks.splits import VGGSOUND_FILES, VGGSOUND_TASKS

if TYPE_CHECKING:
    from avalanche.benchmarks import CLScenario

    from stella_avalanche.data.features import FeatureConfig

__all__ = ["VGGSOUND_TASKS", "vggsound_benchmark"]


def vggsound_benchmark(root: str | os.PathLike, *, split_dir: str | os.PathLike | None = None,
                       features: "FeatureConfig | None" = None, cache: Any = None, on_error: str = "raise",
                       tasks: Sequence[str] | None = None, seed: int = 0) -> "CLScenario":
    """Continual-VS scenario over prepared split CSVs.

    Files read from ``split_dir``: ``vgg_train_cleaned_shrink8.csv``, ``vgg_test_cleaned_shrink8.csv``,
    ``vgg_test_5_per_class_for_retrieval_cleaned_shrink8.csv``, ``class_labels_indices_shrink8.csv``.
    Task order: sports, music, vehicle, people, animals, home_nature, others_part1, others_part2.

    :param root: data root (the CSV paths are relative to it).
    :param split_dir: folder of the split CSVs (default ``root``).
    :param features: preprocessing config (default ``FeatureConfig.paper()``).
    :param cache: feature-cache directory (one decode-once cache per dataset) or a ``FeatureCache``
        covering every clip; None decodes every sample.
    :param on_error: dataset error policy (``"raise"``: never substitute another sample).
    :param tasks: subset of the task names (stream order as given); ``None`` = all 8 in paper order.
    :param seed: base seed of the training augmentation.
    Sample ``label`` = class id (row of the 160-class table); retrieval samples have ``label == -1``
    because the retrieval set also holds clips of untrained classes, absent from that table.

    :returns: ``CLScenario`` with ``train_stream``, ``test_stream``, ``retrieval_stream`` (one experience
        per task) and ``task_names``, ``features``, ``name == "continual_vs"``.
    :raises ValueError: unknown task name (valid names listed); a task without clips (task and file named).
    """
    return scenario_from_split_csvs(root, split_dir=split_dir, files=VGGSOUND_FILES, all_tasks=VGGSOUND_TASKS,
                                    tasks=tasks, features=features, cache=cache, on_error=on_error,
                                    multi_label=False, name="continual_vs", retrieval_labels=False,
                                    seed=seed)
