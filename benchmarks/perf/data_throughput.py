"""Training-loader throughput on the synthetic benchmark: decode-once cache vs decoding every clip.

Prints clips/s of a torch ``DataLoader`` (batch 32, shuffled, ``collate_av``) over the union of the
training experiences (the Avalanche datasets the strategies iterate), for ``num_workers`` 0 and 1,
with and without the ``FeatureCache``, and the cached / uncached ratio. Targets on 2 CPU cores:
cached >= 300 clips/s and >= 10x uncached.

Usage::

    python benchmarks/perf/data_throughput.py [--preset default] [--root DIR] [--uncached-clips 320]
"""
from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, Subset

from stella_avalanche.benchmarks.common import multitask_train_dataset
from stella_avalanche.benchmarks.synthetic import synthetic_benchmark
from stella_avalanche.data.datasets import collate_av
from stella_avalanche.data.synthetic import generate_synthetic, get_preset, is_complete, synthetic_root


def loader_rate(dataset: torch.utils.data.Dataset, *, clips: int, num_workers: int, batch_size: int = 32,
                seed: int = 0) -> float:
    """Clips per second of one pass over ``clips`` shuffled clips (worker start-up included)."""
    n = min(clips, len(dataset))
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(dataset), generator=g)[:n].tolist()
    loader = DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_av, persistent_workers=False)
    seen = 0
    t0 = time.perf_counter()
    for batch in loader:
        seen += int(batch["video"].shape[0])
    return seen / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--root", default=None, help="data root (default: the user cache directory)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cached-clips", type=int, default=4800, help="clips per cached measurement")
    ap.add_argument("--uncached-clips", type=int, default=320, help="clips per uncached measurement")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the main process")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)

    root = synthetic_root(args.seed, preset, args.root)
    fresh = not is_complete(root, seed=args.seed, preset=preset)
    t0 = time.perf_counter()
    generate_synthetic(root, seed=args.seed, preset=preset)
    t_gen = time.perf_counter() - t0
    print(f"data root: {root}")
    print(f"generation ({preset.name}): {t_gen:.1f} s" + ("" if fresh else " (reused existing data)"))

    t0 = time.perf_counter()
    cached = multitask_train_dataset(synthetic_benchmark(root, seed=args.seed, preset=preset, cache=True))
    t_cache = time.perf_counter() - t0
    uncached = multitask_train_dataset(synthetic_benchmark(root, seed=args.seed, preset=preset, cache=False))
    print(f"scenario + feature cache: {t_cache:.1f} s for {len(cached)} training clips")

    rows = []
    for workers in (0, 1):
        rc = loader_rate(cached, clips=args.cached_clips, num_workers=workers)
        ru = loader_rate(uncached, clips=args.uncached_clips, num_workers=workers)
        rows.append((workers, rc, ru))
    print(f"\n{'num_workers':>11} | {'cached clips/s':>14} | {'uncached clips/s':>16} | {'ratio':>6}")
    print("-" * 58)
    for workers, rc, ru in rows:
        print(f"{workers:>11} | {rc:>14.0f} | {ru:>16.0f} | {rc / ru:>5.1f}x")
    best_c = max(r[1] for r in rows)
    best_u = max(r[2] for r in rows)
    ok = best_c >= 300 and best_c >= 10 * best_u
    print(f"\nbest cached {best_c:.0f} clips/s, best uncached {best_u:.0f} clips/s, ratio {best_c / best_u:.1f}x "
          f"(target: >= 300 clips/s and >= 10x): {'OK' if ok else 'MISSED'}")


if __name__ == "__main__":
    main()
