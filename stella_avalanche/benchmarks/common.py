"""Avalanche scenario assembly shared by every benchmark factory.

A benchmark is an Avalanche ``CLScenario`` built with ``benchmark_from_datasets`` (avalanche-notes §1)
with three streams of one experience per task, in task order:

* ``train_stream``: the task's training clips;
* ``test_stream``: the task's eval clips (validation loss only, never reported);
* ``retrieval_stream``: the task's retrieval clips; every sample's ``category`` is its task id, so a
  stream-level metric can score the pooled gallery and split the recall per task.

Datasets are wrapped as ``AvalancheDataset([ds], collate_fn=collate_av)`` **without transform groups**:
Avalanche's ``TransformGroups`` turns a dict sample into its key list (avalanche-notes §2), so all
augmentation happens inside the dataset.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

from torch.utils.data import Dataset

if TYPE_CHECKING:  # Avalanche's import costs seconds; only needed when a scenario is built.
    from avalanche.benchmarks import CLScenario
    from avalanche.benchmarks.utils import AvalancheDataset

    from stella_avalanche.data.features import FeatureConfig

__all__ = ["wrap_dataset", "make_av_scenario", "multitask_train_dataset"]


def wrap_dataset(dataset: Dataset) -> "AvalancheDataset":
    """Wrap a dict-sample dataset as an ``AvalancheDataset`` with :func:`collate_av` and no transforms.

    An ``AvalancheDataset`` is returned unchanged (its own collate function is kept).
    """
    from avalanche.benchmarks.utils import AvalancheDataset

    from stella_avalanche.data.datasets import collate_av

    if isinstance(dataset, AvalancheDataset):
        return dataset
    return AvalancheDataset([dataset], collate_fn=collate_av)


def make_av_scenario(*, train: Sequence[Dataset], test: Sequence[Dataset], retrieval: Sequence[Dataset],
                     task_names: Sequence[str], features: "FeatureConfig | None" = None,
                     name: str = "") -> "CLScenario":
    """Build the three-stream audio-video scenario (one experience per task, in ``task_names`` order).

    :param train: per-task training datasets (dict samples: ``video`` (T,3,S,S), ``audio`` (1,A,F),
        ``category`` (), ``label``, ``index``).
    :param test: per-task eval datasets (same sample layout).
    :param retrieval: per-task retrieval datasets; sample ``category`` must equal the task position.
    :param task_names: task names, one per experience.
    :param features: the preprocessing config the datasets were built with (attached as
        ``scenario.features``).
    :param name: benchmark name (``scenario.name``).
    :returns: ``CLScenario`` with ``train_stream``, ``test_stream``, ``retrieval_stream`` and the
        attributes ``task_names: list[str]``, ``features``, ``name``.
    :raises ValueError: stream lengths differ from the number of task names, or duplicate task names.
    """
    from avalanche.benchmarks import benchmark_from_datasets

    task_names = [str(t) for t in task_names]
    if len(set(task_names)) != len(task_names):
        raise ValueError(f"duplicate task names in {task_names}")
    for stream, sets in (("train", train), ("test", test), ("retrieval", retrieval)):
        if len(sets) != len(task_names):
            raise ValueError(f"{name or 'benchmark'}: {stream} has {len(sets)} dataset(s) for "
                             f"{len(task_names)} task(s) {task_names}")
    scenario = benchmark_from_datasets(train=[wrap_dataset(d) for d in train],
                                       test=[wrap_dataset(d) for d in test],
                                       retrieval=[wrap_dataset(d) for d in retrieval])
    scenario.task_names = task_names
    scenario.features = features
    scenario.name = name
    return scenario


def multitask_train_dataset(scenario: Any) -> "AvalancheDataset":
    """The union of all training experiences (the Multitask upper bound trains on it jointly).

    :param scenario: a scenario from :func:`make_av_scenario`.
    :returns: one ``AvalancheDataset`` concatenating the train experiences in task order; samples keep
        their own ``category`` (task id) and :func:`collate_av` is kept.
    """
    from avalanche.benchmarks.utils import AvalancheDataset

    from stella_avalanche.data.datasets import collate_av

    sets = [exp.dataset for exp in scenario.train_stream]
    if not sets:
        raise ValueError("scenario has an empty train_stream")
    return AvalancheDataset(sets, collate_fn=collate_av)
