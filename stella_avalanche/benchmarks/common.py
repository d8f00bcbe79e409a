"""Avalanche scenario assembly shared by every benchmark factory.

A benchmark is an Avalanche ``CLScenario`` built with ``benchmark_from_datasets`` (``docs/avalanche.md`` §1)
with three streams of one experience per task, in task order:

* ``train_stream``: the task's training clips;
* ``test_stream``: the task's eval clips (validation loss only, never reported);
* ``retrieval_stream``: the task's retrieval clips; every sample's ``category`` is its task id, so a
  stream-level metric can score the pooled gallery and split the recall per task.

Datasets are wrapped as ``AvalancheDataset([ds], collate_fn=collate_av)`` **without transform groups**:
Avalanche's ``TransformGroups`` turns a dict sample into its key list (``docs/avalanche.md`` §2), so all
augmentation happens inside the dataset.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from torch.utils.data import Dataset

if TYPE_CHECKING:  # Avalanche's import costs seconds; only needed when a scenario is built.
    from avalanche.benchmarks import CLScenario
    from avalanche.benchmarks.utils import AvalancheDataset

    from stella_avalanche.data.features import FeatureConfig

__all__ = ["wrap_dataset", "make_av_scenario", "multitask_train_dataset", "multitask_experience", "resolve_tasks",
           "scenario_from_split_csvs"]


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


def multitask_experience(scenario: Any) -> Any:
    """A single training experience over the union of all tasks (the Multitask upper bound).

    Built as the only experience of a one-stream Avalanche benchmark, so the strategy trains on it
    exactly like on a task experience (same loader, epochs and evaluation protocol).
    """
    from avalanche.benchmarks import benchmark_from_datasets

    return benchmark_from_datasets(train=[multitask_train_dataset(scenario)]).train_stream[0]


def resolve_tasks(tasks: Sequence[str] | None, valid: Sequence[str], *, benchmark: str) -> list[str]:
    """Check a user task selection against a benchmark's task list.

    :param tasks: ``None`` (all tasks, paper order) or a subset of ``valid``; the given order is the
        stream order.
    :raises ValueError: unknown or repeated task names (the valid names are listed).
    """
    if tasks is None:
        return list(valid)
    if isinstance(tasks, str):
        tasks = [tasks]
    tasks = [str(t) for t in tasks]
    unknown = [t for t in tasks if t not in valid]
    if unknown:
        raise ValueError(f"{benchmark}: unknown task name(s) {unknown}; valid names: {list(valid)}")
    if len(set(tasks)) != len(tasks) or not tasks:
        raise ValueError(f"{benchmark}: tasks must be a non-empty list without repeats, got {tasks}")
    return tasks


def scenario_from_split_csvs(root: str | os.PathLike, *, split_dir: str | os.PathLike | None,
                             files: Mapping[str, str], all_tasks: Sequence[str],
                             tasks: Sequence[str] | None, features: "FeatureConfig | None",
                             cache: Any, on_error: str, multi_label: bool, name: str,
                             retrieval_labels: bool = True, seed: int = 0) -> "CLScenario":
    """Scenario over prepared STELLA split CSVs (the shared body of the real-data factories).

    Reads the label table and the train / test / retrieval CSVs with :mod:`stella_avalanche.data.manifests`
    (validated against **all** task names of the benchmark, so a bad ``category`` is caught even when
    only some tasks are selected), keeps the rows with ``category == task`` for each selected task, and
    builds one :class:`~stella_avalanche.data.datasets.AudioVideoDataset` per (split, task); task ids are
    positions in the selected ``tasks`` list.

    :param root: data root the CSV paths are relative to.
    :param split_dir: folder of the CSVs (default ``root``).
    :param files: role -> file name for ``train``, ``test``, ``retrieval``, ``labels``.
    :param all_tasks: the benchmark's task names in paper order.
    :param tasks: selected tasks (see :func:`resolve_tasks`).
    :param features: preprocessing config (default ``FeatureConfig.paper()``).
    :param cache: a directory in which each dataset builds / reuses its own decode-once
        ``FeatureCache`` (keyed by its clip list and ``features``), a ``FeatureCache`` covering every
        clip of the benchmark, or None (decode every sample).
    :param on_error: passed to ``AudioVideoDataset`` (``"raise"`` by default: never substitute a sample).
    :param multi_label: AudioSet (comma-joined mids -> multi-hot label).
    :param retrieval_labels: validate and encode retrieval labels with the label table. Continual-VS
        sets it False: its retrieval set holds the 5-per-class clips of *every* class of a task, also of
        the untrained classes that the 160-class table leaves out, so those samples get ``label == -1``
        (retrieval uses no labels).
    :param name: benchmark name.
    :param seed: base seed of the training datasets' augmentation streams.
    :raises ValueError: unknown task, or a selected task with zero clips in a split (names task + file).
    """
    from stella_avalanche.data.datasets import AudioVideoDataset
    from stella_avalanche.data.features import FeatureConfig
    from stella_avalanche.data.manifests import check_disjoint_keys, read_label_csv, read_split_csv

    selected = resolve_tasks(tasks, all_tasks, benchmark=name)
    root = Path(root)
    split_dir = Path(split_dir) if split_dir is not None else root
    features = features if features is not None else FeatureConfig.paper()
    label_path = split_dir / files["labels"]
    label_table = read_label_csv(label_path)
    # Read and filter every split before building any dataset, so that a missing task is reported
    # before any media is touched.
    grouped: dict[str, dict[str, list]] = {}
    all_records: dict[str, list] = {}
    for split in ("train", "test", "retrieval"):
        path = split_dir / files[split]
        table = label_table if split != "retrieval" or retrieval_labels else None
        records = read_split_csv(path, data_root=root, task_names=list(all_tasks), label_table=table,
                                 multi_label=multi_label)
        all_records[split] = records
        by_task: dict[str, list] = {t: [] for t in selected}
        for rec in records:
            if rec.category in by_task:
                by_task[rec.category].append(rec)
        empty = [t for t in selected if not by_task[t]]
        if empty:
            raise ValueError(f"{name}: task(s) {empty} have no clips in {path} (rows with category == task); "
                             f"re-run the prepare step or leave the task out via tasks=")
        grouped[split] = by_task
    # Train must not share clips with eval or retrieval; eval vs retrieval overlap is expected (both
    # come from the test split).
    check_disjoint_keys({"train": all_records["train"], "test": all_records["test"]})
    check_disjoint_keys({"train": all_records["train"], "retrieval": all_records["retrieval"]})
    per_split: dict[str, list[Dataset]] = {}
    for split in ("train", "test", "retrieval"):
        table = label_table if split != "retrieval" or retrieval_labels else None
        per_split[split] = [
            AudioVideoDataset(grouped[split][t], features=features, train=split == "train", task_names=selected,
                              label_table=table, multi_label=multi_label and table is not None, cache=cache,
                              on_error=on_error, seed=seed + k)
            for k, t in enumerate(selected)]
    return make_av_scenario(train=per_split["train"], test=per_split["test"], retrieval=per_split["retrieval"],
                            task_names=selected, features=features, name=name)
