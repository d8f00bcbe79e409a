#!/usr/bin/env python
"""Cost of DDP's unused-parameter search, measured side by side (2 gloo processes on the CPU, or
one GPU each under NCCL when ``--device cuda`` and 2 GPUs are present).

Each rank runs the backbone's pre-training step (forward, backward with the gradient all-reduce,
Adam) on random clips, alternating two DDP-wrapped copies of the same weights, one with
``find_unused_parameters=True`` (what the runner used) and one without (``wrap_ddp``'s default),
so both see the same machine load. Reports the median step time of each and their ratio.

    python benchmarks/perf/ddp_overhead.py                   # tiny model, batch 8, 2 x 1 thread
    python benchmarks/perf/ddp_overhead.py --model small --batch-size 4 --steps 10
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from perf_models import model_config  # noqa: E402  (benchmarks/perf)
    from stella_avalanche.models.cav import CAVMAE

    torch.set_num_threads(args.threads)
    use_cuda = args.device == "cuda"
    dev = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=2)
    wrappers, opts = {}, {}
    for flag in (True, False):  # two copies with the same weights: one DDP reducer per module
        torch.manual_seed(0)
        model = CAVMAE(model_config(args.model)).to(dev)
        wrappers[flag] = DistributedDataParallel(model, device_ids=[rank] if use_cuda else None,
                                                 find_unused_parameters=flag)
        opts[flag] = torch.optim.Adam(model.parameters(), lr=1e-5)
    cfg = model.config
    g = torch.Generator().manual_seed(rank)
    b = args.batch_size
    video = torch.randn(b, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g).to(dev)
    audio = torch.randn(b, 1, cfg.audio_length, cfg.mel_bins, generator=g).to(dev)
    times: dict[str, list[float]] = {"True": [], "False": [], "fwd_True": [], "fwd_False": []}
    for step in range(args.warmup + args.steps):
        for flag in ((True, False) if step % 2 == 0 else (False, True)):
            if use_cuda:
                torch.cuda.synchronize()
            dist.barrier()
            t = time.perf_counter()
            res = wrappers[flag](video, audio)  # DDP's unused-parameter search runs at the end of this call
            if use_cuda:
                torch.cuda.synchronize()
            t_fwd = time.perf_counter() - t
            res["loss"].backward()
            opts[flag].step()
            opts[flag].zero_grad(set_to_none=True)
            if use_cuda:
                torch.cuda.synchronize()
            if step >= args.warmup:
                times[str(flag)].append(time.perf_counter() - t)
                times[f"fwd_{flag}"].append(t_fwd)
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    dist.destroy_process_group()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny, small (base widths, fewer tokens/blocks) or base")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "times.json")
        mp.spawn(_worker, args=(args, port, out), nprocs=2, join=True)
        times = json.loads(Path(out).read_text())
    print(f"DDP step, model={args.model}, batch {args.batch_size} per rank, 2 ranks ({args.device}), "
          f"{args.steps} timed steps each, interleaved")
    print("| find_unused_parameters | step median (s) | step min (s) | step max (s) | forward median (s) | "
          "forward min (s) |")
    print("|---|---|---|---|---|---|")
    for k in ("True", "False"):
        st, fw = times[k], times[f"fwd_{k}"]
        print(f"| {k} | {statistics.median(st):.4f} | {min(st):.4f} | {max(st):.4f} | "
              f"{statistics.median(fw):.4f} | {min(fw):.4f} |")
    for what, key in (("step", ""), ("forward (incl. the search)", "fwd_")):
        on, off = times[f"{key}True"], times[f"{key}False"]
        print(f"off / on, {what}: median {statistics.median(off) / statistics.median(on):.3f}, "
              f"min {min(off) / min(on):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
