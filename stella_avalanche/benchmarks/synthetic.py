"""The synthetic benchmark (the embedded default): generated media + manifests -> CLScenario.

:func:`synthetic_benchmark` generates (or reuses) the procedural data set of
:mod:`stella_avalanche.data.synthetic` and reads it back through exactly the loaders used for
prepared VGGSound (split CSVs -> records -> ``AudioVideoDataset``), so the real data path is what
every CPU test and demo exercises. By default the decoded frames and fbanks are kept in a decode-once
``FeatureCache`` inside the data root, so CPU training is not bound by JPEG / wav decoding.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from stella_avalanche.benchmarks.common import scenario_from_split_csvs
from stella_avalanche.data.synthetic import (LABEL_CSV, SyntheticPreset, check_features, default_features,
                                             generate_synthetic, get_preset)

if TYPE_CHECKING:
    from avalanche.benchmarks import CLScenario

    from stella_avalanche.data.features import FeatureConfig

__all__ = ["synthetic_benchmark", "SYNTHETIC_FILES", "FEATURE_CACHE_DIR"]

#: Split CSV / label table names inside a generated data root.
SYNTHETIC_FILES = {"train": "train.csv", "test": "test.csv", "retrieval": "retrieval.csv", "labels": LABEL_CSV}
#: Sub-directory of the data root holding the decode-once feature caches.
FEATURE_CACHE_DIR = "feature_cache"


def _shared_cache(data_root: Path, preset: SyntheticPreset, features: "FeatureConfig", on_error: str) -> Any:
    """One decode-once ``FeatureCache`` over every clip of the three splits.

    One cache instead of one per (split, task) dataset: a single build pass and a single pair of
    arrays, so the per-build fixed costs (memmap flush, fsync'ed metadata) are paid once.
    """
    from stella_avalanche.data.datasets import FeatureCache
    from stella_avalanche.data.manifests import read_label_csv, read_split_csv

    labels = read_label_csv(data_root / SYNTHETIC_FILES["labels"])
    records = [rec for split in ("train", "test", "retrieval")
               for rec in read_split_csv(data_root / SYNTHETIC_FILES[split], data_root=data_root,
                                         task_names=preset.task_names, label_table=labels)]
    return FeatureCache(data_root / FEATURE_CACHE_DIR, records=records, features=features, on_error=on_error)


def synthetic_benchmark(root: str | os.PathLike | None = None, *, seed: int = 0,
                        preset: str | SyntheticPreset = "default", features: "FeatureConfig | None" = None,
                        cache: bool | Any = True, on_error: str = "raise", tasks: Sequence[str] | None = None,
                        workers: int = 2) -> "CLScenario":
    """Procedural audio-visual continual benchmark (8 tasks x 3 classes by default).

    Class ``j`` of task ``t`` shares its visual identity with class ``j`` of task ``t + 4`` but has a
    different sound, so fine-tuning overwrites earlier pairings. Samples are the contract dicts:
    ``video`` float32 (4, 3, 64, 64), ``audio`` float32 (1, 256, 64), ``category`` (task id),
    ``label`` (class id = row of ``class_labels_indices.csv``), ``index``.

    :param root: data directory (generated there if not complete); default
        ``default_cache_dir()/synthetic/<version>-<preset>-seed<seed>``.
    :param seed: data seed (class vocabulary and every clip); also the base augmentation seed.
    :param preset: ``"default"`` (200 train / 10 test / 10 retrieval clips per class), ``"large"``
        (GPU runs) or ``"tiny"`` (tests), or a :class:`~stella_avalanche.data.synthetic.SyntheticPreset`.
    :param features: preprocessing config (default ``FeatureConfig.synthetic()``); it must read the
        frames the generator stores (window == clip) and match its sample rate and frame size.
    :param cache: ``True``: one decode-once ``FeatureCache`` of all clips under ``<root>/feature_cache``
        (built on first use); ``False``/``None``:
        decode every sample; a path or ``FeatureCache``: passed through to the datasets.
    :param on_error: dataset error policy (``"raise"``: never substitute another sample).
    :param tasks: subset of ``task0`` ... ``task7`` (stream order as given); ``None`` = all.
    :param workers: generator processes (only used when the data set has to be generated).
    :returns: ``CLScenario`` with ``train_stream``, ``test_stream``, ``retrieval_stream`` (one experience
        per task; retrieval samples' ``category`` = task id) and the attributes ``task_names``,
        ``features``, ``name == "synthetic"``, ``data_root``, ``preset``, ``seed``.
    :raises ValueError: a ``features`` config that does not fit the preset; unknown preset or task.
    """
    p = get_preset(preset)
    features = features if features is not None else default_features(p)
    check_features(p, features)
    data_root = generate_synthetic(root, seed=seed, preset=p, workers=workers)
    if cache is True:
        cache_arg: Any = _shared_cache(Path(data_root), p, features, on_error)
    elif cache is False or cache is None:
        cache_arg = None
    else:
        cache_arg = cache
    scenario = scenario_from_split_csvs(data_root, split_dir=None, files=SYNTHETIC_FILES, all_tasks=p.task_names,
                                        tasks=tasks, features=features, cache=cache_arg, on_error=on_error,
                                        multi_label=False, name="synthetic", seed=seed)
    scenario.data_root = Path(data_root)
    scenario.preset = p
    scenario.seed = seed
    return scenario
