#!/usr/bin/env python
"""All GPU measurements of issue 15 item 1 in one run, written to one JSON file.

For finetune, DER++, STELLA and STELLA+ (``base`` model, bf16 autocast):

- the paper's setting: batch 9 current + 9 replayed, replay memory 2000 held on the GPU, then the
  same with every buffer in pinned host memory;
- batches 24, 48 and 96 (+ as many replayed; a batch that does not fit is recorded as ``oom``);
- per run: samples/s (current samples), peak allocated GPU memory, achieved TFLOP/s and model-FLOP
  utilisation from the analytic FLOPs of ``stella_avalanche/perf/cost_model.py``, each over
  ``--repeats`` timed experiences of ``--steps`` steps (mean, min, max, std);
- a FLOP check: one step of each strategy counted by ``torch.utils.flop_counter`` beside the analytic
  count (the fused-attention backward is counted with its score recomputation there);
- a synchronisation pass: one DER++ and one STELLA (and STELLA+) step under
  ``torch.cuda.set_sync_debug_mode("warn")`` (every synchronising call with its repository stack),
  and the same step under :class:`stella_avalanche.perf.sync_audit.HostSyncAudit`.

The JSON is rewritten after every run (atomically), so a run stopped by a time limit keeps what it
measured. ``--smoke`` runs the whole script on the CPU with the tiny model and 2 steps (tests).

    python benchmarks/perf/gpu_suite.py --out gpu_suite.json                  # on a GPU machine
    python benchmarks/perf/gpu_suite.py --smoke --out smoke.json               # CPU, seconds

On a machine without avalanche-lib, run ``benchmarks/perf/gpu_bundle.sh`` here first (copies
avalanche and dill into ``.gpu_site/``), carry ``.gpu_site`` and pass ``--site .gpu_site
--stub-missing`` (inert stand-ins for packages avalanche imports but the step never uses).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

# torch-free: the stand-ins must be installed before anything imports avalanche
from stella_avalanche.perf.import_stubs import add_import_arguments, prepare_imports  # noqa: E402

STRATEGIES = ("finetune", "derpp", "stella", "stella_plus")
#: H200 SXM dense bf16 peak (vendor figure); a large bf16 matmul reaches ~790 on the lent machines
H200_BF16_PEAK_TFLOPS = 989.4


#: training-loader workers (set by main): collating and pinning base-size clips of a large batch on
#: the main thread would time the loader, not the step
WORKERS = 0


# ------------------------------------------------------------------------------------ one run
def measure_run(name: str, cfg, *, batch: int, buffer: str, steps: int, repeats: int, warmup: int,
                mem_size: int, device, amp: str, peak_tflops: float) -> dict:
    """Throughput, peak memory, TFLOP/s and MFU of one strategy at one setting."""
    import gc

    import torch

    from stella_avalanche.perf.cost_model import step_cost
    from stella_avalanche.perf.step_checks import timing_clips
    from stella_avalanche.perf.strategy_builder import build_strategy, split_variant
    from stella_avalanche.perf.timing import StepTimer, spread, synchronize

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    row: dict[str, Any] = {"strategy": name, "batch": batch, "replay": 0 if name == "finetune" else batch,
                           "buffer": "none" if name == "finetune" else buffer, "mem_size": mem_size}
    try:
        timer = StepTimer(device=device)
        strategy = build_strategy(name, cfg, batch=batch, mem_size=mem_size, device=device, amp=amp,
                                  buffer_device=str(device) if buffer == "device" else "cpu",
                                  plugins=[timer.plugin], num_workers=WORKERS)
        bm = timing_clips(cfg, batch, experiences=repeats, steps=steps, warmup=warmup)
        exps = list(bm.train_stream)
        strategy.train(exps[0], eval_streams=[])  # fills the buffer (>= batch items), lazy init
        # same seed and clips for every variant of a strategy: compiled vs eager agree here or not
        row["warmup_losses"] = [float(x) for x in timer.losses]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        secs = []
        timer.reset(active=True)
        for exp in exps[1:]:
            synchronize(device)
            t = time.perf_counter()
            strategy.train(exp, eval_streams=[])
            synchronize(device)
            secs.append(time.perf_counter() - t)
        in_step = timer.seconds()
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
        row["amp"] = str(strategy.amp_dtype)
        del strategy
    except torch.cuda.OutOfMemoryError as e:  # the largest batch may not fit
        row["oom"] = str(e).splitlines()[0][:300]
        return row
    cost = step_cost(cfg, split_variant(name)[0], batch=batch)
    sps = [batch * steps / s for s in secs]
    tflops = [cost.total * steps / s / 1e12 for s in secs]
    row.update({
        "samples_per_second": spread(sps), "step_seconds": spread([s / steps for s in secs]),
        "tflops": spread(tflops), "mfu": spread([t / peak_tflops for t in tflops]),
        "in_step_seconds": spread(in_step),
        "mfu_in_step": spread([cost.total / s / 1e12 / peak_tflops for s in in_step]),
        "peak_memory_bytes": int(peak), "baseline_allocated_bytes": int(base_alloc),
        "flops_per_step": cost.total, "saved_activation_bytes_model": cost.saved_bytes,
        "steps": steps, "repeats": len(secs)})
    return row


# ------------------------------------------------------------------------------------ main
def _table(runs: list[dict]) -> str:
    out = ["| setting | strategy | samples/s (mean, min-max) | step (s) | peak memory (MB) | TFLOP/s | MFU | "
           "samples/s ÷ DER++ | memory ÷ DER++ | FLOPs ÷ DER++ (model) | in-step s | in-step MFU |", "|---" * 12 + "|"]
    for setting in dict.fromkeys(r["setting"] for r in runs):
        rs = {r["strategy"]: r for r in runs if r["setting"] == setting}
        d = rs.get("derpp")
        for s, r in rs.items():
            if "oom" in r:
                out.append(f"| {setting} | {s} | out of memory | | | | | | | | | |")
                continue
            sp, ok = r["samples_per_second"], d is not None and "oom" not in d
            out.append(
                f"| {setting} | {s} | {sp['mean']:.1f} ({sp['min']:.1f}-{sp['max']:.1f}) | "
                f"{r['step_seconds']['mean']:.3f} | {r['peak_memory_bytes'] / 2**20:.0f} | "
                f"{r['tflops']['mean']:.1f} | {100 * r['mfu']['mean']:.1f} % | "
                + (f"{sp['mean'] / d['samples_per_second']['mean']:.2f} | "
                   f"{r['peak_memory_bytes'] / max(1, d['peak_memory_bytes']):.2f} | "
                   f"{r['flops_per_step'] / d['flops_per_step']:.3f} |" if ok else "- | - | - |")
                + (f" {r['in_step_seconds']['mean']:.3f} | {100 * r['mfu_in_step']['mean']:.1f} % |"
                   if "in_step_seconds" in r else " - | - |"))
    return "\n".join(out)


def _parser() -> argparse.ArgumentParser:
    """The suite's argument parser."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 2 steps, batch 3 and 4")
    p.add_argument("--model", default="base")
    p.add_argument("--batches", type=int, nargs="*", default=[24, 48, 96])
    p.add_argument("--paper-batch", type=int, default=9)
    p.add_argument("--mem-size", type=int, default=2000)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    p.add_argument("--variants", nargs="*", default=["stella:head_chunk=12"],
                   help="extra plugin settings timed at the --variant-batch setting (buffer on the GPU), "
                        "e.g. stella:head_chunk=12 (all AVM heads at once); the backbone options compile=1 "
                        "(compiled blocks) and bf16_stream=1 (bf16 residual stream) are taken by build_strategy")
    p.add_argument("--amp", default="auto")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_PEAK_TFLOPS)
    p.add_argument("--skip", nargs="*", default=[],
                   help="checks (sync, flop, buffer) or settings (e.g. b9_buffer_pinned_host, b24) to leave out")
    p.add_argument("--profile", nargs="*", default=[],
                   help="STRATEGY:BATCH pairs to profile (torch.profiler, top kernels), after the checks")
    p.add_argument("--variant-batch", type=int, default=None,
                   help="batch of the variants' setting (default: --paper-batch)")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="stop starting new runs after this many seconds (the JSON keeps what was measured)")
    p.add_argument("--workers", type=int, default=4, help="training-loader workers (0 with --smoke)")
    add_import_arguments(p)
    return p


def _run_checks(result: dict, args: argparse.Namespace, cfg: Any, device: Any, save: Any) -> None:
    """The synchronisation pass, FLOP check, buffer check and profiles (short: run whatever the budget)."""
    from stella_avalanche.perf.step_checks import buffer_check, flop_check, profile_step, sync_pass

    for s in ("derpp", "stella", "stella_plus"):
        if s in args.strategies and "sync" not in args.skip:
            for buf in (("device",) if args.smoke else ("device", "cpu")):
                result["sync"].append(sync_pass(s, cfg, batch=args.paper_batch, buffer=buf, device=device,
                                                amp=args.amp, num_workers=WORKERS))
                save()
    for s in args.strategies if "flop" not in args.skip else ():
        result["flop_check"].append(flop_check(s, cfg, batch=args.paper_batch, device=device, amp=args.amp,
                                               num_workers=WORKERS))
        save()
    for s in ("derpp", "stella", "stella_plus"):
        if s in args.strategies and "buffer" not in args.skip:
            result["buffer_check"].append(buffer_check(s, cfg, batch=args.paper_batch, device=device,
                                                       amp=args.amp, num_workers=WORKERS))
            save()
    for item in args.profile:
        pname, _, pb = item.partition(":")
        result.setdefault("profile", []).append(profile_step(pname, cfg, batch=int(pb or args.paper_batch),
                                                             device=device, amp=args.amp, num_workers=WORKERS))
        pr = result["profile"][-1]
        print(f"profile {item}: wall {pr['wall_seconds']:.3f} s, device busy {pr['device_busy_seconds']:.3f} s "
              f"over {pr['steps']} steps; top: " + "; ".join(f"{r['name'][:40]} {r['self_device_us'] / 1e3:.1f} ms"
                                                            for r in pr["top"][:8]), flush=True)
        save()


def _print_summary(result: dict, args: argparse.Namespace) -> None:
    """The timings table and one line per check."""
    print(f"\n{result['meta']['device_name']}, model={args.model}, memory {args.mem_size}, "
          f"{args.steps} steps x {args.repeats} repeats per run, MFU against {args.peak_tflops} TFLOP/s")
    print(_table(result["runs"]))
    for sp in result["sync"]:
        print(f"sync {sp['strategy']} buffer={sp['buffer']}: cuda sync events {sp['cuda_sync_count']}, "
              f"audit {sp['audit_counts']}")
    for bc in result["buffer_check"]:
        print(f"buffer device vs host {bc['strategy']}: input fields equal {bc['input_fields_equal']}, "
              f"selected fields equal {bc['selected_fields_equal']} (device vs device again: "
              f"{bc['selected_fields_equal_repeat']}), largest difference "
              f"{max(bc['max_abs_diff'].values()):.3g} (again: {max(bc['max_abs_diff_repeat'].values()):.3g})")
    for fc in result["flop_check"]:
        print(f"flops {fc['strategy']}: counted / analytic = {fc['counted_over_analytic']:.3f}")
    if result["skipped"]:
        print(f"skipped (budget): {result['skipped']}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    stubbed = prepare_imports(args)
    import torch

    from perf_models import model_config
    from stella_avalanche.perf.cost_model import step_cost
    from stella_avalanche.utils import atomic_write_json

    if args.smoke:
        args.model, args.paper_batch, args.batches = "tiny", 3, [4]
        args.steps, args.repeats, args.warmup, args.mem_size = 2, 2, 1, 16
        args.budget_s = math.inf
        device = torch.device("cpu")
        torch.set_num_threads(1)  # several threads on a shared CPU only wait for each other
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite.py: no CUDA device (use --smoke on a CPU)")
        device = torch.device("cuda")
    global WORKERS
    WORKERS = 0 if args.smoke else args.workers
    cfg = model_config(args.model)
    result: dict[str, Any] = {
        "meta": {"torch": torch.__version__, "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "model": args.model, "peak_tflops": args.peak_tflops, "smoke": args.smoke,
                 "stubbed": stubbed, "argv": sys.argv[1:] if argv is None else argv},
        "cost_model": {}, "runs": [], "flop_check": [], "sync": [], "buffer_check": [], "skipped": []}
    for b in [args.paper_batch, *args.batches]:
        result["cost_model"][str(b)] = {
            s: {"flops": step_cost(cfg, s, batch=b).total, "saved_bytes": step_cost(cfg, s, batch=b).saved_bytes,
                "parts": step_cost(cfg, s, batch=b).parts} for s in args.strategies}

    def save() -> None:
        atomic_write_json(args.out, result)

    settings = [(f"b{args.paper_batch}_buffer_gpu", args.paper_batch, "device"),
                (f"b{args.paper_batch}_buffer_pinned_host", args.paper_batch, "cpu")]
    settings += [(f"b{b}", b, "device") for b in args.batches]
    settings = [st for st in settings if st[0] not in args.skip]
    vb = args.variant_batch or args.paper_batch
    variant_setting = (f"b{vb}_buffer_gpu_variants", vb, "device")
    # 1. the synchronisation pass and the FLOP check first: short and needed whatever the budget
    _run_checks(result, args, cfg, device, save)
    def timed(setting: str, batch: int, buffer: str, names: list[str], report: bool) -> None:
        for s in names:
            if time.perf_counter() - t0 > args.budget_s:
                result["skipped"].append([setting, s])
                continue
            row = measure_run(s, cfg, batch=batch, buffer=buffer, steps=args.steps, repeats=args.repeats,
                              warmup=args.warmup, mem_size=args.mem_size, device=device, amp=args.amp,
                              peak_tflops=args.peak_tflops)
            row["setting"] = setting
            result["runs"].append(row)
            save()
            if report:
                print(f"  {setting} {s}: " + ("oom" if "oom" in row else
                                              f"{row['samples_per_second']['mean']:.1f} samples/s"), flush=True)

    # 2. the timed runs, strategy order rotated per setting
    for i, (setting, batch, buffer) in enumerate(settings):
        r = i % len(args.strategies)
        timed(setting, batch, buffer, args.strategies[r:] + args.strategies[:r], report=True)
    # 3. the variants, beside DER++ and the default STELLA again (same setting, same run)
    if args.variants:
        timed(*variant_setting, ["derpp", "stella", *args.variants], report=False)
    result["meta"]["wall_seconds"] = time.perf_counter() - t0
    save()
    _print_summary(result, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
