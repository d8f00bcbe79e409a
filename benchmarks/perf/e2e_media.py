#!/usr/bin/env python
"""End to end from media: the real Continual-VS data path feeding the model, against the step alone.

On a stream written by ``make_media_stream.py`` (JPEG frame directories, 16 kHz WAV, the prepared
split CSVs), the training data are built exactly as ``run_stella.py`` builds them for the vggsound
benchmark: the packaged config (``vggsound_paper`` by default), the runner's benchmark factory
(``experiment._build_benchmark``: split CSVs -> ``AudioVideoDataset`` with the paper's
preprocessing and training augmentation, the decode-once feature cache when ``--cache`` is given,
as ``benchmark.kwargs.cache=DIR`` would), the strategy's own training loader (``EpochSampler``,
``--workers`` processes, pinned memory on CUDA). Measured per batch size and strategy (finetune,
DER++, STELLA by default; ``base`` model, bf16 autocast on CUDA):

(a) loader only: clips/s of the strategy's training loader alone (steady rate after the first
    round of worker batches, and the start-up time to the first batch);
(b) device-resident: samples/s of training steps on batches already on the device (real decoded,
    augmented clips taken from (a), cycled; no loader workers, nothing copied);
(c) end to end: samples/s of training steps fed by the loader from the media files (loader ->
    pinned memory -> device -> step), and (c) / (b);
(d) evaluation: the retrieval stream through ``strategy.eval`` with the runner's retrieval metrics
    (embeddings of every retrieval clip, recall@1/5/10 of the pooled gallery), with the eval loader's
    0 workers (what the runner uses) and with ``--workers``; the pooled recall re-timed alone;
(e) a checkpoint save of each strategy (model, optimizer, replay buffer; written to ``--scratch``).

Samples/s count current clips (replayed rows excluded). Times are host clocks taken with CUDA
synchronisation at the window's two ends (the window opens when the last untimed step ends, so it
holds the fetch of every batch it trains on); warm-up steps are excluded: a warm-up experience first
(lazy initialisation, the replay buffer fills), and in (c) the first ``--skip`` steps, by default
workers x 2 + 2 (DataLoader's prefetch factor is 2), so that batches the workers prefetched during
start-up do not flatter the rate: a loader slower than the step has drained that queue by then. The
in-step time of each step (CUDA events between ``before_training_iteration`` and
``after_training_iteration``, the loader's wait excluded) is recorded too. One JSON, rewritten
atomically after every measurement; paths in it are relative to the repository or the JSON's
folder.

    python benchmarks/perf/e2e_media.py --data runs/media --out e2e.json                 # GPU
    python benchmarks/perf/e2e_media.py --data runs/media --out e2e.json --smoke --device cpu

On the GPU machine (no avalanche-lib, decord, omegaconf in its image): ``benchmarks/perf/gpu_e2e.sh``.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# torch-free: the stand-ins must be installed before anything imports avalanche
from stella_avalanche.perf.import_stubs import install_stubs  # noqa: E402

STRATEGIES = ("finetune", "derpp", "stella")
#: DataLoader's default prefetch_factor: batches each worker may hold ready before the step asks
PREFETCH_FACTOR = 2


# ------------------------------------------------------------------------------------ small helpers
def portable(path: str | os.PathLike | None, base: str | os.PathLike | None = None) -> str | None:
    """``path`` relative to ``base`` (the JSON's folder) when inside it, else as
    :func:`stella_avalanche.paths.portable_path` names it (repository-relative, or the bare name)."""
    from stella_avalanche.paths import portable_path

    if path is None:
        return None
    p = Path(path).resolve()
    if base is not None:
        try:
            return p.relative_to(Path(base).resolve()).as_posix() or "."
        except ValueError:
            pass
    return portable_path(p)


def git_state(commit: str | None = None) -> dict[str, Any]:
    """The commit measured: ``--commit`` / ``$STELLA_COMMIT`` (a machine without the .git folder), else
    ``git rev-parse HEAD`` here; ``dirty`` when tracked files differ from it."""
    commit = commit or os.environ.get("STELLA_COMMIT")
    if commit:
        return {"commit": commit, "dirty": None, "source": "given"}
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, timeout=10)
        if head.returncode == 0:
            return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip()), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "dirty": None, "source": "none"}


class Window:
    """A plugin that times a window of training iterations with the host clock: iterations ``skip ..
    skip + steps - 1`` of the next experience, the device synchronised at both ends (the only
    synchronisations it adds). The window opens when iteration ``skip - 1`` ends, so it holds the
    fetch of every batch it trains on (at ``skip == 0``: when iteration 0 starts). Also notes when
    the first batch arrived (the loader's start-up)."""

    def __init__(self, device: Any) -> None:
        from avalanche.training.plugins import SupervisedPlugin

        self.device = device
        self.arm(0, 0)
        win = self

        class _Plugin(SupervisedPlugin):
            def before_training_iteration(self, strategy: Any, **kw: Any) -> None:
                win._before()

            def after_training_iteration(self, strategy: Any, **kw: Any) -> None:
                win._after()

        self.plugin = _Plugin()

    def arm(self, skip: int, steps: int) -> None:
        """Time iterations ``skip .. skip + steps - 1`` of the next experience."""
        self.skip, self.steps, self.i = int(skip), int(steps), 0
        self.t_first = self.t_start = self.t_end = None

    def _stamp(self) -> float:
        from stella_avalanche.perf.timing import synchronize

        synchronize(self.device)
        return time.perf_counter()

    def _before(self) -> None:
        if self.i == 0:
            self.t_first = time.perf_counter()
            if self.skip == 0 and self.steps > 0:
                self.t_start = self._stamp()

    def _after(self) -> None:
        self.i += 1
        if self.steps > 0 and self.skip > 0 and self.i == self.skip:
            self.t_start = self._stamp()
        if self.steps > 0 and self.i == self.skip + self.steps:
            self.t_end = self._stamp()


class DevicePool:
    """A map-style dataset of clips already on the device: ``n`` samples cycling over a pool of real
    decoded clips (each key stacked on the device once; ``index`` too, so collating copies nothing
    from the host)."""

    def __init__(self, batches: Sequence[dict], n: int, device: Any) -> None:
        import torch

        keys = ("video", "audio", "category", "label")
        self.pool = {k: torch.cat([b[k] for b in batches]).to(device) for k in keys}
        self.size = int(self.pool["video"].shape[0])
        self.n = int(n)
        self.index = torch.arange(self.n, device=device)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        j = int(i) % self.size
        return {**{k: v[j] for k, v in self.pool.items()}, "index": self.index[int(i)]}


def one_experience(dataset: Any) -> Any:
    """The only training experience of a one-stream Avalanche benchmark over ``dataset`` (the
    project's ``collate_av``, no transform groups: ``benchmarks.common.wrap_dataset``)."""
    from avalanche.benchmarks import benchmark_from_datasets

    from stella_avalanche.benchmarks.common import wrap_dataset

    return benchmark_from_datasets(train=[wrap_dataset(dataset)]).train_stream[0]


def subset(dataset: Any, n: int, seed: int) -> Any:
    """``n`` clips of ``dataset`` drawn without replacement (a seeded permutation), same collate."""
    import torch

    if len(dataset) < n:
        raise SystemExit(f"e2e_media.py: the stream has {len(dataset)} training clips, {n} are needed "
                         "(steps x batch); write a larger one (make_media_stream.py --train-per-class)")
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    return dataset.subset(idx)


# ------------------------------------------------------------------------------------ measurements
def strategy_loader(dataset: Any, *, batch: int, workers: int, device: Any, seed: int = 0) -> Any:
    """The training loader a strategy builds for ``dataset`` (``AudioVideoPretraining.make_train_dataloader``
    itself, run on a stand-in holding only what it reads), without building a model."""
    from types import SimpleNamespace

    from stella_avalanche.training.template import AudioVideoPretraining

    host = SimpleNamespace(adapted_dataset=dataset, num_workers=workers, train_mb_size=batch, world_size=1, rank=0,
                           seed=seed, device=device, clock=SimpleNamespace(train_exp_counter=0))
    AudioVideoPretraining.make_train_dataloader(host)
    return host.dataloader


def measure_loader(loader: Any, *, workers: int, keep: int = 2) -> tuple[dict, list]:
    """(a) One pass of a training loader alone.

    The steady rate is taken after the first ``workers`` batches (each worker's first batch carries its
    start-up); returns the row and the first ``keep`` batches (for the device-resident pool)."""
    kept, stamps, clips = [], [], []
    t0 = time.perf_counter()
    for b in loader:
        stamps.append(time.perf_counter())
        clips.append(int(b["video"].shape[0]))
        if len(kept) < keep:
            kept.append(b)
    if len(stamps) < 2:
        raise SystemExit("e2e_media.py: the loader measurement needs >= 2 batches")
    skip = min(workers, len(stamps) - 2)
    steady = sum(clips[skip + 1:]) / (stamps[-1] - stamps[skip])
    row = {"batch": int(loader.batch_size), "workers": workers, "batches": len(stamps), "clips": sum(clips),
           "pin_memory": bool(loader.pin_memory), "startup_seconds": stamps[0] - t0, "steady_after_batches": skip,
           "clips_per_second": steady, "clips_per_second_overall": sum(clips) / (stamps[-1] - t0)}
    return row, kept


def run_experience(strategy: Any, experience: Any, window: Window, timer: Any, *, batch: int, skip: int,
                   steps: int, **train_kwargs: Any) -> dict:
    """Train one experience; the window ``skip .. skip + steps`` timed by the host clock (synchronised)
    and by the step timer (in-step: the loader's wait excluded)."""
    from stella_avalanche.perf.timing import spread, synchronize

    window.arm(skip, steps)
    timer.reset(active=True)
    synchronize(window.device)
    t_call = time.perf_counter()
    strategy.train(experience, eval_streams=[], **train_kwargs)
    synchronize(window.device)
    t_done = time.perf_counter()
    timer.active = False
    in_step = timer.seconds()[skip:skip + steps]
    if window.t_end is None or len(in_step) != steps:
        raise RuntimeError(f"the experience ran {window.i} iterations, {skip + steps} were needed")
    wall = window.t_end - window.t_start
    return {"skip": skip, "steps": steps, "steps_measured": len(in_step), "samples": batch * steps,
            "startup_seconds": window.t_first - t_call, "experience_seconds": t_done - t_call,
            "wall_seconds": wall, "samples_per_second": batch * steps / wall,
            "in_step_seconds": spread(in_step), "in_step_samples_per_second": batch * steps / sum(in_step),
            "loader_wait_seconds_per_step": max(0.0, wall - sum(in_step)) / steps,
            "losses_finite": all(math.isfinite(float(x)) for x in timer.losses[-steps:])}


def measure_eval(strategy: Any, stream: Any, metrics: list, *, workers: int, ks: Sequence[int]) -> dict:
    """(d) One evaluation of the retrieval stream as the runner does it (``strategy.eval``), timed
    whole; then the pooled recall of the same embeddings re-timed alone."""
    import torch

    from stella_avalanche.evaluation.metrics import find_recall_matrix_plugin
    from stella_avalanche.evaluation.retrieval import recall_report
    from stella_avalanche.perf.timing import synchronize

    dev = torch.device(strategy.device)
    synchronize(dev)
    t0 = time.perf_counter()
    strategy.eval(stream, num_workers=workers)
    synchronize(dev)
    seconds = time.perf_counter() - t0
    rm = find_recall_matrix_plugin(metrics)
    data = rm._metric.result()  # the embeddings the eval just collected (reset at the next eval)
    t1 = time.perf_counter()
    recall_report(data["z_audio"], data["z_video"], data["task"], ks=tuple(ks), gallery=rm.gallery,
                  num_tasks=rm.matrix.num_tasks)
    recall_seconds = time.perf_counter() - t1
    n = int(data["index"].numel())
    rep = rm.last_report or {}
    recall = {d: {f"R@{k}": rep[d][f"R@{k}"]["overall"] for k in ks} for d in ("a2v", "v2a") if d in rep}
    return {"workers": workers, "clips": n, "experiences": len(stream), "seconds": seconds,
            "recall_seconds": recall_seconds, "embed_seconds": max(0.0, seconds - recall_seconds),
            "clips_per_second": n / seconds, "recall": recall}


def measure_checkpoint(strategy: Any, scratch: str | None) -> dict:
    """(e) One checkpoint of the strategy (``checkpoint.save_checkpoint``: written, fsynced, renamed),
    in a temporary folder under ``scratch`` that is removed afterwards."""
    from stella_avalanche import checkpoint as C

    d = tempfile.mkdtemp(prefix="e2e-ckpt-", dir=scratch)
    try:
        t0 = time.perf_counter()
        path = C.save_checkpoint(d, strategy, C.Position(experience=1), keep_last=1)
        seconds = time.perf_counter() - t0
        size = path.stat().st_size
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"seconds": seconds, "bytes": int(size), "mb_per_second": size / 2**20 / seconds}


# ------------------------------------------------------------------------------------ one strategy
def measure_strategy(name: str, ctx: dict, batch: int, args: argparse.Namespace, result: dict) -> dict:
    """(b), (c), and (d) / (e) where asked, for one strategy at one batch size."""
    import torch
    from avalanche.training.plugins import EvaluationPlugin

    from stella_avalanche.evaluation import metrics as M
    from stella_avalanche.perf.cost_model import COST_STRATEGIES, step_cost
    from stella_avalanche.perf.strategy_builder import build_strategy
    from stella_avalanche.perf.timing import StepTimer

    device, cfg, bm = ctx["device"], ctx["cfg"], ctx["bm"]
    metrics = M.retrieval_metrics(ks=tuple(cfg["eval"]["ks"]), gallery=cfg["eval"].get("gallery", "pooled"),
                                  num_tasks=len(bm.task_names))
    timer, window = StepTimer(device=device), Window(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    strategy = build_strategy(name, ctx["model_cfg"], batch=batch, device=device, mem_size=ctx["mem_size"],
                              amp=cfg["train"].get("amp", "auto"), plugins=[window.plugin, timer.plugin],
                              num_workers=args.workers, evaluator=EvaluationPlugin(*metrics, loggers=[]),
                              eval_mb_size=int(cfg["train"].get("eval_batch_size", 64)))
    pool = ctx["pools"][batch]
    out: dict[str, Any] = {"strategy": name, "batch": batch, "replay": 0 if name == "finetune" else batch,
                           "amp": str(strategy.amp_dtype), "workers": args.workers,
                           "flops_per_step": step_cost(ctx["model_cfg"], name, batch=batch).total
                           if name in COST_STRATEGIES else None}
    on_device = {"num_workers": 0, "pin_memory": False}
    strategy.train(one_experience(DevicePool(pool, args.warmup * batch, device)), eval_streams=[], **on_device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    resident = one_experience(DevicePool(pool, args.device_steps * batch, device))
    out["device_resident"] = run_experience(strategy, resident, window, timer, batch=batch, skip=0,
                                            steps=args.device_steps, **on_device)
    n = (args.skip + args.steps) * batch
    out["end_to_end"] = run_experience(strategy, one_experience(subset(ctx["train"], n, seed=2 + batch)), window,
                                       timer, batch=batch, skip=args.skip, steps=args.steps)
    out["e2e_over_device"] = (out["end_to_end"]["samples_per_second"]
                              / out["device_resident"]["samples_per_second"])
    out["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
    out["buffer_device"] = _buffer_device(strategy)
    if args.eval_strategy == name and not result["eval"]:
        for w in args.eval_workers:
            result["eval"].append(measure_eval(strategy, bm.retrieval_stream, metrics, workers=w,
                                               ks=cfg["eval"]["ks"]) | {"strategy": name, "batch": batch})
    if args.checkpoint and batch == args.batch[0]:
        out["checkpoint"] = measure_checkpoint(strategy, args.scratch)
    del strategy
    return out


def _buffer_device(strategy: Any) -> str:
    """Where the strategy's replay buffer lives (each plugin's default placement, as the runner
    leaves it), or ``"none"``."""
    holders = [strategy, *strategy.plugins]
    buf = next((getattr(h, "buffer") for h in holders if getattr(h, "buffer", None) is not None
                and hasattr(getattr(h, "buffer"), "device")), None)
    return "none" if buf is None else str(buf.device)


# ------------------------------------------------------------------------------------ main
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="data root written by make_media_stream.py (split CSVs inside)")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--smoke", action="store_true",
                   help="tiny model, batch 2, 2 steps per measurement, 0 workers unless given: seconds on a CPU")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1, ...")
    p.add_argument("--config", default="vggsound_paper", help="packaged preset or YAML file the runner would load")
    p.add_argument("--model", default=None, help="backbone preset (default: the config's, base; --smoke: tiny)")
    p.add_argument("--strategies", nargs="*", default=list(STRATEGIES),
                   help="strategies to time (none: the loader alone, e.g. to time a feature cache)")
    p.add_argument("--batch", type=int, nargs="*", default=None,
                   help="current batch sizes (default: the config's train.batch_size, 48)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads of the main process (default: the runner's, utils.main_process_threads: "
                        "half the cores the loader workers leave)")
    p.add_argument("--workers", type=int, default=None, help="training-loader workers (default: train.num_workers, 8)")
    p.add_argument("--mem-size", type=int, default=None, help="replay memory (default: strategy.params.mem_size)")
    p.add_argument("--cache", default=None,
                   help="feature-cache folder (as benchmark.kwargs.cache=DIR); default none, as the runner")
    p.add_argument("--tasks", nargs="*", default=None, help="task subset (benchmark.kwargs.tasks); default all 8")
    p.add_argument("--warmup", type=int, default=3, help="steps of the warm-up experience (device-resident)")
    p.add_argument("--device-steps", type=int, default=20, help="timed steps of (b)")
    p.add_argument("--steps", type=int, default=40, help="timed steps of (c)")
    p.add_argument("--skip", type=int, default=None,
                   help="untimed first steps of (c) (default: workers x prefetch factor 2 + 2, at least 2): "
                        "batches prefetched during the loader's start-up must not flatter the rate")
    p.add_argument("--loader-batches", type=int, default=None, help="batches of (a) (default: 3 x workers + 8)")
    p.add_argument("--eval-workers", type=int, nargs="*", default=None,
                   help="eval-loader workers to time (default: 0, the runner's, and --workers)")
    p.add_argument("--eval-strategy", default=None,
                   help="strategy whose model is evaluated (default: the first; the backbone's cost is the same)")
    p.add_argument("--no-eval", action="store_true", help="skip (d)")
    p.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=True,
                   help="(e) time one checkpoint save per strategy (default on; --no-checkpoint)")
    p.add_argument("--scratch", default=None, help="folder for the checkpoint of (e) (default: the system temp)")
    p.add_argument("--budget-s", type=float, default=math.inf,
                   help="start no strategy after this many seconds (the JSON keeps what was measured)")
    p.add_argument("--commit", default=None, help="git commit measured (a machine without .git; else git here)")
    p.add_argument("--site", default=None, help="a folder of carried packages to put first on sys.path")
    p.add_argument("--stub-missing", action="store_true", help="inert stand-ins for missing STUB_CANDIDATES")
    p.add_argument("--stub", nargs="*", default=None, help="stub exactly these packages (even if installed)")
    return p


def _defaults(args: argparse.Namespace, cfg: dict) -> None:
    """Fill the options left unset from the config (the runner's values) or the smoke sizes."""
    tr = cfg["train"]
    if args.smoke:
        args.model = args.model or "tiny"
        args.batch = args.batch or [2]
        args.workers = 0 if args.workers is None else args.workers
        args.mem_size = args.mem_size or 8
        args.warmup, args.device_steps, args.steps = 1, 2, 2
        args.loader_batches = args.loader_batches or 3
        args.skip = 1 if args.skip is None else args.skip
    args.model = args.model or cfg["model"]["preset"]
    args.batch = args.batch or [int(tr["batch_size"])]
    args.workers = int(tr.get("num_workers", 0)) if args.workers is None else args.workers
    args.mem_size = args.mem_size or int((cfg["strategy"].get("params") or {}).get("mem_size", 2000))
    args.skip = max(2, PREFETCH_FACTOR * args.workers + 2) if args.skip is None else args.skip
    args.loader_batches = args.loader_batches or 3 * args.workers + 8
    args.eval_workers = list(dict.fromkeys([0, args.workers] if args.eval_workers is None else args.eval_workers))
    if args.no_eval:
        args.eval_workers = []
    args.eval_strategy = args.eval_strategy or (args.strategies[0] if args.strategies else None)


def _table(result: dict) -> str:
    """The runs, the loader and the evaluations as markdown."""
    lines = ["| batch | strategy | device-resident samples/s (in-step) | end-to-end samples/s (in-step) | "
             "e2e ÷ device | loader wait / step (s) | e2e start-up (s) | peak memory (MB) | checkpoint (s) |",
             "|---" * 9 + "|"]
    for r in result["runs"]:
        d, e = r["device_resident"], r["end_to_end"]
        peak = f"{r['peak_memory_bytes'] / 2**20:.0f}" if r["peak_memory_bytes"] else "-"
        ck = f"{r['checkpoint']['seconds']:.1f}" if "checkpoint" in r else "-"
        lines.append(f"| {r['batch']} | {r['strategy']} | "
                     f"{d['samples_per_second']:.1f} ({d['in_step_samples_per_second']:.1f}) | "
                     f"{e['samples_per_second']:.1f} ({e['in_step_samples_per_second']:.1f}) | "
                     f"{r['e2e_over_device']:.2f} | "
                     f"{e['loader_wait_seconds_per_step']:.3f} | {e['startup_seconds']:.2f} | {peak} | {ck} |")
    for a in result["loader"]:
        lines.append(f"\nloader only, batch {a['batch']}, {a['workers']} workers: {a['clips_per_second']:.1f} clips/s "
                     f"steady ({a['clips_per_second_overall']:.1f} with the {a['startup_seconds']:.2f} s start-up)")
    for ev in result["eval"]:
        lines.append(f"eval ({ev['clips']} retrieval clips, {ev['workers']} workers): {ev['seconds']:.2f} s "
                     f"({ev['clips_per_second']:.1f} clips/s; pooled recall alone {ev['recall_seconds']:.3f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.site:
        sys.path.insert(0, str(Path(args.site).resolve()))
    stubbed = (install_stubs(args.stub, only_missing=False) if args.stub is not None
               else install_stubs(None, only_missing=True) if args.stub_missing else [])
    import torch

    from stella_avalanche.benchmarks.common import multitask_train_dataset
    from stella_avalanche.config import load_config
    from stella_avalanche.experiment import _build_benchmark  # the runner's own factory call
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.utils import atomic_write_json, main_process_threads, resolve_device, set_progress

    set_progress(False)
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("e2e_media.py: no CUDA device (use --smoke on a CPU)")
    data, out_dir = Path(args.data).resolve(), Path(args.out).resolve().parent
    overrides = [f"benchmark.root={data}"]
    if args.cache:
        overrides.append(f"benchmark.kwargs.cache={Path(args.cache).resolve()}")
    if args.tasks:
        overrides.append(f"benchmark.kwargs.tasks=[{','.join(args.tasks)}]")
    cfg = load_config(args.config, overrides=overrides)
    _defaults(args, cfg)
    # the runner's rule (utils.main_process_threads); --smoke: one, a shared CPU's threads only wait on each other
    threads = main_process_threads(args.threads or (1 if args.smoke else None), num_workers=args.workers)
    if threads:
        torch.set_num_threads(threads)

    import avalanche.benchmarks  # noqa: F401  (its import, seconds, is not the scenario's build)

    t = time.perf_counter()
    bm = _build_benchmark(cfg)
    build_seconds = time.perf_counter() - t
    train = multitask_train_dataset(bm)
    stream_json = data / "stream.json"
    stream = json.loads(stream_json.read_text()) if stream_json.is_file() else {}
    result: dict[str, Any] = {
        "meta": {"script": "benchmarks/perf/e2e_media.py", "torch": torch.__version__, "python": sys.version.split()[0],
                 "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                 "cpu_count": os.cpu_count(), "smoke": args.smoke, "stubbed": stubbed, **git_state(args.commit)},
        "inputs": {"data": portable(data, out_dir), "config": args.config, "model": args.model, "batch": args.batch,
                   "workers": args.workers, "threads": torch.get_num_threads(), "mem_size": args.mem_size, "amp": cfg["train"].get("amp", "auto"),
                   "eval_batch_size": int(cfg["train"].get("eval_batch_size", 64)), "ks": list(cfg["eval"]["ks"]),
                   "cache": portable(args.cache, out_dir), "tasks": list(bm.task_names), "strategies": args.strategies,
                   "warmup": args.warmup, "device_steps": args.device_steps, "skip": args.skip, "steps": args.steps,
                   "loader_batches": args.loader_batches, "eval_workers": args.eval_workers,
                   "eval_strategy": args.eval_strategy, "checkpoint": args.checkpoint,
                   "budget_s": None if math.isinf(args.budget_s) else args.budget_s,  # JSON has no Infinity
                   "prefetch_factor": PREFETCH_FACTOR, "stream_spec": stream.get("spec"),
                   "features": bm.features.to_dict()},
        "scenario": {"build_seconds": build_seconds, "train_clips": len(train),
                     "test_clips": sum(len(e.dataset) for e in bm.test_stream),
                     "retrieval_clips": sum(len(e.dataset) for e in bm.retrieval_stream),
                     "train_clips_per_task": [len(e.dataset) for e in bm.train_stream],
                     "cache_bytes": _cache_bytes(args.cache)},
        "loader": [], "runs": [], "eval": [], "skipped": []}

    def save() -> None:
        atomic_write_json(args.out, result)

    save()
    ctx = {"device": device, "cfg": cfg, "bm": bm, "train": train, "mem_size": args.mem_size, "pools": {},
           "model_cfg": model_config_for(args.model, bm.features)}
    for batch in args.batch:
        # (a), once per batch size; its first batches become the device-resident pool of (b)
        loader = strategy_loader(subset(train, args.loader_batches * batch, seed=1), batch=batch,
                                 workers=args.workers, device=device)
        row, ctx["pools"][batch] = measure_loader(loader, workers=args.workers)
        del loader
        result["loader"].append(row)
        save()
        print(f"  batch {batch} loader only: {row['clips_per_second']:.1f} clips/s", flush=True)
        for name in args.strategies:
            if time.perf_counter() - t0 > args.budget_s:
                result["skipped"].append({"strategy": name, "batch": batch})
                continue
            row = measure_strategy(name, ctx, batch, args, result)
            result["runs"].append(row)
            save()
            e = row["end_to_end"]
            print(f"  batch {batch} {name}: device-resident {row['device_resident']['samples_per_second']:.1f}, "
                  f"end to end {e['samples_per_second']:.1f} samples/s ({row['e2e_over_device']:.2f})", flush=True)
    result["meta"]["wall_seconds"] = time.perf_counter() - t0
    save()
    print(f"\n{result['meta']['device_name']}, model {args.model}, {args.workers} workers, "
          f"{len(train)} training clips, scenario built in {build_seconds:.1f} s")
    print(_table(result))
    return 0


def _cache_bytes(cache: str | None) -> int | None:
    """Bytes of every feature cache under ``cache`` (None without one)."""
    if not cache or not Path(cache).is_dir():
        return None
    return sum(f.stat().st_size for f in Path(cache).rglob("*.npy"))


if __name__ == "__main__":
    sys.exit(main())
