#!/usr/bin/env python
"""Training-step cost of every strategy, measured side by side at the same batch and replay size.

Each strategy runs in its own subprocess (so peak memory is its own) on in-memory random clips
(no data loading: this measures the step, not the loader). Reported per strategy: samples/s
(current samples per second of training step), peak memory (CUDA: max allocated; CPU: max RSS),
replay-buffer bytes per item at the measured size, and ratios to finetune and to DER++; then the
analytic cost of finetune / DER++ / STELLA / STELLA+ (``stella_avalanche/perf/cost_model.py``: FLOPs,
saved activations, modelled peak memory) beside the measured ratios.

    python benchmarks/perf/step.py                                   # tiny model on CPU, all strategies
    python benchmarks/perf/step.py --strategies finetune derpp stella stella_plus --steps 20
    python benchmarks/perf/step.py --model base --device cuda --batch-size 12   # paper size on a GPU

Also prints the buffer bytes per item computed for the paper's input size (4x3x224x224 video,
1024x128 fbank, base model) without allocating it.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

ALL = ("finetune", "er", "derpp", "lump", "mir", "gmed", "clser", "esmer", "stella", "stella_plus")


def _one(args: argparse.Namespace) -> dict:
    import torch

    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.perf.random_clips import random_clip_stream
    from stella_avalanche.perf.strategy_builder import build_strategy
    from stella_avalanche.perf.timing import StepTimer

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = model_config_for(args.model)
    bm = random_clip_stream(cfg, [args.batch_size * args.warmup, args.batch_size * args.steps])
    timer = StepTimer(device=device)
    buffer_device = None
    if args.strategy != "finetune" and args.buffer_device != "default":
        # one place for every strategy's buffer, so peak memory compares like with like
        buffer_device = str(device) if args.buffer_device == "device" else args.buffer_device
    strategy = build_strategy(args.strategy, cfg, batch=args.batch_size, device=device, mem_size=args.mem_size,
                              buffer_device=buffer_device, amp=args.amp, plugins=[timer.plugin])
    model = strategy.backbone
    avm = next((p.avm for p in strategy.plugins if getattr(p, "avm", None) is not None), None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warm, measured = bm.train_stream
    strategy.train(warm, eval_streams=[])
    timer.reset(active=True)  # measure only once the buffer holds items
    strategy.train(measured, eval_streams=[])
    times = timer.seconds()
    plugin = next((p for p in strategy.plugins if hasattr(p, "buffer_bytes_per_item")), None)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    steady = times[1:] or times  # the first measured step may include lazy init
    # weights, gradients and Adam's two moments (fp32): 16 B per trainable parameter (+ the AVM's)
    state_bytes = 16 * sum(p.numel() for m in (model, avm) if m is not None for p in m.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"strategy": args.strategy, "device": str(device), "device_name": name, "model": args.model,
            "batch_size": args.batch_size, "mem_size": args.mem_size, "amp": str(strategy.amp_dtype),
            "buffer_device": buffer_device or "default",
            "samples_per_second": args.batch_size * len(steady) / sum(steady),
            "step_seconds": sum(steady) / len(steady), "peak_memory_bytes": int(peak),
            "buffer_bytes_per_item": int(getattr(plugin, "buffer_bytes_per_item", 0) or 0),
            "buffer_on_device": bool(plugin is not None and getattr(plugin, "buffer", None) is not None
                                     and plugin.buffer.device.type == device.type),
            "state_bytes": int(state_bytes)}


def paper_buffer_bytes() -> dict:
    """Bytes per item of the compact STELLA / STELLA+ buffers at the paper's input size."""
    from stella_avalanche.models.cav import MODEL_PRESETS
    from stella_avalanche.training import buffer as B
    from stella_avalanche.training.selection import keep_count

    c = MODEL_PRESETS["base"]
    kv, ka = keep_count(c.num_video_tokens, 0.5), keep_count(c.num_audio_tokens, 0.5)
    common = dict(embed_dim=c.embed_dim, num_heads=c.num_heads)
    full = dict(num_frames=c.num_frames, img_size=c.img_size, audio_length=c.audio_length, mel_bins=c.mel_bins,
                video_tokens=c.num_video_tokens, audio_tokens=c.num_audio_tokens, **common)
    plus = dict(keep_video=kv, keep_audio=ka, patch_size=c.patch_size, **common)
    import torch

    return {"stella (default: uint8 audio, fp16 stats)": B.bytes_per_item(B.stella_fields(**full)),
            "stella_plus (default)": B.bytes_per_item(B.stella_plus_fields(**plus)),
            "stella (§6 layout: fp16 audio, fp32 stats)": B.bytes_per_item(
                B.stella_fields(**full, audio_storage="float16", stats_dtype=torch.float32)),
            "stella_plus (§6 layout)": B.bytes_per_item(
                B.stella_plus_fields(**plus, audio_storage="float16", stats_dtype=torch.float32)),
            "official STELLA (fp32 clip + stats)": 2_955_392, "official STELLA+": 1_483_840}


def cost_model_table(rows: list[dict], args: argparse.Namespace) -> str:
    """The analytic cost of each measured strategy beside the measured ratios to DER++.

    Modelled peak memory = weights + gradients + Adam state (16 B per parameter) + saved activations
    (cost model, 2 B per element under autocast, 4 in fp32) + the replay buffer when it lives on the
    measuring device (capacity x bytes per item: it is preallocated).
    """
    from stella_avalanche.models.cav import MODEL_PRESETS
    from stella_avalanche.perf.cost_model import COST_STRATEGIES, step_cost

    cfg = MODEL_PRESETS[args.model]
    known = [r for r in rows if r["strategy"] in COST_STRATEGIES]
    if not known:
        return ""
    out = [f"\ncost model (stella_avalanche/perf/cost_model.py) at batch {args.batch_size} + as many replayed:",
           "| strategy | GFLOP/step | achieved GFLOP/s | FLOPs ÷ DER++ | samples/s ÷ DER++ at equal FLOP/s | "
           "measured samples/s ÷ DER++ | saved activations (MB) | modelled peak (MB) | modelled memory ÷ DER++ | "
           "measured memory ÷ DER++ |", "|---|---|---|---|---|---|---|---|---|---|"]
    model: dict[str, dict] = {}
    for r in known:
        elem = 4 if r["amp"] in ("None", "torch.float32") else 2
        c = step_cost(cfg, r["strategy"], batch=args.batch_size, bytes_per_element=elem)
        buf = args.mem_size * r["buffer_bytes_per_item"] if r.get("buffer_on_device") else 0
        model[r["strategy"]] = {"c": c, "peak": r.get("state_bytes", 0) + c.saved_bytes + buf, "r": r}
    d = model.get("derpp")
    for s, m in model.items():
        c, r = m["c"], m["r"]
        if d is not None:
            dc, dr = d["c"], d["r"]
            ratios = (f"{c.total / dc.total:.3f} | {dc.per_sample / c.per_sample:.3f} | "
                      f"{r['samples_per_second'] / dr['samples_per_second']:.2f}")
            mem = f"{m['peak'] / d['peak']:.2f} | {r['peak_memory_bytes'] / dr['peak_memory_bytes']:.2f}"
        else:
            ratios, mem = "- | - | -", "- | -"
        out.append(f"| {s} | {c.total / 1e9:.1f} | {c.total / r['step_seconds'] / 1e9:.1f} | {ratios} | "
                   f"{c.saved_bytes / 2**20:.0f} | {m['peak'] / 2**20:.0f} | {mem} |")
    out.append("(on a CPU the measured memory is the process's max RSS, not comparable with the modelled peak)")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--strategies", nargs="*", default=list(ALL))
    p.add_argument("--model", default="tiny")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--mem-size", type=int, default=200)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3, help="steps of a first experience that fills the buffer")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--amp", default="auto")
    p.add_argument("--buffer-device", default="device",
                   help="where every replay buffer lives: 'device' (the training device, default), 'cpu', "
                        "or 'default' (each plugin's own default: STELLA pinned CPU, the baselines the device)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        args.strategy = args.one
        print(json.dumps(_one(args)))
        return 0
    rows = []
    for s in args.strategies:
        cmd = [sys.executable, __file__, "--one", s, "--model", args.model, "--device", args.device,
               "--batch-size", str(args.batch_size), "--mem-size", str(args.mem_size), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--amp", args.amp,
               "--buffer-device", args.buffer_device]
        r = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if r.returncode != 0:
            print(f"{s}: FAILED\n{r.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"  measured {s}", file=sys.stderr)
    by = {r["strategy"]: r for r in rows}
    head = rows[0] if rows else {}
    print(f"\nstep cost, model={args.model}, batch={args.batch_size}, replay memory={args.mem_size}, "
          f"device={head.get('device', '?')} ({head.get('device_name', '?')}), amp={head.get('amp', '?')}, "
          f"buffers on {args.buffer_device}")
    print(f"| strategy | samples/s | step (s) | peak memory (MB) | buffer bytes/item | "
          f"samples/s ÷ finetune | memory ÷ finetune | samples/s ÷ DER++ | memory ÷ DER++ |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        def ratio(ref: str, key: str) -> str:
            return f"{r[key] / by[ref][key]:.2f}" if ref in by else "-"
        print(f"| {r['strategy']} | {r['samples_per_second']:.1f} | {r['step_seconds']:.3f} | "
              f"{r['peak_memory_bytes'] / 2**20:.0f} | {r['buffer_bytes_per_item']:,} | "
              f"{ratio('finetune', 'samples_per_second')} | {ratio('finetune', 'peak_memory_bytes')} | "
              f"{ratio('derpp', 'samples_per_second')} | {ratio('derpp', 'peak_memory_bytes')} |")
    print(cost_model_table(rows, args))
    print("\nbuffer bytes per item at the paper's input size (base model, 4x3x224x224 video, 1024x128 fbank):")
    for k, v in paper_buffer_bytes().items():
        print(f"  {k}: {v:,} B ({v / 1e6:.3f} MB, {v / 2**20:.3f} MiB)" if isinstance(v, int) else f"  {k}: {v}")
    print("(CPU peak memory is the process's max RSS: it includes the Python/torch runtime, ~0.5-1 GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
