#!/usr/bin/env python
"""Where a training step's time goes, per phase, for finetune, DER++, STELLA and STELLA+.

Runs every (model, strategy) pair in this one process, one after the other, on in-memory random
clips (a first experience fills the replay buffer, the second is timed), and splits each step into:

- ``full_clip``: STELLA's no-grad patchify + both encoders + joint fusion over the unmasked clips;
- ``avm``: AVM projections for the importance maps and the matching (VAM) loss's forward;
- ``selection``: importance, candidates, RCA, exclusion and the patch draw (``PatchSelector.select``);
- ``replay``: buffer draw and decode (+ for the baselines, concatenation with the current rows);
- ``pre_other``: the rest of the plugin's pre-forward work (decode/encode of clips, batch assembly,
  zero_grad);
- ``forward``, ``loss_terms`` (plugin penalties), ``backward``, ``optimizer``, ``insert`` (reservoir
  insertion and end-of-iteration bookkeeping).

Beside each phase: the analytic FLOPs of ``stella_avalanche/perf/cost_model.py`` and the achieved
GFLOP/s, so that phases running far below the main forward's rate show overhead beyond the method.
``--audit`` additionally runs one step of each strategy under
:class:`stella_avalanche.perf.sync_audit.HostSyncAudit` and lists every host synchronisation point.

    python benchmarks/perf/step_breakdown.py                              # tiny + small on CPU
    python benchmarks/perf/step_breakdown.py --models tiny --audit --rounds 1 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))

PHASES = ("full_clip", "avm", "selection", "replay", "pre_other", "forward", "loss_terms", "backward",
          "optimizer", "insert")
STRATEGIES = ("finetune", "derpp", "stella", "stella_plus")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Phases:
    """Phase clock driven by plugin callbacks and by wrapped plugin/model methods (outermost only)."""

    def __init__(self, device) -> None:
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.depth = 0
        self.cur: dict[str, float] = {}

    def wrap(self, obj: Any, name: str, bucket: str) -> None:
        fn: Callable = getattr(obj, name)

        def timed(*a, **k):
            if self.depth or not self.active:
                return fn(*a, **k)
            self.depth += 1
            _sync(self.device)
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                _sync(self.device)
                self.cur[bucket] = self.cur.get(bucket, 0.0) + time.perf_counter() - t
                self.depth -= 1

        setattr(obj, name, timed)

    active = False


def _make_plugin(clock: _Phases):
    from avalanche.training.plugins import SupervisedPlugin

    class PhaseTimer(SupervisedPlugin):
        """Placed after the strategy's own plugin: each hook runs after that plugin's work."""

        def _mark(self, key: str) -> None:
            _sync(clock.device)
            self.t[key] = time.perf_counter()

        def before_training_iteration(self, strategy, **kw):
            clock.cur = {}
            clock.active = strategy.clock.train_exp_counter == 1
            self.t: dict[str, float] = {}
            self._mark("start")

        def before_forward(self, strategy, **kw):
            self._mark("fwd0")

        def after_forward(self, strategy, **kw):
            self._mark("fwd1")

        def before_backward(self, strategy, **kw):
            self._mark("bwd0")

        def after_backward(self, strategy, **kw):
            self._mark("bwd1")

        def before_update(self, strategy, **kw):
            self._mark("up0")

        def after_update(self, strategy, **kw):
            self._mark("up1")

        def after_training_iteration(self, strategy, **kw):
            self._mark("end")
            if not clock.active:
                return
            t, c = self.t, clock.cur
            pre = t["fwd0"] - t["start"]
            sub = sum(c.get(k, 0.0) for k in ("full_clip", "avm", "selection", "replay"))
            row = {k: c.get(k, 0.0) for k in ("full_clip", "avm", "selection", "replay")}
            row.update(pre_other=pre - sub, forward=t["fwd1"] - t["fwd0"], loss_terms=t["bwd0"] - t["fwd1"],
                       backward=t["bwd1"] - t["bwd0"], optimizer=t["up1"] - t["up0"],
                       insert=t["end"] - t["up1"] + (t["up0"] - t["bwd1"]))
            row["step"] = t["end"] - t["start"]
            clock.steps.append(row)
            clock.active = False

    return PhaseTimer()


def measure(model_name: str, strategy_name: str, *, batch: int, steps: int, warmup: int, device: str,
            mem_size: int, audit: bool = False, amp: str = "auto") -> dict:
    """Phase times (median over the timed steps) and, with ``audit``, the host-sync audit of one step."""
    import torch

    from perf_models import model_config
    from stella_avalanche.perf.cost_model import step_cost
    from stella_avalanche.perf.random_clips import random_clip_stream
    from stella_avalanche.perf.strategy_builder import build_strategy

    dev = torch.device(device)
    cfg = model_config(model_name)
    clock = _Phases(dev)
    plugins = [_make_plugin(clock)]
    auditor = None
    if audit:
        from avalanche.training.plugins import SupervisedPlugin

        from stella_avalanche.perf.sync_audit import HostSyncAudit

        class Audit(SupervisedPlugin):
            """Audits the first timed step, from the start of the iteration to its end."""

            def __init__(self) -> None:
                super().__init__()
                self.mode = None
                self.done = False

            def before_training_iteration(self, strategy, **kw):
                if strategy.clock.train_exp_counter == 1 and not self.done:
                    self.mode = HostSyncAudit(keep=("stella_avalanche", "avalanche"))
                    self.mode.__enter__()

            def after_training_iteration(self, strategy, **kw):
                if self.mode is not None:
                    self.mode.__exit__(None, None, None)
                    self.done, self.result, self.mode = True, self.mode, None

        auditor = Audit()
        plugins.insert(0, auditor)  # audit the whole iteration, including the other plugins' hooks
    strategy = build_strategy(strategy_name, cfg, batch=batch, device=dev, mem_size=mem_size,
                              buffer_device=str(dev), amp=amp, plugins=plugins)
    for p in strategy.plugins:  # sub-phase clocks on the objects the plugin calls
        if type(p).__name__ == "STELLAPlugin":
            p._build(strategy)
            bb = strategy.backbone
            for name in ("patchify_video", "patchify_audio", "encode_modality", "fuse_joint"):
                clock.wrap(bb, name, "full_clip")
            clock.wrap(p.avm, "project", "avm")
            clock.wrap(p.avm, "matching_loss", "avm")
            clock.wrap(p.selector, "select", "selection")
            clock.wrap(p.buffer, "sample", "replay")
            clock.wrap(p.buffer, "add", "insert_buffer")
        elif hasattr(p, "draw_replay"):
            clock.wrap(p, "draw_replay", "replay")
            clock.wrap(p, "apply_replay", "replay")
    # the main forward also calls encode_modality / fuse_joint: count them only before the forward
    orig_plugin = plugins[-1]
    fwd0 = orig_plugin.before_forward

    def before_forward(strategy_, **kw):
        fwd0(strategy_, **kw)
        clock.active_saved, clock.active = clock.active, False

    def after_training_iteration(strategy_, _orig=orig_plugin.after_training_iteration, **kw):
        clock.active = getattr(clock, "active_saved", False)
        _orig(strategy_, **kw)

    orig_plugin.before_forward = before_forward
    orig_plugin.after_training_iteration = after_training_iteration
    bm = random_clip_stream(cfg, [batch * warmup, batch * steps])
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
    rows = clock.steps[1:] or clock.steps  # the first timed step may include lazy initialisation
    med = {k: statistics.median(r.get(k, 0.0) for r in rows) for k in (*PHASES, "step")}
    spread = {"step_min": min(r["step"] for r in rows), "step_max": max(r["step"] for r in rows)}
    cost = step_cost(cfg, strategy_name, batch=batch, bytes_per_element=4 if dev.type == "cpu" else 2)
    flops = {"forward": cost.parts["main_forward"], "backward": cost.parts["main_backward"]}
    if strategy_name.startswith("stella"):
        vam = cost.parts["vam_fwd_bwd"]
        flops.update(full_clip=cost.parts["full_clip_pass"],
                     avm=cost.parts["avm_project"] + cost.parts["vam_negatives"] + vam // 3,
                     selection=cost.parts["importance_rca"])
        flops["backward"] += 2 * vam // 3
    out = {"model": model_name, "strategy": strategy_name, "batch": batch, "device": str(dev),
           "steps": len(rows), "median_seconds": med, **spread, "flops": flops, "flops_total": cost.total}
    if auditor is not None and getattr(auditor, "result", None) is not None:
        out["audit"] = [list(r) for r in auditor.result.summary()]
        out["audit_counts"] = auditor.result.counts()
    return out


def _combine(rounds: list[dict]) -> dict:
    """Median over rounds of each round's per-phase medians; the step's spread over the rounds."""
    out = dict(rounds[0])
    out["median_seconds"] = {k: statistics.median(r["median_seconds"][k] for r in rounds)
                             for k in rounds[0]["median_seconds"]}
    out["round_step_seconds"] = [r["median_seconds"]["step"] for r in rounds]
    out["step_min"] = min(out["round_step_seconds"])
    out["step_max"] = max(out["round_step_seconds"])
    out["steps"] = sum(r["steps"] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def _table(results: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        rs = [r for r in results if r["model"] == model]
        lines.append(f"\nmodel={model}, batch {rs[0]['batch']} current (+ as many replayed), {rs[0]['device']}, "
                     f"{rs[0].get('rounds', 1)} rounds of {rs[0]['steps'] // rs[0].get('rounds', 1)} timed steps, "
                     "median ms per phase (GFLOP/s of the analytic FLOPs)")
        lines.append("| strategy | step | " + " | ".join(PHASES) + " | step min-max over rounds |")
        lines.append("|---|" + "---|" * (len(PHASES) + 2))
        for r in rs:
            cells = []
            for k in PHASES:
                s = r["median_seconds"][k]
                f = r["flops"].get(k)
                cells.append(f"{1e3 * s:.1f}" + (f" ({f / s / 1e9:.0f})" if f and s > 0 else ""))
            st = r["median_seconds"]["step"]
            lines.append(f"| {r['strategy']} | {1e3 * st:.1f} ({r['flops_total'] / st / 1e9:.0f}) | "
                         + " | ".join(cells) + f" | {1e3 * r['step_min']:.0f}-{1e3 * r['step_max']:.0f} |")
        by = {r["strategy"]: r for r in rs}
        if "derpp" in by:
            d = by["derpp"]
            for s in ("stella", "stella_plus"):
                if s in by:
                    st = by[s]
                    ratio = st["median_seconds"]["step"] / d["median_seconds"]["step"]
                    lines.append(f"{s} / derpp: step time {ratio:.2f} "
                                 f"(cost model FLOPs {st['flops_total'] / d['flops_total']:.2f})")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["tiny", "small"])
    p.add_argument("--strategies", nargs="*", default=list(STRATEGIES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--mem-size", type=int, default=200)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (more than the free cores only adds waiting)")
    p.add_argument("--audit", action="store_true", help="also list the host synchronisation points of one step")
    p.add_argument("--json", default=None, help="write all results to this JSON file")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    results = []
    for m in args.models:
        per: dict[str, list[dict]] = {s: [] for s in args.strategies}
        for rnd in range(args.rounds):  # rounds with the strategy order rotated: load drifts hit all alike
            k = rnd % len(args.strategies)
            for s in args.strategies[k:] + args.strategies[:k]:
                per[s].append(measure(m, s, batch=args.batch_size, steps=args.steps, warmup=args.warmup,
                                      device=args.device, mem_size=args.mem_size, audit=args.audit and rnd == 0))
                print(f"  measured {m} {s} (round {rnd + 1})", file=sys.stderr)
        results.extend(_combine(per[s]) for s in args.strategies)
    print(_table(results))
    if args.audit:
        for r in results:
            if "audit" in r:
                print(f"\nhost sync points, one {r['strategy']} step ({r['model']}): {r['audit_counts']}")
                for kind, name, site, n in r["audit"]:
                    print(f"  {kind:12s} {name:22s} x{n}  {site}")
    if args.json:
        from stella_avalanche.utils import atomic_write_json

        atomic_write_json(args.json, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
