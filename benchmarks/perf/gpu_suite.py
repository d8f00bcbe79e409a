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
    python benchmarks/perf/gpu_suite.py --smoke --out /tmp/smoke.json          # CPU, seconds

On a machine without avalanche-lib, run ``benchmarks/perf/gpu_bundle.sh`` here first (copies
avalanche and dill into ``.gpu_site/``), carry ``.gpu_site`` and pass ``--site .gpu_site
--stub-missing`` (inert stand-ins for packages avalanche imports but the step never uses).
"""
from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import importlib.util
import math
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

#: packages avalanche-lib imports at start-up that a training step never uses
STUB_CANDIDATES = ("wandb", "qpsolvers", "quadprog", "gdown", "pytorchcv", "GPUtil")
STRATEGIES = ("finetune", "derpp", "stella", "stella_plus")
#: H200 SXM dense bf16 peak (vendor figure); a large bf16 matmul reaches ~790 on the lent machines
H200_BF16_PEAK_TFLOPS = 989.4


# ------------------------------------------------------------------------------------ stand-ins
class _InertMeta(type):
    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert


class _Inert(metaclass=_InertMeta):
    """Any attribute, call or subclassing of a stand-in module gives another inert object."""

    def __init__(self, *a: Any, **k: Any) -> None:
        pass

    def __call__(self, *a: Any, **k: Any) -> "_Inert":
        return _Inert()

    def __getattr__(self, name: str) -> "_Inert":
        return _Inert()


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Inert


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102
        if fullname.split(".")[0] in self.names:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):  # noqa: D102
        mod = _StubModule(spec.name)
        mod.__path__ = []  # a package: submodules resolve through this finder too
        return mod

    def exec_module(self, module):  # noqa: D102
        pass


def install_stubs(names: list[str] | None, *, only_missing: bool) -> list[str]:
    """Put inert stand-ins for ``names`` (default: :data:`STUB_CANDIDATES`) on ``sys.meta_path``.

    :param only_missing: stub only the names that cannot be imported here.
    :returns: the stubbed names.
    """
    names = list(names or STUB_CANDIDATES)
    if only_missing:
        names = [n for n in names if importlib.util.find_spec(n) is None]
    if names:
        sys.meta_path.insert(0, _StubFinder(set(names)))
    return names


# ------------------------------------------------------------------------------------ one run
def _clips(cfg, batch: int, experiences: int, steps: int, warmup: int):
    import torch
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset
    from torch.utils.data import Dataset, default_collate

    pool = 2 * batch  # a small pool of distinct random clips, indexed cyclically (timing only)
    g = torch.Generator().manual_seed(0)
    video = torch.randn(pool, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g)
    audio = torch.randn(pool, 1, cfg.audio_length, cfg.mel_bins, generator=g)

    class Clips(Dataset):
        def __init__(self, n: int, cat: int) -> None:
            self.n, self.cat = n, cat

        def __len__(self) -> int:
            return self.n

        def __getitem__(self, i: int) -> dict:
            j = (i + self.cat) % pool
            return {"video": video[j], "audio": audio[j], "category": self.cat, "label": 0, "index": i}

    sizes = [batch * warmup] + [batch * steps] * experiences
    return benchmark_from_datasets(
        train=[AvalancheDataset([Clips(n, c)], collate_fn=default_collate) for c, n in enumerate(sizes)])


def split_variant(name: str) -> tuple[str, dict]:
    """``"stella:head_chunk=12"`` -> ``("stella", {"head_chunk": 12})`` (integer plugin arguments)."""
    base, _, rest = name.partition(":")
    extra = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        extra[key] = int(value)
    return base, extra


#: training-loader workers (set by main): collating and pinning base-size clips of a large batch on
#: the main thread would time the loader, not the step
WORKERS = 0


def _build(name: str, cfg, *, batch: int, mem_size: int, buffer: str, device, amp: str, plugins: list):
    import torch

    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.training.strategies import make_strategy

    name, extra = split_variant(name)
    torch.manual_seed(0)
    model = CAVMAE(cfg)
    if extra.pop("compile", 0):  # the runner's train.compile
        model.compile_blocks()
    avm = build_avm(model) if name.startswith("stella") else None
    pk: dict = {}
    if name != "finetune":
        pk = {"mem_size": mem_size, "buffer_device": str(device) if buffer == "device" else "cpu", **extra}
    return make_strategy(name, model=model, avm=avm, plugins=plugins, plugin_kwargs=pk, train_mb_size=batch,
                         train_epochs=1, device=device, amp=amp, num_workers=WORKERS)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_run(name: str, cfg, *, batch: int, buffer: str, steps: int, repeats: int, warmup: int,
                mem_size: int, device, amp: str, peak_tflops: float) -> dict:
    """Throughput, peak memory, TFLOP/s and MFU of one strategy at one setting."""
    import gc

    import torch

    from stella_avalanche.perf.cost_model import step_cost

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    base_alloc = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    row: dict[str, Any] = {"strategy": name, "batch": batch, "replay": 0 if name == "finetune" else batch,
                           "buffer": "none" if name == "finetune" else buffer, "mem_size": mem_size}
    try:
        timer = StepTimer(device)
        strategy = _build(name, cfg, batch=batch, mem_size=mem_size, buffer=buffer, device=device, amp=amp,
                          plugins=[timer.plugin])
        bm = _clips(cfg, batch, repeats, steps, warmup)
        exps = list(bm.train_stream)
        strategy.train(exps[0], eval_streams=[])  # fills the buffer (>= batch items), lazy init
        # same seed and clips for every variant of a strategy: compiled vs eager agree here or not
        row["warmup_losses"] = [float(x) for x in timer.losses]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        secs = []
        timer.reset(active=True)
        for exp in exps[1:]:
            _sync(device)
            t = time.perf_counter()
            strategy.train(exp, eval_streams=[])
            _sync(device)
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
        "samples_per_second": _spread(sps), "step_seconds": _spread([s / steps for s in secs]),
        "tflops": _spread(tflops), "mfu": _spread([t / peak_tflops for t in tflops]),
        "in_step_seconds": _spread(in_step),
        "mfu_in_step": _spread([cost.total / s / 1e12 / peak_tflops for s in in_step]),
        "peak_memory_bytes": int(peak), "baseline_allocated_bytes": int(base_alloc),
        "flops_per_step": cost.total, "saved_activation_bytes_model": cost.saved_bytes,
        "steps": steps, "repeats": len(secs)})
    return row


class StepTimer:
    """Time of each training iteration without the wait for the loader's next batch.

    On CUDA two events are recorded per iteration (``before_training_iteration`` and
    ``after_training_iteration``) and read once at the end, so timing adds no synchronisation: the
    first event runs when the host reaches the step or the previous step's work ends, whichever is
    later, the second when the step's work ends. On the CPU the host clock is read instead.
    """

    def __init__(self, device) -> None:
        from avalanche.training.plugins import SupervisedPlugin

        self.device, self.active, self.marks, self.losses = device, False, [], []
        timer = self

        class _Plugin(SupervisedPlugin):
            def before_training_iteration(self, strategy, **kw):
                timer._mark()

            def after_backward(self, strategy, **kw):
                timer.losses.append(strategy.loss.detach().float().sum())  # read once, at the end

            def after_training_iteration(self, strategy, **kw):
                timer._mark()

        self.plugin = _Plugin()

    def reset(self, active: bool) -> None:
        self.active, self.marks = active, []

    def _mark(self) -> None:
        import torch

        if not self.active:
            return
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append(ev)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        """Seconds per timed iteration (pairs of marks)."""
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks[::2], self.marks[1::2])]
        return [b - a for a, b in zip(self.marks[::2], self.marks[1::2])]


def _spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "std": statistics.pstdev(xs) if len(xs) > 1 else 0.0, "values": xs}


# ------------------------------------------------------------------------------------ checks
def flop_check(name: str, cfg, *, batch: int, device, amp: str) -> dict:
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
    strategy = _build(name, cfg, batch=batch, mem_size=4 * batch, buffer="device", device=device, amp=amp,
                      plugins=[c])
    # the counter has no formula for the CPU's fused attention kernel: count the math backend there
    backend = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else contextlib.nullcontext()
    with backend:
        for exp in _clips(cfg, batch, 1, 1, 1).train_stream:
            strategy.train(exp, eval_streams=[])
    analytic = step_cost(cfg, name, batch=batch).total
    return {"strategy": name, "batch": batch, "counted": int(c.total), "analytic": analytic,
            "counted_over_analytic": c.total / analytic}


def sync_pass(name: str, cfg, *, batch: int, buffer: str, device, amp: str) -> dict:
    """One training step (buffer already holding items) under the sync-debug mode and the audit."""
    import traceback
    import warnings

    import torch
    from avalanche.training.plugins import SupervisedPlugin

    from stella_avalanche.perf.sync_audit import HostSyncAudit

    events: list[dict] = []
    repo = str(ROOT)

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
    strategy = _build(name, cfg, batch=batch, mem_size=4 * batch, buffer=buffer, device=device, amp=amp,
                      plugins=[w])
    old = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        try:
            for exp in _clips(cfg, batch, 1, 1, 1).train_stream:
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


def buffer_check(name: str, cfg, *, batch: int, device, amp: str) -> dict:
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
        strategy = _build(name, cfg, batch=batch, mem_size=4 * batch, buffer=buf, device=device, amp=amp,
                          plugins=[])
        for exp in _clips(cfg, batch, 1, 2, 1).train_stream:
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


def profile_step(name: str, cfg, *, batch: int, device, amp: str, steps: int = 3, top: int = 25) -> dict:
    """``torch.profiler`` over ``steps`` training steps (buffer on the device, after a warm-up
    experience): the kernels that take the device's time, grouped, to explain the utilisation."""
    from torch.profiler import ProfilerActivity, profile

    strategy = _build(name, cfg, batch=batch, mem_size=4 * batch, buffer="device", device=device, amp=amp,
                      plugins=[])
    exps = list(_clips(cfg, batch, 1, steps, 1).train_stream)
    strategy.train(exps[0], eval_streams=[])
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t = time.perf_counter()
    with profile(activities=acts) as prof:
        strategy.train(exps[1], eval_streams=[])
        _sync(device)
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


def main(argv: list[str] | None = None) -> int:
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
                   help="extra plugin settings timed at the paper's setting (buffer on the GPU): fewer "
                        "kernel launches for the importance maps (all AVM heads at once) vs the default")
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
    p.add_argument("--site", default=None, help="a folder of carried packages to put first on sys.path")
    p.add_argument("--stub-missing", action="store_true", help="inert stand-ins for missing STUB_CANDIDATES")
    p.add_argument("--stub", nargs="*", default=None, help="stub exactly these packages (even if installed)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.site:
        sys.path.insert(0, str(Path(args.site).resolve()))
    stubbed = []
    if args.stub is not None:
        stubbed = install_stubs(args.stub, only_missing=False)
    elif args.stub_missing:
        stubbed = install_stubs(None, only_missing=True)
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
    for s in ("derpp", "stella", "stella_plus"):
        if s in args.strategies and "sync" not in args.skip:
            for buf in (("device",) if args.smoke else ("device", "cpu")):
                result["sync"].append(sync_pass(s, cfg, batch=args.paper_batch, buffer=buf, device=device,
                                                amp=args.amp))
                save()
    for s in args.strategies if "flop" not in args.skip else ():
        result["flop_check"].append(flop_check(s, cfg, batch=args.paper_batch, device=device, amp=args.amp))
        save()
    for s in ("derpp", "stella", "stella_plus"):
        if s in args.strategies and "buffer" not in args.skip:
            result["buffer_check"].append(buffer_check(s, cfg, batch=args.paper_batch, device=device,
                                                       amp=args.amp))
            save()
    for item in args.profile:
        pname, _, pb = item.partition(":")
        result.setdefault("profile", []).append(profile_step(pname, cfg, batch=int(pb or args.paper_batch),
                                                             device=device, amp=args.amp))
        pr = result["profile"][-1]
        print(f"profile {item}: wall {pr['wall_seconds']:.3f} s, device busy {pr['device_busy_seconds']:.3f} s "
              f"over {pr['steps']} steps; top: " + "; ".join(f"{r['name'][:40]} {r['self_device_us'] / 1e3:.1f} ms"
                                                            for r in pr["top"][:8]), flush=True)
        save()
    # 2. the timed runs, strategy order rotated per setting
    for i, (setting, batch, buffer) in enumerate(settings):
        order = args.strategies[i % len(args.strategies):] + args.strategies[:i % len(args.strategies)]
        for s in order:
            if time.perf_counter() - t0 > args.budget_s:
                result["skipped"].append([setting, s])
                continue
            row = measure_run(s, cfg, batch=batch, buffer=buffer, steps=args.steps, repeats=args.repeats,
                              warmup=args.warmup, mem_size=args.mem_size, device=device, amp=args.amp,
                              peak_tflops=args.peak_tflops)
            row["setting"] = setting
            result["runs"].append(row)
            save()
            print(f"  {setting} {s}: " + ("oom" if "oom" in row else
                                          f"{row['samples_per_second']['mean']:.1f} samples/s"), flush=True)
    # 3. the variants, beside DER++ and the default STELLA again (same setting, same run)
    if args.variants:
        setting, batch, buffer = variant_setting
        for s in ["derpp", "stella", *args.variants]:
            if time.perf_counter() - t0 > args.budget_s:
                result["skipped"].append([setting, s])
                continue
            row = measure_run(s, cfg, batch=batch, buffer=buffer, steps=args.steps, repeats=args.repeats,
                              warmup=args.warmup, mem_size=args.mem_size, device=device, amp=args.amp,
                              peak_tflops=args.peak_tflops)
            row["setting"] = setting
            result["runs"].append(row)
            save()
    result["meta"]["wall_seconds"] = time.perf_counter() - t0
    save()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
