"""Checks of one training step beside the timings (``benchmarks/perf/gpu_suite.py``): FLOPs counted by
torch against the analytic cost model, host synchronisations, the replay buffer's placement, a profile.

Each check builds its strategy with :func:`~stella_avalanche.perf.strategy_builder.build_strategy` and
trains on :func:`~stella_avalanche.perf.random_clips.random_clip_stream` clips (a warm-up experience that
fills the buffer, then the checked steps).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from stella_avalanche.perf.random_clips import random_clip_stream
from stella_avalanche.perf.strategy_builder import build_strategy
from stella_avalanche.perf.timing import synchronize

__all__ = ["flop_check", "sync_pass", "buffer_check", "profile_step", "timing_clips", "COPIED_FIELDS",
           "SELECTED_FIELDS"]

#: the repository holding this package: synchronisation stacks are shown relative to it
REPOSITORY = Path(__file__).resolve().parents[2]


def timing_clips(cfg: Any, batch: int, *, experiences: int, steps: int, warmup: int) -> Any:
    """A warm-up experience of ``warmup`` steps, then ``experiences`` of ``steps`` steps each, of random
    clips drawn from a pool of ``2 * batch`` per experience (timing only: the content does not matter)."""
    return random_clip_stream(cfg, [batch * warmup] + [batch * steps] * experiences, pool=2 * batch)


def _placement(buffer: str, device: torch.device) -> str:
    """Buffer placement of a check: ``"device"`` (the training device) or ``"cpu"`` (host memory)."""
    return str(device) if buffer == "device" else "cpu"


def flop_check(name: str, cfg: Any, *, batch: int, device: torch.device, amp: str,
               num_workers: int = 0) -> dict:
    """FLOPs of one training step counted by torch beside the analytic count."""
    from avalanche.training.plugins import SupervisedPlugin
    from torch.utils.flop_counter import FlopCounterMode

    from stella_avalanche.perf.cost_model import step_cost

    class Count(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kw):
            if strategy.clock.train_exp_counter == 1 and not hasattr(self, "total"):
                self.mode = FlopCounterMode(display=False)
                self.mode.__enter__()

        def after_training_iteration(self, strategy, **kw):
            if getattr(self, "mode", None) is not None:
                self.mode.__exit__(None, None, None)
                self.total, self.mode = self.mode.get_total_flops(), None

    import contextlib

    from torch.nn.attention import SDPBackend, sdpa_kernel

    c = Count()
    strategy = build_strategy(name, cfg, batch=batch, mem_size=4 * batch,
                              buffer_device=_placement("device", device), device=device, amp=amp,
                              plugins=[c], num_workers=num_workers)
    # the counter has no formula for the CPU's fused attention kernel: count the math backend there
    backend = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
    with backend:
        for exp in timing_clips(cfg, batch, experiences=1, steps=1, warmup=1).train_stream:
            strategy.train(exp, eval_streams=[])
    analytic = step_cost(cfg, name, batch=batch).total
    return {"strategy": name, "batch": batch, "counted": int(c.total), "analytic": analytic,
            "counted_over_analytic": c.total / analytic}


def sync_pass(name: str, cfg: Any, *, batch: int, buffer: str, device: torch.device, amp: str,
              num_workers: int = 0) -> dict:
    """One training step (buffer already holding items) under the sync-debug mode and the audit."""
    import traceback
    import warnings

    from avalanche.training.plugins import SupervisedPlugin

    from stella_avalanche.perf.sync_audit import HostSyncAudit

    events: list[dict] = []
    repo = str(REPOSITORY)

    class Watch(SupervisedPlugin):
        def before_training_iteration(self, strategy, **kw):
            if strategy.clock.train_exp_counter == 1 and not hasattr(self, "audit"):
                self.audit = HostSyncAudit(keep=("stella_avalanche", "avalanche"))
                self.active = True
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("warn")
                self.audit.__enter__()

        def after_training_iteration(self, strategy, **kw):
            if getattr(self, "active", False):
                self.audit.__exit__(None, None, None)
                if device.type == "cuda":
                    torch.cuda.set_sync_debug_mode("default")
                self.active = False

    def show(message, category, filename, lineno, file=None, line=None):
        stack = [f"{Path(f.filename).relative_to(repo) if f.filename.startswith(repo) else f.filename}:{f.lineno}"
                 for f in traceback.extract_stack()[:-1] if "site-packages/torch" not in f.filename
                 and "importlib" not in f.filename and f.filename.startswith(repo)]
        events.append({"message": str(message)[:200], "where": f"{filename}:{lineno}", "stack": stack[-4:]})

    w = Watch()
    strategy = build_strategy(name, cfg, batch=batch, mem_size=4 * batch,
                              buffer_device=_placement(buffer, device), device=device, amp=amp,
                              plugins=[w], num_workers=num_workers)
    old = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            for exp in timing_clips(cfg, batch, experiences=1, steps=1, warmup=1).train_stream:
                strategy.train(exp, eval_streams=[])
        finally:
            warnings.showwarning = old
    # torch's one-time notice that the debug mode is a prototype is not a synchronisation
    syncs = [e for e in events if "synchroniz" in e["message"].lower() and "prototype" not in e["message"]]
    return {"strategy": name, "batch": batch, "buffer": buffer, "cuda_sync_events": syncs,
            "cuda_sync_count": len(syncs),
            "audit": [list(r) for r in w.audit.summary()], "audit_counts": w.audit.counts()}


#: stored fields copied from the input clip (equal whatever the device's arithmetic)
COPIED_FIELDS = ("video", "audio", "audio_lo", "audio_scale", "category", "index", "label")
#: STELLA+'s stored fields that depend on the patch selection, i.e. on the model's importance maps
SELECTED_FIELDS = ("video_patches", "audio_patches", "audio_patches_lo", "audio_patches_scale", "video_ids",
                   "audio_ids")


def buffer_check(name: str, cfg: Any, *, batch: int, device: torch.device, amp: str,
                 num_workers: int = 0) -> dict:
    """The same seeded steps with the replay buffer on the device, in host memory, and on the device
    again: the stored items of the first two must agree as closely as the two device runs agree.

    Fields copied from the input clips must be equal. Fields computed by the model (z, importance)
    and, for STELLA+, the selected patches and their ids follow the model's arithmetic: on a GPU its
    reductions are not deterministic, so a host-vs-device difference in those fields is a placement
    bug only if the repeated device run does not show it too.
    """
    data = {}
    for run in ("device", "cpu", "device_repeat"):
        buf = "device" if run == "device_repeat" else run
        strategy = build_strategy(name, cfg, batch=batch, mem_size=4 * batch,
                                  buffer_device=_placement(buf, device), device=device, amp=amp,
                                  plugins=[], num_workers=num_workers)
        for exp in timing_clips(cfg, batch, experiences=1, steps=2, warmup=1).train_stream:
            strategy.train(exp, eval_streams=[])
        plugin = next(p for p in strategy.plugins if getattr(p, "buffer", None) is not None)
        data[run] = {k: v[: len(plugin.buffer)].cpu() for k, v in plugin.buffer.data.items()}

    def diff(a: str, b: str) -> dict[str, float]:
        return {k: float((data[a][k].double() - data[b][k].double()).abs().max()) for k in data[a]}

    placement, repeat = diff("device", "cpu"), diff("device", "device_repeat")

    def equal(d: dict, fields: tuple) -> bool:
        return all(d[k] == 0.0 for k in d if k in fields)

    return {"strategy": name, "items": len(next(iter(data["cpu"].values()))), "max_abs_diff": placement,
            "max_abs_diff_repeat": repeat, "input_fields_equal": equal(placement, COPIED_FIELDS),
            "selected_fields_equal": equal(placement, SELECTED_FIELDS),
            "selected_fields_equal_repeat": equal(repeat, SELECTED_FIELDS)}


def profile_step(name: str, cfg: Any, *, batch: int, device: torch.device, amp: str,
                 num_workers: int = 0, steps: int = 3, top: int = 25) -> dict:
    """``torch.profiler`` over ``steps`` training steps (buffer on the device, after a warm-up
    experience): the kernels that take the device's time, grouped, to explain the utilisation."""
    from torch.profiler import ProfilerActivity, profile

    strategy = build_strategy(name, cfg, batch=batch, mem_size=4 * batch,

                              buffer_device=_placement("device", device), device=device, amp=amp,
                              plugins=[], num_workers=num_workers)
    exps = list(timing_clips(cfg, batch, experiences=1, steps=steps, warmup=1).train_stream)
    strategy.train(exps[0], eval_streams=[])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    synchronize(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        strategy.train(exps[1], eval_streams=[])
        synchronize(device)
    wall = time.perf_counter() - t
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    rows = []
    busy_us = 0.0
    for e in prof.key_averages():
        dev_us = getattr(e, "self_device_time_total", 0.0)
        # operator rows repeat their kernels' device time: count the kernel rows alone for "busy"
        if str(getattr(e, "device_type", "")).endswith(("CUDA", "PrivateUse1")):
            busy_us += dev_us
        rows.append({"name": e.key[:120], "calls": e.count, "self_device_us": dev_us,
                     "self_cpu_us": e.self_cpu_time_total})
    rows.sort(key=lambda r: -r["self_device_us" if device.type == "cuda" else "self_cpu_us"])
    return {"strategy": name, "batch": batch, "steps": steps, "wall_seconds": wall,
            "device_busy_seconds": busy_us / 1e6, "top": rows[:top], "sort_key": key}
