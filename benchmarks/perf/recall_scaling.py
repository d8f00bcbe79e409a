"""Recall scaling: tiled O(N²)-time / O(c²)-memory ranks vs a full-sort baseline.

For each N, random D-dimensional embeddings with planted exact ties (duplicate clips and a collapsed
group) are scored by ``stella_avalanche.evaluation.retrieval.retrieval_ranks`` and by the official
method's approach: sort every row of S (A→V) and every column (V→A), then locate the positive
(``torch.sort`` + ``searchsorted``, i.e. an argsort of full rows, O(N² log N)). The baseline sorts
blocks of rows so that it fits in memory; its compute equals sorting the full N×N matrix. For large
N the baseline runs on a subset of query rows/columns and its time is extrapolated linearly (every
query costs the same: one length-N sort); the output says so. Ranks must be identical wherever both
ran, strict and pessimistic alike.

Usage: ``python benchmarks/perf/recall_scaling.py [--sizes 1000 10000 50000] [--threads 2]``
"""
from __future__ import annotations

import argparse
import threading
import time
from typing import Callable

import psutil
import torch
import torch.nn.functional as F

from stella_avalanche.evaluation.retrieval import retrieval_ranks


class PeakRSS:
    """Peak resident-set growth of this process while the block runs (sampled every 5 ms).

    torch's CPU allocations are invisible to tracemalloc, hence RSS sampling.
    """

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss - self.base)
            time.sleep(0.005)

    def __enter__(self) -> "PeakRSS":
        self.base = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss - self.base)


def planted_embeddings(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, d) audio/video embeddings, weakly paired, with ~1% duplicate clips and a 20-clip collapse."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g)
    v = a + 1.5 * torch.randn(n, d, generator=g)            # weak pairing: ranks spread over 1..N
    n_dup = max(1, n // 100)
    src = torch.randint(0, n, (n_dup,), generator=g)
    dst = torch.randint(0, n, (n_dup,), generator=g)
    a[dst], v[dst] = a[src], v[src]                          # exact duplicate clips
    grp = torch.arange(min(20, n))
    a[grp], v[grp] = a[0].clone(), v[0].clone()              # collapsed group: 20-way exact ties
    return a, v


def sort_ranks(a: torch.Tensor, v: torch.Tensor, queries: torch.Tensor, direction: str,
               block: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-sort baseline for the given query ids: (strict, pessimistic) ranks."""
    a = F.normalize(a.float(), dim=1)
    v = F.normalize(v.float(), dim=1)
    n = a.shape[0]
    strict, pess = [], []
    for s in range(0, queries.numel(), block):
        q = queries[s:s + block]
        if direction == "a2v":
            sim = a[q] @ v.T                                 # (b, N): rows of S
        else:
            sim = (a @ v[q].T).T.contiguous()                # (b, N): columns of S, same products
        pos = sim.gather(1, q[:, None])
        srt = torch.sort(sim, dim=1).values                  # the O(N log N) per query step
        le = torch.searchsorted(srt, pos, right=True)        # #{<= pos}
        lt = torch.searchsorted(srt, pos, right=False)       # #{< pos}
        strict.append((n - le + 1).reshape(-1))
        pess.append((n - lt).reshape(-1))
    return torch.cat(strict), torch.cat(pess)


def timed(fn: Callable[[], object], repeats: int = 1, device: torch.device = torch.device("cpu")
          ) -> tuple[object, float, int]:
    """(result, best wall time over ``repeats``, peak memory growth) of ``fn()``.

    CPU: peak RSS growth; CUDA: peak allocated device memory above the starting allocation.
    """
    best, peak, out = float("inf"), 0, None
    cuda = device.type == "cuda"
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            out = fn()
            if cuda:
                torch.cuda.synchronize(device)
            best = min(best, time.perf_counter() - t0)
        peak = max(peak, torch.cuda.max_memory_allocated(device) - base if cuda else mem.peak)
    return out, best, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 50000])
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--full-baseline-max", type=int, default=10000,
                    help="largest N whose baseline sorts every query; above it a subset is used")
    ap.add_argument("--baseline-queries", type=int, default=1024, help="subset size per direction")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (both methods run there)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="best-of-R timings for N <= --full-baseline-max (shared machines are noisy)")
    ap.add_argument("--large-repeats", type=int, default=1, help="best-of-R timings above --full-baseline-max")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    print(f"torch {torch.__version__}, {args.threads} threads, D={args.dim}, {dev}; best of {args.repeats} "
          f"runs for N <= {args.full_baseline_max}, of {args.large_repeats} above; MB = peak memory growth")
    print(f"{'N':>7} | {'tiled s':>8} {'tiled MB':>9} | {'sort s':>9} {'sort MB':>8} {'queries':>9} | "
          f"{'speed-up':>8} | exact")
    for n in args.sizes:
        a, v = (x.to(dev) for x in planted_embeddings(n, args.dim, args.seed))
        full = n <= args.full_baseline_max
        reps = args.repeats if full else args.large_repeats
        ranks, t_tiled, m_tiled = timed(lambda: retrieval_ranks(a, v), reps, dev)
        nq = n if full else min(n, args.baseline_queries)
        q = torch.arange(n) if full else torch.randperm(n, generator=torch.Generator().manual_seed(1))[:nq]
        q = torch.cat([torch.arange(min(20, n)), q])[:nq] if not full else q   # include the collapsed group
        q = q.to(dev)
        (res, t_sort, m_sort) = timed(lambda: {d: sort_ranks(a, v, q, d) for d in ("a2v", "v2a")}, reps, dev)
        res = {d: (r[0].cpu(), r[1].cpu()) for d, r in res.items()}
        q = q.cpu()
        exact = all(torch.equal(res[d][0], ranks.strict(d)[q]) and torch.equal(res[d][1], ranks.pessimistic(d)[q])
                    for d in ("a2v", "v2a"))
        t_sort_full = t_sort * n / nq
        tag = "all" if full else f"{nq} (x{n / nq:.1f} extrapolated)"
        print(f"{n:>7} | {t_tiled:8.2f} {m_tiled / 2**20:9.1f} | {t_sort_full:9.2f} {m_sort / 2**20:8.1f} "
              f"{tag:>9} | {t_sort_full / t_tiled:7.1f}x | {'identical' if exact else 'MISMATCH'}", flush=True)
        ties = int((ranks.a2v_pess != ranks.a2v).sum())
        print(f"{'':>7}   planted ties: {ties} A->V queries have pessimistic > strict rank; "
              f"a full N x N sort would hold {n * n * 12 / 2**30:.2f} GiB (fp32 values + int64 indices)")


if __name__ == "__main__":
    main()
