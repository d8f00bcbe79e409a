#!/usr/bin/env python
"""Numerics of the bf16 residual stream (``CAVConfig.bf16_stream``, issue 27 item 1) against fp32 and
plain bf16 autocast, for DER++ and STELLA (strategies built by ``perf/strategy_builder.build_strategy``).

(a) ``fixed_batch``: each loss term of one training step (the template's ``loss_terms``: the model's
    MAE / InfoNCE parts and every plugin term, e.g. DER++'s distillation) and the total, on one fixed
    batch, in fp32 (no autocast), bf16 autocast, and bf16 autocast + ``bf16_stream``, with the relative
    difference of each to fp32. Every mode is a fresh build (seed 0) that first trains the same
    warm-up experience in fp32, so weights, buffer and replay draws are the same when the measured
    step starts (``warmup_losses_equal`` says whether the fp32 warm-ups agreed bit for bit).
(b) ``train``: ``--steps`` training steps with ``bf16_stream`` under bf16 autocast (random clips, replay
    once the buffer holds items); whether every loss stayed finite, and each term's first, last
    and largest value.
(c) ``recall`` (``--recall-seeds K`` > 0): the runner (``experiment.run_experiment``) on the synthetic
    benchmark (``--recall-preset``, random initialisation) with and without
    ``model.overrides.bf16_stream``, K seeds each; the Avg 𝒜 (mean over R@1/5/10) per direction, as
    mean ± standard deviation over the seeds, so a difference can be read against the seed spread.
    The runner trains under ``train.amp: auto``: bf16 on a GPU, fp32 on the CPU (where both arms are
    then the same computation).

The training steps run under a bf16 autocast on any device: the strategy's ``amp_dtype`` is set after
it is built (the template itself only enables autocast on CUDA). ``--smoke``: tiny model on the CPU,
a few steps; the numbers then say nothing about a GPU.

    python benchmarks/perf/bf16_numerics.py --out bf16_numerics.json                 # GPU, base model
    python benchmarks/perf/bf16_numerics.py --smoke --out smoke.json                  # CPU, seconds
    python benchmarks/perf/bf16_numerics.py --smoke --recall-seeds 2 --out smoke.json # + the runner

The JSON is rewritten (atomically) after each part. On a machine without avalanche-lib pass
``--site .gpu_site --stub-missing`` as for ``gpu_suite.py``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

# torch-free: the stand-ins must be installed before anything imports avalanche
from stella_avalanche.perf.import_stubs import add_import_arguments, prepare_imports  # noqa: E402

STRATEGIES = ("derpp", "stella")
#: (autocast on, bf16_stream) of the three modes of part (a)
MODES = {"fp32": (False, False), "bf16": (True, False), "bf16_stream": (True, True)}


class _TermRecorder:
    """A plugin keeping every training iteration's loss terms (``strategy.loss_terms``) and total, as
    device tensors read once at the end (no host read per step)."""

    def __init__(self) -> None:
        from avalanche.training.plugins import SupervisedPlugin

        self.rows: list[dict[str, Any]] = []
        rec = self

        class _Plugin(SupervisedPlugin):
            def after_training_iteration(self, strategy: Any, **kw: Any) -> None:
                rec.rows.append({"total": strategy.loss.detach().float().sum(),
                                 **{k: v.detach().float() for k, v in strategy.loss_terms.items()}})

        self.plugin = _Plugin()

    def values(self) -> list[dict[str, float]]:
        """Every recorded row as floats (one device read)."""
        return [{k: float(v) for k, v in row.items()} for row in self.rows]


def _build(name: str, cfg: Any, *, batch: int, device: Any, mem_size: int, stream: bool, plugins: list) -> Any:
    """A strategy (fp32: ``amp_dtype`` None until the caller sets it) with or without the bf16 stream."""
    from stella_avalanche.perf.strategy_builder import build_strategy

    return build_strategy(name, cfg, batch=batch, device=device, mem_size=mem_size, amp=None, plugins=plugins,
                          bf16_stream=stream)


def _relative(x: float, ref: float) -> float:
    """|x - ref| / |ref| (absolute difference when ref is 0)."""
    return abs(x - ref) / abs(ref) if ref != 0 else abs(x - ref)


def fixed_batch_terms(name: str, cfg: Any, *, batch: int, warmup: int, mem_size: int, device: Any) -> dict:
    """Part (a): the loss terms of one step on one fixed batch in the three :data:`MODES`.

    :param name: strategy (``derpp``, ``stella``, ...).
    :param cfg: backbone config.
    :param batch: current samples of the step.
    :param warmup: fp32 steps before it (they fill the replay buffer).
    :param mem_size: replay memory in items.
    :param device: training device.
    :returns: ``{"modes": {mode: {term: value}}, "relative_to_fp32": {mode: {term: rel}},
        "max_relative": {mode: max rel}, "warmup_losses": {mode: [...]}, "warmup_losses_equal": bool}``.
    """
    import torch

    from stella_avalanche.perf.step_checks import timing_clips

    warm, measured = list(timing_clips(cfg, batch, experiences=1, steps=1, warmup=warmup).train_stream)
    modes: dict[str, dict[str, float]] = {}
    warm_losses: dict[str, list[float]] = {}
    for mode, (autocast, stream) in MODES.items():
        rec = _TermRecorder()
        strategy = _build(name, cfg, batch=batch, device=device, mem_size=mem_size, stream=stream,
                          plugins=[rec.plugin])
        strategy.train(warm, eval_streams=[])  # fp32 for every mode: the same state before the step
        warm_losses[mode] = [row["total"] for row in rec.values()]
        rec.rows.clear()
        strategy.amp_dtype = torch.bfloat16 if autocast else None
        strategy.train(measured, eval_streams=[])
        (modes[mode],) = rec.values()
        del strategy
    ref = modes["fp32"]
    rel = {m: {k: _relative(v, ref[k]) for k, v in terms.items() if k in ref} for m, terms in modes.items() if m != "fp32"}
    first = next(iter(warm_losses.values()))
    return {"modes": modes, "relative_to_fp32": rel, "max_relative": {m: max(r.values()) for m, r in rel.items()},
            "warmup_losses": warm_losses, "warmup_losses_equal": all(w == first for w in warm_losses.values())}


def train_steps(name: str, cfg: Any, *, batch: int, steps: int, per_experience: int, mem_size: int,
                device: Any) -> dict:
    """Part (b): ``steps`` training steps with the bf16 stream under bf16 autocast.

    :param per_experience: steps per experience.
    :returns: ``{"steps", "all_finite", "error", "seconds", "terms": {term: {"steps", "first", "last",
        "max"}}}`` (a term's ``steps``: the steps that had it).
    """
    import torch

    from stella_avalanche.perf.random_clips import random_clip_stream
    from stella_avalanche.training.template import NonFiniteLossError

    sizes = [batch * per_experience] * (steps // per_experience)
    if steps % per_experience:
        sizes.append(batch * (steps % per_experience))
    rec = _TermRecorder()
    strategy = _build(name, cfg, batch=batch, device=device, mem_size=mem_size, stream=True, plugins=[rec.plugin])
    strategy.amp_dtype = torch.bfloat16
    error = None
    t0 = time.perf_counter()
    try:
        for exp in random_clip_stream(cfg, sizes, pool=2 * batch).train_stream:
            strategy.train(exp, eval_streams=[])
    except NonFiniteLossError as e:  # the template stops at the first non-finite loss
        error = str(e)[:500]
    seconds = time.perf_counter() - t0
    rows = rec.values()
    terms = {}
    for k in dict.fromkeys(k for r in rows for k in r):  # replay terms appear once the buffer holds items
        vals = [r[k] for r in rows if k in r]
        terms[k] = {"steps": len(vals), "first": vals[0], "last": vals[-1], "max": max(vals)}
    return {"steps": len(rows), "all_finite": error is None and all(math.isfinite(v) for r in rows for v in r.values()),
            "error": error, "seconds": seconds, "terms": terms}


def recall_arms(name: str, *, seeds: int, preset: str, batch: int, epochs: int, device: str,
                threads: int | None = None) -> dict:
    """Part (c): the runner's Avg 𝒜 with and without ``bf16_stream`` over ``seeds`` seeds each.

    :param threads: the runner's ``train.threads`` (None: its default).

    :returns: ``{"off"|"on": {"per_seed": [{"a2v", "v2a"}], dir: {"mean", "std"}}}``.
    """
    from stella_avalanche import experiment as E

    out: dict[str, Any] = {}
    for arm, flag in (("off", "false"), ("on", "true")):
        per_seed = []
        for seed in range(seeds):
            cfg = E.load_config(benchmark="synthetic", overrides=[
                f"benchmark.preset={preset}", "init.checkpoint=none", "init.avm_checkpoint=none",
                f"train.batch_size={batch}", f"train.epochs={epochs}", f"strategy.name={name}",
                f"model.overrides.bf16_stream={flag}", "checkpoint.keep_last=1",
                *([f"train.threads={threads}"] if threads else [])])
            with tempfile.TemporaryDirectory() as tmp:
                res = E.run_experiment(cfg, out_dir=tmp, seed=seed, device=device, progress=False)
            per_seed.append({d: res["summary"][d]["Avg"]["A"] for d in ("a2v", "v2a")})
        out[arm] = {"per_seed": per_seed, **{d: {"mean": statistics.fmean(r[d] for r in per_seed),
                                                 "std": statistics.stdev(r[d] for r in per_seed) if seeds > 1 else 0.0}
                                             for d in ("a2v", "v2a")}}
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU, batch 3, a few steps")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cuda or cpu")
    p.add_argument("--model", default="base", help="tiny, small or base (perf_models.model_config)")
    p.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    p.add_argument("--batch", type=int, default=96, help="current samples of the fixed-batch step (a)")
    p.add_argument("--warmup", type=int, default=2, help="fp32 steps before the fixed batch (fill the buffer)")
    p.add_argument("--mem-size", type=int, default=2000)
    p.add_argument("--steps", type=int, default=1000, help="bf16-stream training steps (b)")
    p.add_argument("--train-batch", type=int, default=24, help="current samples per step in (b)")
    p.add_argument("--steps-per-experience", type=int, default=100)
    p.add_argument("--recall-seeds", type=int, default=0, help="(c): seeds per arm; 0 leaves (c) out")
    p.add_argument("--recall-preset", default="tiny", help="synthetic benchmark preset of (c)")
    p.add_argument("--recall-batch", type=int, default=4)
    p.add_argument("--recall-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (--smoke: 1)")
    add_import_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    stubbed = prepare_imports(args)
    import torch

    from perf_models import model_config
    from stella_avalanche.utils import atomic_write_json

    if args.smoke:
        args.model, args.batch, args.warmup, args.mem_size = "tiny", 3, 2, 16
        args.steps, args.train_batch, args.steps_per_experience = 4, 3, 2
        args.device = "cpu" if args.device == "auto" else args.device
        args.threads = args.threads or 1  # several threads on a shared CPU only wait for each other
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = model_config(args.model)
    result: dict[str, Any] = {
        "meta": {"torch": torch.__version__, "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "model": args.model, "smoke": args.smoke, "stubbed": stubbed,
                 "argv": sys.argv[1:] if argv is None else argv},
        "fixed_batch": {}, "train": {}, "recall": {}}
    t0 = time.perf_counter()
    for s in args.strategies:
        fb = result["fixed_batch"][s] = fixed_batch_terms(s, cfg, batch=args.batch, warmup=args.warmup,
                                                          mem_size=args.mem_size, device=device)
        atomic_write_json(args.out, result)
        print(f"(a) {s} batch {args.batch}: " + "; ".join(
            f"{k} fp32 {v:.5f} bf16 {fb['modes']['bf16'][k]:.5f} stream {fb['modes']['bf16_stream'][k]:.5f} "
            f"(rel {fb['relative_to_fp32']['bf16_stream'][k]:.1e})" for k, v in fb["modes"]["fp32"].items())
            + f"; warm-ups equal: {fb['warmup_losses_equal']}", flush=True)
    for s in args.strategies:
        tr = result["train"][s] = train_steps(s, cfg, batch=args.train_batch, steps=args.steps,
                                              per_experience=args.steps_per_experience, mem_size=args.mem_size,
                                              device=device)
        atomic_write_json(args.out, result)
        print(f"(b) {s}: {tr['steps']} bf16-stream steps, all finite: {tr['all_finite']}, "
              f"{tr['seconds']:.1f} s; total first {tr['terms'].get('total', {}).get('first', float('nan')):.4f} "
              f"last {tr['terms'].get('total', {}).get('last', float('nan')):.4f}", flush=True)
    if args.recall_seeds > 0:
        for s in args.strategies:
            rc = result["recall"][s] = recall_arms(s, seeds=args.recall_seeds, preset=args.recall_preset,
                                                   batch=args.recall_batch, epochs=args.recall_epochs,
                                                   device=str(device), threads=args.threads)
            atomic_write_json(args.out, result)
            print(f"(c) {s}, {args.recall_seeds} seeds, Avg A: " + "; ".join(
                f"{d} off {rc['off'][d]['mean']:.2f} ± {rc['off'][d]['std']:.2f}, on {rc['on'][d]['mean']:.2f} ± "
                f"{rc['on'][d]['std']:.2f}" for d in ("a2v", "v2a")), flush=True)
    result["meta"]["wall_seconds"] = time.perf_counter() - t0
    atomic_write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
