"""``stella-prepare``: build the Continual-VS / Continual-AS split CSVs from the files users have.

Examples::

    stella-prepare vggsound --train-json vgg_train_cleaned.json --test-json vgg_test_cleaned.json \\
        --retrieval-json vgg_test_5_per_class_for_retrieval_cleaned.json \\
        --labels class_labels_indices_vgg.csv --data-root DATA --out DATA
    stella-prepare audioset --train-json audioset_2m_cleaned.json --eval-json audioset_eval_cleaned.json \\
        --retrieval-json audioset_eval_5_per_class_for_retrieval_cleaned.json \\
        --segments unbalanced_train_segments.csv balanced_train_segments.csv eval_segments.csv \\
        --data-root DATA --out DATA

The rules live in :func:`stella_avalanche.benchmarks.splits.prepare_vggsound_splits` and
:func:`~stella_avalanche.benchmarks.splits.prepare_audioset_splits`. ``benchmarks/prepare_vggsound.py``
and ``benchmarks/prepare_audioset.py`` are the same commands with the subcommand fixed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

__all__ = ["build_parser", "main"]

_VGGSOUND_HELP = "Continual-VS (8 tasks) split CSVs"
_AUDIOSET_HELP = "Continual-AS (7 tasks) split CSVs"


def _vggsound_parser(sub: Any) -> None:
    """The ``vggsound`` subcommand's options."""
    p = sub.add_parser("vggsound", help=_VGGSOUND_HELP,
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
    p.set_defaults(prepare=_prepare_vggsound)



def _audioset_parser(sub: Any) -> None:
    """The ``audioset`` subcommand's options."""
    p = sub.add_parser("audioset", help=_AUDIOSET_HELP,
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
    p.set_defaults(prepare=_prepare_audioset)



def _prepare_vggsound(args: argparse.Namespace) -> None:
    from stella_avalanche.benchmarks.splits import prepare_vggsound_splits

    prepare_vggsound_splits(args.train_json, args.test_json, args.retrieval_json, args.labels, args.data_root,
                            args.out, seed=args.seed, max_per_class=args.max_per_class,
                            classes_per_task=args.classes_per_task, categories_csv=args.categories,
                            allow_raw_video=not args.no_raw_video, verbose=not args.quiet)


def _prepare_audioset(args: argparse.Namespace) -> None:
    from stella_avalanche.benchmarks.splits import prepare_audioset_splits

    prepare_audioset_splits(args.train_json, args.eval_json, args.retrieval_json, args.segments, args.data_root,
                            args.out, seed=args.seed, tasks_csv=args.tasks_table,
                            allow_raw_video=not args.no_raw_video, verbose=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per benchmark."""
    p = argparse.ArgumentParser(prog="stella-prepare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="benchmark", required=True)
    _vggsound_parser(sub)
    _audioset_parser(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point; returns the process exit status (2 on a bad input, named on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        args.prepare(args)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
