#!/usr/bin/env python
"""ATen operator calls per training iteration, per step phase: a CPU-measurable proxy for kernel launches.

At the paper's batch (9 current + 9 replayed clips) a GPU step is host-bound: the device waits for
Python to launch kernels, so the number of operators a step dispatches matters as much as its FLOPs.
Every ATen operator that reaches the dispatcher below autograd (forward, backward and optimizer alike)
is at least one kernel launch on CUDA, except views (``aten.view``, ``aten.t``, ``aten.expand``, ...),
which only make new tensor metadata. This script counts both, on the CPU, with a
:class:`torch.utils._python_dispatch.TorchDispatchMode`.

Each strategy is built by :func:`stella_avalanche.perf.strategy_builder.build_strategy`, trains a
warm-up experience (the replay buffer fills), then the iterations of a second experience are counted.
Two plugins, one before and one after the strategy's own, cut each iteration at the Avalanche
callbacks into phases:

- ``plugins:before_forward``: the strategy plugin's pre-forward work, split for STELLA into
  ``stella:full_clip`` (patchify, encoders and fusion of the full clips), ``stella:avm_project``,
  ``stella:vam`` (matching loss forward), ``stella:selection`` (``PatchSelector.select``),
  ``replay:draw`` / ``replay:apply`` (buffer draw + decode, batch concatenation) and
  ``plugins:before_forward`` (the rest);
- ``forward``, ``criterion``, ``plugins:before_backward`` (DER penalty, VAM term), ``backward``,
  ``optimizer`` (main Adam and, for STELLA, the AVM's), ``plugins:after_training_iteration``
  (reservoir insertion; ``replay:insert`` inside it), ``template`` (everything else in the loop).

``plugin ops`` in the table = every phase whose name starts with ``plugins:``, ``stella:`` or
``replay:``: the work a strategy adds around the model's forward / backward / optimizer.

    python benchmarks/perf/op_count.py                          # tiny model, batch 9, derpp stella stella_plus
    python benchmarks/perf/op_count.py --model base --steps 2   # the paper's sizes (slow on a CPU)
    python benchmarks/perf/op_count.py --json before.json       # then diff two runs with --diff
    python benchmarks/perf/op_count.py --diff before.json after.json
    python benchmarks/perf/op_count.py --sites 25               # top call sites of the plugin phases
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: the template's steps between the callbacks: after the last plugin's ``before_<x>`` hook runs
#: ``AFTER_HOOK[x]``, and the first plugin's hook of callback ``x`` opens ``plugins:<x>``
AFTER_HOOK = {"before_training_iteration": "template", "before_forward": "forward", "after_forward": "criterion",
              "before_backward": "backward", "after_backward": "template", "before_update": "optimizer",
              "after_update": "template"}
CORE_PHASES = ("forward", "criterion", "backward", "optimizer", "template")
PLUGIN_PREFIXES = ("plugins:", "stella:", "replay:")
STRATEGIES = ("derpp", "stella", "stella_plus")


class OpCounter:
    """Counts ATen operator calls by phase (and optionally by call site) while :attr:`active`.

    :param sites: also attribute each call of a plugin phase to its innermost ``stella_avalanche``
        frame (file:function); slower, for finding what to batch.
    """

    def __init__(self, *, sites: bool = False) -> None:
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counter.record(func)
                return func(*args, **(kwargs or {}))

        self._mode_cls = _Mode
        self.mode: Optional[Any] = None
        self.sites = sites
        self.phase = "template"
        self._stack: list[str] = []
        self.steps: list[dict[str, dict[str, int]]] = []  # per iteration: phase -> {"ops", "launching"}
        self.cur: dict[str, dict[str, int]] = {}
        self.by_name: collections.Counter = collections.Counter()
        self.by_site: collections.Counter = collections.Counter()

    @property
    def active(self) -> bool:
        return self.mode is not None

    def record(self, func: Any) -> None:
        c = self.cur.setdefault(self.phase, {"ops": 0, "launching": 0})
        c["ops"] += 1
        if not getattr(func, "is_view", False):
            c["launching"] += 1
        if self.phase.startswith(PLUGIN_PREFIXES):
            self.by_name[(self.phase, str(func.overloadpacket.__name__))] += 1
            if self.sites and not getattr(func, "is_view", False):  # launching ops only
                self.by_site[(self.phase, _site(), str(func.overloadpacket.__name__))] += 1

    def start(self) -> None:
        self.cur, self.phase, self._stack = {}, "template", []
        self.mode = self._mode_cls()
        self.mode.__enter__()

    def stop(self) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.mode = None
            self.steps.append(self.cur)

    def wrap(self, obj: Any, name: str, phase: str) -> None:
        """Count the calls of ``obj.name`` (outermost wrapped call only) under ``phase``."""
        fn: Callable = getattr(obj, name)

        def counted(*a: Any, **k: Any) -> Any:
            if self._stack:
                return fn(*a, **k)
            self._stack.append(self.phase)
            self.phase = phase
            try:
                return fn(*a, **k)
            finally:
                self.phase = self._stack.pop()

        setattr(obj, name, counted)


def _site() -> str:
    """Innermost ``stella_avalanche`` frame of the caller: ``module.py:function``."""
    f = sys._getframe(3)
    while f is not None:
        fn = f.f_code.co_filename
        if "stella_avalanche" in fn and "op_count" not in fn:
            return f"{Path(fn).parent.name}/{Path(fn).name}:{f.f_code.co_name}:{f.f_lineno}"
        f = f.f_back
    return "?"


def _phase_plugins(counter: OpCounter) -> tuple[Any, Any]:
    """(first, last): plugins placed before and after the strategy's own, cutting the phases."""
    from avalanche.training.plugins import SupervisedPlugin

    def counting(strategy: Any) -> bool:
        return strategy.clock.train_exp_counter == 1

    class First(SupervisedPlugin):
        def before_training_iteration(self, strategy: Any, **kw: Any) -> None:
            if counting(strategy):
                counter.start()
                counter.phase = "plugins:before_training_iteration"

    class Last(SupervisedPlugin):
        def after_training_iteration(self, strategy: Any, **kw: Any) -> None:
            counter.stop()

    for cb, after in AFTER_HOOK.items():
        if cb != "before_training_iteration":  # First's own hook starts the count
            setattr(First, cb, lambda self, strategy, _cb=cb, **kw: setattr(counter, "phase", f"plugins:{_cb}"))
        setattr(Last, cb, lambda self, strategy, _a=after, **kw: setattr(counter, "phase", _a))
    First.after_training_iteration = lambda self, strategy, **kw: setattr(counter, "phase",
                                                                          "plugins:after_training_iteration")
    return First(), Last()


def count(model_name: str, strategy_name: str, *, batch: int, steps: int, warmup: int, mem_size: int,
          sites: bool = False) -> dict:
    """Op counts per phase of ``steps`` iterations of ``strategy_name`` after ``warmup`` iterations."""
    import torch

    from perf_models import model_config
    from stella_avalanche.perf.random_clips import random_clip_stream
    from stella_avalanche.perf.strategy_builder import build_strategy

    cfg = model_config(model_name)
    counter = OpCounter(sites=sites)
    first, last = _phase_plugins(counter)
    strategy = build_strategy(strategy_name, cfg, batch=batch, device=torch.device("cpu"), mem_size=mem_size,
                              buffer_device="cpu", amp="auto", plugins=[last])
    strategy.plugins.insert(0, first)
    for p in strategy.plugins:
        if type(p).__name__ == "STELLAPlugin":
            p._build(strategy)
            p.avm_step._features = _wrapped_static(counter, p.avm_step._features, "stella:full_clip")
            counter.wrap(p.avm, "project", "stella:avm_project")
            counter.wrap(p.avm, "matching_loss", "stella:vam")
            counter.wrap(p.selector, "select", "stella:selection")
        if hasattr(p, "draw_replay"):
            counter.wrap(p, "draw_replay", "replay:draw")
            counter.wrap(p, "apply_replay", "replay:apply")
            counter.wrap(p, "insert", "replay:insert")
    bm = random_clip_stream(cfg, [batch * warmup, batch * steps])
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[])
    rows = counter.steps
    phases = sorted({k for r in rows for k in r})
    per_phase = {k: {m: statistics.median(r.get(k, {}).get(m, 0) for r in rows) for m in ("ops", "launching")}
                 for k in phases}
    totals = [sum(v["ops"] for v in r.values()) for r in rows]
    launching = [sum(v["launching"] for v in r.values()) for r in rows]
    n = max(1, len(rows))
    return {"model": model_name, "strategy": strategy_name, "batch": batch, "steps": len(rows),
            "ops": statistics.median(totals), "ops_min": min(totals), "ops_max": max(totals),
            "launching": statistics.median(launching),
            "plugin_ops": sum(v["ops"] for k, v in per_phase.items() if k.startswith(PLUGIN_PREFIXES)),
            "plugin_launching": sum(v["launching"] for k, v in per_phase.items() if k.startswith(PLUGIN_PREFIXES)),
            "phases": per_phase,
            "top_ops": [[ph, name, c / n] for (ph, name), c in counter.by_name.most_common(40)],
            "top_sites": [[ph, s, op, c / n] for (ph, s, op), c in counter.by_site.most_common(400)]}


def _wrapped_static(counter: OpCounter, fn: Callable, phase: str) -> Callable:
    """``counter.wrap`` for a function stored on an instance (a staticmethod read through it)."""
    holder = type("_Holder", (), {"f": staticmethod(fn)})()
    counter.wrap(holder, "f", phase)
    return holder.f


def _table(results: list[dict], label: str = "") -> str:
    by = {r["strategy"]: r for r in results}
    ref = by.get("derpp")
    r0 = results[0]
    lines = [f"\nATen ops per training iteration{label}: model={r0['model']}, batch {r0['batch']} current "
             f"(+ as many replayed), CPU fp32, median over {r0['steps']} iterations "
             "(ops = all dispatched; launching = without views)",
             "| strategy | ops / iteration | launching | plugin ops | plugin launching | forward | backward "
             "| optimizer | ops ÷ DER++ | launching ÷ DER++ |", "|---|" + "---|" * 9]
    for r in results:
        ph = r["phases"]
        cells = [f"{r['ops']:.0f}" + (f" ({r['ops_min']}-{r['ops_max']})" if r["ops_min"] != r["ops_max"] else ""),
                 f"{r['launching']:.0f}", f"{r['plugin_ops']:.0f}", f"{r['plugin_launching']:.0f}",
                 *(f"{ph.get(k, {}).get('ops', 0):.0f}" for k in ("forward", "backward", "optimizer")),
                 f"{r['ops'] / ref['ops']:.3f}" if ref else "-",
                 f"{r['launching'] / ref['launching']:.3f}" if ref else "-"]
        lines.append(f"| {r['strategy']} | " + " | ".join(cells) + " |")
    phases = sorted({k for r in results for k in r["phases"]},
                    key=lambda k: (not k.startswith(PLUGIN_PREFIXES), k))
    lines += ["", "ops (launching) per phase:", "| phase | " + " | ".join(by) + " |", "|---|" + "---|" * len(by)]
    for k in phases:
        lines.append(f"| {k} | " + " | ".join(
            f"{r['phases'].get(k, {}).get('ops', 0):.0f} ({r['phases'].get(k, {}).get('launching', 0):.0f})"
            for r in by.values()) + " |")
    return "\n".join(lines)


def _diff(before: list[dict], after: list[dict]) -> str:
    """Side-by-side table of two ``--json`` outputs."""
    b = {(r["model"], r["strategy"]): r for r in before}
    lines = ["| model | strategy | ops before | ops after | launching before | launching after | plugin ops before "
             "| plugin ops after | launching ÷ DER++ before | after |", "|---|" + "---|" * 9]
    a_ref = {r["model"]: r for r in after if r["strategy"] == "derpp"}
    b_ref = {r["model"]: r for r in before if r["strategy"] == "derpp"}
    for r in after:
        o = b.get((r["model"], r["strategy"]))
        if o is None:
            continue
        rb = (f"{o['launching'] / b_ref[r['model']]['launching']:.3f}" if r["model"] in b_ref else "-")
        ra = (f"{r['launching'] / a_ref[r['model']]['launching']:.3f}" if r["model"] in a_ref else "-")
        lines.append(f"| {r['model']} | {r['strategy']} | {o['ops']:.0f} | {r['ops']:.0f} | {o['launching']:.0f} | "
                     f"{r['launching']:.0f} | {o['plugin_ops']:.0f} | {r['plugin_ops']:.0f} | {rb} | {ra} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (default), small or base")
    p.add_argument("--strategies", nargs="*", default=list(STRATEGIES),
                   help="strategy names, with plugin settings as in gpu_suite (e.g. stella:head_chunk=12)")
    p.add_argument("--batch", type=int, default=9, help="current clips per step (as many are replayed)")
    p.add_argument("--steps", type=int, default=3, help="counted iterations")
    p.add_argument("--warmup", type=int, default=2, help="iterations of the first experience (fills the buffer)")
    p.add_argument("--mem-size", type=int, default=200)
    p.add_argument("--sites", type=int, default=0, help="print the top N call sites of the plugin phases")
    p.add_argument("--json", default=None, help="write the results to this JSON file")
    p.add_argument("--diff", nargs=2, metavar=("BEFORE", "AFTER"), default=None,
                   help="only print two --json outputs side by side")
    args = p.parse_args()
    if args.diff:
        before, after = (json.loads(Path(f).read_text()) for f in args.diff)
        print(_diff(before, after))
        return 0
    import torch

    torch.set_num_threads(1)
    results = [count(args.model, s, batch=args.batch, steps=args.steps, warmup=args.warmup,
                     mem_size=args.mem_size, sites=args.sites > 0) for s in args.strategies]
    print(_table(results))
    if args.sites:
        for r in results:
            print(f"\ntop call sites of the plugin phases, {r['strategy']} (launching ops per iteration):")
            for ph, s, op, c in r["top_sites"][:args.sites]:
                print(f"  {c:7.1f}  {ph:30s} {op:24s} {s}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
