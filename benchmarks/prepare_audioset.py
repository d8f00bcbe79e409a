#!/usr/bin/env python
"""Build the Continual-AS split CSVs from AudioSet's CAV-MAE json lists, segment lists and media.

Example::

    python benchmarks/prepare_audioset.py \\
        --train-json audioset_2m_cleaned.json --eval-json audioset_eval_cleaned.json \\
        --retrieval-json audioset_eval_5_per_class_for_retrieval_cleaned.json \\
        --segments unbalanced_train_segments.csv balanced_train_segments.csv eval_segments.csv \\
        --data-root /data --out /data

The rules live in :func:`stella_avalanche.benchmarks.splits.prepare_audioset_splits`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stella_avalanche.benchmarks.splits import prepare_audioset_splits


def build_parser() -> argparse.ArgumentParser:
    """Command-line interface."""
    p = argparse.ArgumentParser(
        description="Continual-AS (7 tasks): keep clips whose labels inside the 171-row class table all map "
                    "to a single task (task recomputed from the labels), whose segment is listed in the "
                    "segment CSVs and whose frames (or raw video) and audio exist under the data root; write "
                    "the STELLA split CSVs, the 171-row label table, a drop list and a JSON report.")
    p.add_argument("--train-json", required=True, type=Path, help="training list (CAV-MAE json, bare YouTube ids)")
    p.add_argument("--eval-json", required=True, type=Path, help="eval list (CAV-MAE json)")
    p.add_argument("--retrieval-json", required=True, type=Path,
                   help="audioset_eval_5_per_class_for_retrieval_cleaned.json")
    p.add_argument("--segments", required=True, type=Path, nargs="+",
                   help="AudioSet *_segments.csv files (YTID, start_seconds, end_seconds, positive_labels)")
    p.add_argument("--data-root", required=True, type=Path,
                   help="root holding AudioSet/data/{frames,audio,<Class_Name>_<train|eval>/video}")
    p.add_argument("--out", required=True, type=Path, help="output folder for the split CSVs")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed of the written splits (default 0)")
    p.add_argument("--tasks-table", type=Path, default=None,
                   help="171-row class table (default: the packaged stella_avalanche/benchmarks/split_tables/audioset_tasks.csv)")
    p.add_argument("--no-raw-video", action="store_true",
                   help="require extracted frames and audio files (ignore raw .mp4 videos)")
    p.add_argument("--quiet", action="store_true", help="do not print the per-task table")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit status."""
    args = build_parser().parse_args(argv)
    try:
        prepare_audioset_splits(args.train_json, args.eval_json, args.retrieval_json, args.segments, args.data_root,
                                args.out, seed=args.seed, tasks_csv=args.tasks_table,
                                allow_raw_video=not args.no_raw_video, verbose=not args.quiet)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
