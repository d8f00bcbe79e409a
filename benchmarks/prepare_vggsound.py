#!/usr/bin/env python
"""Build the Continual-VS split CSVs from VGGSound's CAV-MAE json lists and the downloaded media.

Example::

    python benchmarks/prepare_vggsound.py \\
        --train-json vgg_train_cleaned.json --test-json vgg_test_cleaned.json \\
        --retrieval-json vgg_test_5_per_class_for_retrieval_cleaned.json \\
        --labels class_labels_indices_vgg.csv --data-root /data --out /data

The rules live in :func:`stella_avalanche.benchmarks.splits.prepare_vggsound_splits`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stella_avalanche.benchmarks.splits import prepare_vggsound_splits


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(
        description="Continual-VS (8 tasks): select the first N classes per task in label-table row order, "
                    "the first M train clips per class, all test clips of the trained classes as eval, and the "
                    "5-per-class retrieval clips of every class; keep clips whose frames (or raw video) and "
                    "audio exist under the data root; write the STELLA split CSVs, the unused lists, the "
                    "160-class label table, a drop list and a JSON report.")
    p.add_argument("--train-json", required=True, type=Path, help="vgg_train_cleaned.json (CAV-MAE format)")
    p.add_argument("--test-json", required=True, type=Path, help="vgg_test_cleaned.json")
    p.add_argument("--retrieval-json", required=True, type=Path,
                   help="vgg_test_5_per_class_for_retrieval_cleaned.json")
    p.add_argument("--labels", required=True, type=Path,
                   help="CAV-MAE label table (index,mid,display_name), e.g. class_labels_indices_vgg.csv; "
                        "its ROW ORDER decides which classes are trained")
    p.add_argument("--data-root", required=True, type=Path,
                   help="root holding vggsound/data/{frames,audio,train/video,test/video}")
    p.add_argument("--out", required=True, type=Path, help="output folder for the split CSVs")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the written splits (default 0)")
    p.add_argument("--max-per-class", type=int, default=400, help="train clips per trained class (default 400)")
    p.add_argument("--classes-per-task", type=int, default=20, help="trained classes per task (default 20)")
    p.add_argument("--categories", type=Path, default=None,
                   help="class -> task table (default: the packaged stella_avalanche/benchmarks/split_tables/vggsound_categories.csv)")
    p.add_argument("--no-raw-video", action="store_true",
                   help="require extracted frames and audio files (ignore raw .mp4 videos)")
    p.add_argument("--quiet", action="store_true", help="do not print the per-task table")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        prepare_vggsound_splits(args.train_json, args.test_json, args.retrieval_json, args.labels, args.data_root,
                                args.out, seed=args.seed, max_per_class=args.max_per_class,
                                classes_per_task=args.classes_per_task, categories_csv=args.categories,
                                allow_raw_video=not args.no_raw_video, verbose=not args.quiet)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
