"""One experiment = one strategy on one benchmark with one seed, end to end.

``experiments/run_stella.py`` is a thin CLI over :func:`run_experiment`; ``experiments/compare.py``
calls it for strategies x seeds. Configuration is a nested dict (packaged YAML presets, see
:mod:`stella_avalanche.config`, plus ``key=value`` overrides, merged with OmegaConf).
"""
from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from stella_avalanche.config import default_preset, load_config
from stella_avalanche.models.config import model_config_for
from stella_avalanche.paths import portable_path
from stella_avalanche.utils import (atomic_write_json, main_process_threads, progress_enabled, resolve_device,
                                   seed_everything)

__all__ = ["load_config", "run_experiment", "default_preset", "train_epochs"]

log = logging.getLogger("stella_avalanche")


# ---------------------------------------------------------------------------------------------
def _build_benchmark(cfg: dict):
    b = cfg["benchmark"]
    name = b["name"]
    if name == "synthetic":
        from stella_avalanche.benchmarks.synthetic import synthetic_benchmark

        return synthetic_benchmark(b.get("root"), seed=int(b.get("data_seed", 0)),
                                   preset=b.get("preset", "default"))
    if not b.get("root"):
        raise ValueError(f"benchmark {name!r} needs a data root (--data-root or benchmark.root=...)")
    if name == "vggsound":
        from stella_avalanche.benchmarks.vggsound import vggsound_benchmark

        return vggsound_benchmark(b["root"], **(b.get("kwargs") or {}))
    if name == "audioset":
        from stella_avalanche.benchmarks.audioset import audioset_benchmark

        return audioset_benchmark(b["root"], **(b.get("kwargs") or {}))
    raise ValueError(f"unknown benchmark {name!r}")


def _model_config(cfg: dict, features: Any):
    return model_config_for(cfg["model"]["preset"], features, **(cfg["model"].get("overrides") or {}))


def _resolve_init(cfg: dict, model_cfg: Any, device: torch.device, need_avm: bool) -> dict:
    """Paths of the stage-1 backbone and stage-2 AVM checkpoints ("auto" builds the synthetic ones)."""
    init = cfg.get("init", {})
    ckpt, avm_ckpt = init.get("checkpoint", "none"), init.get("avm_checkpoint", "none")
    out: dict[str, Optional[str]] = {"backbone": None, "avm": None}
    auto = ckpt == "auto" or (need_avm and avm_ckpt == "auto")
    if auto:
        if cfg["benchmark"]["name"] != "synthetic":
            raise ValueError("init 'auto' exists only for the synthetic benchmark; pass --init-checkpoint "
                             "and --avm-checkpoint for real data")
        from stella_avalanche.training.pretrain import InitSchedule, synthetic_initialisation

        built = synthetic_initialisation(model_cfg, preset=cfg["benchmark"].get("preset", "default"),
                                         seed=int(cfg["benchmark"].get("data_seed", 0)), device=device,
                                         schedule=InitSchedule.from_config(init.get("schedule")),
                                         progress=progress_enabled())
        if ckpt == "auto":
            out["backbone"] = str(built["backbone"])
        if avm_ckpt == "auto":
            out["avm"] = str(built["avm"])
    if ckpt not in ("auto", "none", None):
        out["backbone"] = ckpt
    if avm_ckpt not in ("auto", "none", None):
        out["avm"] = avm_ckpt
    return out


def _selection_diagnostics(cfg: dict, plugin_params: dict) -> Optional[Any]:
    """Selection diagnostics for a STELLA run on the synthetic benchmark (``diagnostics.enabled``,
    default on; ``diagnostics.per_class`` retrieval clips per class, default 5), else None."""
    dcfg = cfg.get("diagnostics") or {}
    if cfg["benchmark"]["name"] != "synthetic" or not dcfg.get("enabled", True):
        return None
    from stella_avalanche.evaluation.diagnostics import RunDiagnostics

    return RunDiagnostics(preset=cfg["benchmark"].get("preset", "default"),
                          data_seed=int(cfg["benchmark"].get("data_seed", 0)),
                          per_class=int(dcfg.get("per_class", 5)), plugin_params=plugin_params)


@dataclass
class _Run:
    """What :func:`_build` assembles for one run and the later steps use."""

    cfg: dict
    seed: int
    out_dir: Path
    ctx: Any                 #: ``distributed.init_from_env``'s context (rank, world size, device)
    spec: Any                #: the strategy's registry entry (``training/strategies.py``)
    bm: Any                  #: the benchmark (train / retrieval streams, task names)
    init: dict               #: stage-1 / stage-2 checkpoint paths
    avm: Any
    tracker: Any             #: the recall-matrix metric plugin
    diag: Any                #: selection diagnostics (STELLA on synthetic data) or None
    strategy: Any
    experiences: list        #: the stream's tasks, or their union for a joint (multitask) strategy
    ckpt_dir: Path
    t0: float

    @property
    def name(self) -> str:
        return self.cfg["strategy"]["name"]

    @property
    def keep_last(self) -> int:
        return int((self.cfg.get("checkpoint") or {}).get("keep_last", 3))


def run_experiment(cfg: dict, *, out_dir: str | Path, seed: int = 0, device: str = "auto",
                   progress: bool = True, resume: bool = False, verbose: bool = False) -> dict:
    """Train one strategy over a benchmark's stream, evaluate retrieval after every task, and write
    ``results.json`` (after every task, atomically), ``summary.md`` and the plots into ``out_dir``.

    Checkpoints go to ``out_dir/checkpoints`` every ``checkpoint.every_n_iterations`` iterations and
    after each task's evaluation; ``resume=True`` continues from the newest one (same results as
    an uninterrupted run on CPU with a fixed seed).

    The steps: :func:`_build` (benchmark, model and initialisation, evaluation, strategy), then
    :func:`_train_and_evaluate` (one task at a time, results and a checkpoint after each), then
    :func:`_write_outputs` (downstream suite, report).

    ``progress`` shows progress bars and one recall line per task on stdout; ``verbose`` prints every
    metric value instead (Avalanche's ``InteractiveLogger``). Files get everything either way.

    :returns: the results dict (layout: ``docs/contracts.md``, "results.json").
    """
    run = _build(copy.deepcopy(cfg), out_dir=Path(out_dir), seed=seed, device=device, progress=progress,
                 verbose=verbose)
    results = _train_and_evaluate(run, start=_resume_position(run) if resume else 0)
    return _write_outputs(run, results, progress=progress)


# --------------------------------------------------------------------------------------------- build
def _build(cfg: dict, *, out_dir: Path, seed: int, device: str, progress: bool, verbose: bool = False) -> _Run:
    """Process group and output folder, benchmark, model with its initialisation, evaluation and the
    strategy, in this order (the order fixes what the global RNG has drawn when the model is built)."""
    from stella_avalanche.distributed import init_from_env
    from stella_avalanche.training.strategies import get_spec

    ctx = init_from_env(device)  # torchrun: process group, device by LOCAL_RANK; else single process
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"results directory is not writable: {out_dir}")
    dev = ctx.device if ctx.enabled else resolve_device(device)
    threads = main_process_threads(cfg["train"].get("threads"), num_workers=int(cfg["train"].get("num_workers", 0)),
                                   processes=int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size)))
    if threads:
        torch.set_num_threads(threads)
    spec = get_spec(cfg["strategy"]["name"])
    t0 = time.perf_counter()
    bm = _build_benchmark(cfg)
    model_cfg = _model_config(cfg, getattr(bm, "features", None))
    init = _resolve_init(cfg, model_cfg, dev, spec.needs_avm)
    seed_everything(seed)
    model, avm = _build_model(model_cfg, init, need_avm=spec.needs_avm)
    if cfg["train"].get("compile"):
        # after the weights are loaded: compiling wraps each block's forward, not its parameters
        log.info("train.compile: compiled %d transformer blocks", model.compile_blocks())
    evaluator, tracker = _build_evaluation(cfg, bm, ctx, out_dir, progress, verbose=verbose)
    ckpt_dir = out_dir / "checkpoints" / (f"rank{ctx.rank}" if ctx.enabled else "")
    plugin_kwargs = _plugin_kwargs(cfg, spec)
    diag = _selection_diagnostics(cfg, plugin_kwargs) if spec.needs_avm and ctx.is_main else None
    strategy = _build_strategy(cfg, spec, model=model, avm=avm, plugin_kwargs=plugin_kwargs, ctx=ctx, dev=dev,
                               seed=seed, evaluator=evaluator, tracker=tracker, ckpt_dir=ckpt_dir)
    return _Run(cfg=cfg, seed=seed, out_dir=out_dir, ctx=ctx, spec=spec, bm=bm, init=init, avm=avm,
                tracker=tracker, diag=diag, strategy=strategy, experiences=_experiences(bm, spec),
                ckpt_dir=ckpt_dir, t0=t0)


def _build_model(model_cfg: Any, init: dict, *, need_avm: bool) -> tuple[Any, Any]:
    """The backbone with its stage-1 weights and, for STELLA, the AVM with its stage-2 weights."""
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.loading import load_backbone_weights
    from stella_avalanche.training.pretrain import load_avm_checkpoint

    model = CAVMAE(model_cfg)
    if init["backbone"]:
        load_backbone_weights(model, init["backbone"])
    avm = None
    if need_avm:
        avm = build_avm(model)
        if init["avm"]:
            load_avm_checkpoint(avm, init["avm"])
        else:
            log.warning("STELLA without a stage-2 AVM checkpoint: the AVM starts from random weights "
                        "(the paper always loads one; see docs/method.md, D6)")
    return model, avm


def _build_evaluation(cfg: dict, bm: Any, ctx: Any, out_dir: Path, progress: bool, *,
                      verbose: bool = False) -> tuple[Any, Any]:
    """The evaluation plugin (retrieval metrics, loggers on rank 0) and its recall-matrix tracker.

    On the terminal: progress bars and one recall line per task, or with ``verbose`` every metric value."""
    from avalanche.training.plugins import EvaluationPlugin

    from stella_avalanche.distributed import all_gather_cat
    from stella_avalanche.evaluation import metrics as M
    from stella_avalanche.evaluation.loggers import make_loggers

    ev = cfg.get("eval", {})
    metrics = M.retrieval_metrics(ks=tuple(ev.get("ks", (1, 5, 10))), gallery=ev.get("gallery", "pooled"),
                                  num_tasks=len(bm.task_names), gather_fn=all_gather_cat if ctx.enabled else None,
                                  gallery_pools=int(ev.get("gallery_pools", 1)))
    loggers = make_loggers(out_dir, interactive=progress and verbose, progress=progress and not verbose,
                           task_names=list(bm.task_names)) if ctx.is_main else None
    return EvaluationPlugin(*metrics, loggers=loggers), M.find_recall_matrix_plugin(metrics)


def _plugin_kwargs(cfg: dict, spec: Any) -> dict:
    """The strategy's own plugin arguments: the preset's ``strategy.params`` where the strategy has a
    plugin (finetune / multitask have none); STELLA's AVM gets the backbone's lr (one Adam in the paper)."""
    kwargs = dict(cfg["strategy"].get("params") or {}) if spec.takes_params else {}
    if spec.needs_avm and "lr" not in kwargs:
        kwargs["lr"] = float(cfg["train"]["lr"])
    return kwargs


def _build_strategy(cfg: dict, spec: Any, *, model: Any, avm: Any, plugin_kwargs: dict, ctx: Any, dev: Any,
                    seed: int, evaluator: Any, tracker: Any, ckpt_dir: Path) -> Any:
    """The optimizer (before DDP wrapping: parameter names), the checkpoint plugin and the named strategy.

    The rank goes to ``make_strategy``: each rank draws its own replay items (per-rank reservoirs, as
    the paper's 4 x 500); one checkpoint series per rank (resuming needs the same world size).
    """
    from stella_avalanche import checkpoint as C
    from stella_avalanche.distributed import wrap_ddp
    from stella_avalanche.training.strategies import make_strategy
    from stella_avalanche.training.template import make_adam

    tr, ck = cfg["train"], cfg.get("checkpoint", {}) or {}
    ckpt_plugin = C.CheckpointPlugin(directory=ckpt_dir, every_n_iterations=int(ck.get("every_n_iterations", 0)),
                                     keep_last=int(ck.get("keep_last", 3)),
                                     extra_state=lambda: {"tracker": tracker.state_dict()})
    optimizer = make_adam(model, lr=float(tr["lr"]), betas=tuple(tr["betas"]), weight_decay=float(tr["weight_decay"]))
    if ctx.enabled:
        model = wrap_ddp(model, ctx)  # no unused-parameter search: every parameter takes part
    return make_strategy(
        spec.name, model=model, avm=avm, plugin_kwargs=plugin_kwargs, rank=ctx.rank, world_size=ctx.world_size,
        plugins=[ckpt_plugin], optimizer=optimizer, train_mb_size=int(tr["batch_size"]),
        train_epochs=train_epochs(tr, spec), eval_mb_size=int(tr.get("eval_batch_size", 64)), device=dev,
        evaluator=evaluator, amp=tr.get("amp", "auto"), grad_clip=tr.get("grad_clip"), seed=seed,
        num_workers=int(tr.get("num_workers", 0)), loss_log_every=int(tr.get("loss_log_every", 25)))


def train_epochs(train_cfg: dict, spec: Any) -> int:
    """Epochs per experience: ``train.epochs``, or for the joint (multitask) strategy ``train.joint_epochs``
    when set. A replay step trains on the current batch and an equal replay batch, so at equal epochs a
    replay method sees twice the rows of the joint run; ``joint_epochs = 2 x epochs`` gives the upper bound
    the same rows (the synthetic preset does: docs/benchmarks.md §7)."""
    joint = train_cfg.get("joint_epochs")
    return int(joint) if spec.joint and joint is not None else int(train_cfg["epochs"])


# --------------------------------------------------------------------------------------------- train
def _experiences(bm: Any, spec: Any) -> list:
    """The training experiences: the stream's tasks, or their union for a joint (multitask) strategy."""
    if spec.joint:
        from stella_avalanche.benchmarks.common import multitask_experience

        return [multitask_experience(bm)]
    return list(bm.train_stream)


def _resume_position(run: _Run) -> int:
    """Restore the newest checkpoint of ``run`` (strategy, tracker, diagnostics); the experience to
    start from (0 when there is none)."""
    from stella_avalanche import checkpoint as C

    path = C.latest_checkpoint(run.ckpt_dir)
    if path is None:
        log.info("--resume: no checkpoint in %s, starting from the beginning", run.ckpt_dir)
        return 0
    state = C.load_checkpoint(path)
    run.tracker.load_state_dict(state["extra"]["tracker"])
    if run.diag is not None and "diagnostics" in state["extra"]:
        run.diag.load_state_dict(state["extra"]["diagnostics"])
    start = C.restore_strategy(run.strategy, state).experience
    log.info("resumed from %s at %s", path.name, state["position"])
    return start


def _train_and_evaluate(run: _Run, *, start: int) -> dict:
    """Train task by task from ``start``; after each: retrieval evaluation, diagnostics, results.json and
    a checkpoint. :returns: the last results (rewritten as complete when nothing was left to train)."""
    from stella_avalanche import checkpoint as C
    from stella_avalanche.evaluation.downstream import after_first_task, downstream_enabled

    experiences, strategy, diag = run.experiences, run.strategy, run.diag
    results = None
    if diag is not None and not diag.entries:  # the stage-1 backbone with the stage-2 AVM
        diag.measure(strategy.backbone, run.avm, "init")
    if start == 0 and run.tracker.matrix.initial is None:
        _evaluate_initialisation(run)
    for k in range(start, len(experiences)):
        strategy.train(experiences[k], eval_streams=[])
        strategy.eval(run.bm.retrieval_stream)
        if diag is not None:
            diag.measure(strategy.backbone, run.avm, "joint" if run.spec.joint else str(run.bm.task_names[k]))
        if k == 0 and run.ctx.is_main and downstream_enabled(run.cfg):  # the PCA picture of one task
            after_first_task(strategy.backbone, run.bm, run.cfg, run.out_dir)
        results = _write_results(run, done=k == len(experiences) - 1)
        extra = {"tracker": run.tracker.state_dict()}
        if diag is not None:
            extra["diagnostics"] = diag.state_dict()
        C.save_checkpoint(run.ckpt_dir, strategy, C.Position(experience=k + 1), extra=extra,
                          keep_last=run.keep_last)
    return results if results is not None else _write_results(run, done=True)


def _evaluate_initialisation(run: _Run) -> None:
    """The zero-shot row: retrieval of the initialisation before the first task (recorded by the tracker
    as ``recall_initial``, never part of 𝒜 or ℱ), so a reader sees how much the stream adds.

    The training that follows must not depend on whether this evaluation ran: the loaders carry their
    own generators, and ``fork_rng`` also restores the global RNG for any plugin whose evaluation hooks
    draw from it (``tests/test_zero_shot.py`` compares a run with and without it).
    """
    devices = [run.strategy.device] if torch.device(run.strategy.device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        run.strategy.eval(run.bm.retrieval_stream)


# --------------------------------------------------------------------------------------------- write
def _write_results(run: _Run, *, done: bool) -> dict:
    """The results dict so far (recall matrix, cost, init, diagnostics); rank 0 writes results.json."""
    from stella_avalanche.evaluation import report as R

    cost = run.strategy.cost()
    plugin = next((p for p in run.strategy.plugins if hasattr(p, "buffer_bytes_per_item")), None)
    cost["buffer_bytes"] = int(getattr(plugin, "buffer_bytes_per_item", 0) or 0)
    cost["wall_seconds"] = round(time.perf_counter() - run.t0, 3)
    res = R.build_results(strategy=run.name, benchmark=run.cfg["benchmark"]["name"], seed=run.seed,
                          tasks=list(run.bm.task_names), recall_matrix=run.tracker.matrix, config=run.cfg, cost=cost)
    res["complete"] = done
    # named by cache key / relative path: results.json is published and read on other machines
    res["init"] = {k: portable_path(v) for k, v in run.init.items()}
    if run.diag is not None:
        res["diagnostics"] = run.diag.entries
    res["world_size"] = run.ctx.world_size
    res["environment"] = run_environment(run.strategy.device)
    if run.ctx.is_main:  # only rank 0 writes results
        R.write_results_json(run.out_dir / "results.json", res)
    return res


def run_environment(device: torch.device | str) -> dict[str, Any]:
    """Where a run was trained: device, its name, torch build and Python version, threads, and the CPU's
    model and vector extensions. Runs of one comparison may come from different machines; their numbers
    then differ by more than rounding, and a bit-exact rerun needs the same thread count, torch build
    and kernel path (``cpu_capability``: the vector ISA torch dispatches its CPU kernels to)."""
    import platform

    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    env = {"device": str(dev), "device_name": name, "torch": torch.__version__,
           "torch_git": torch.version.git_version, "torch_cuda": torch.version.cuda,
           "python": platform.python_version(), "threads": torch.get_num_threads(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), **_cpu_info()}
    return env


#: the CPU flags that change which kernels (and so which rounding) torch and oneDNN use
_KERNEL_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16",
                 "amx_bf16", "amx_tile")


def _cpu_info() -> dict[str, Any]:
    """``cpu_model`` and the kernel-relevant ``cpu_flags`` from /proc/cpuinfo (empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in text.splitlines()[:64] if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    return {"cpu_model": fields.get("model name", ""), "cpu_flags": [f for f in _KERNEL_FLAGS if f in flags]}


def _write_outputs(run: _Run, results: dict, *, progress: bool) -> dict:
    """End of the stream: the downstream suite (frozen backbone) into results.json, then summary.md and
    the plots (rank 0); all ranks wait for each other before returning."""
    from stella_avalanche.evaluation import report as R
    from stella_avalanche.evaluation.downstream import at_end_of_stream, downstream_enabled

    if run.ctx.is_main and downstream_enabled(run.cfg):
        results["downstream"] = at_end_of_stream(run.strategy.backbone, run.bm, run.cfg, results, run.out_dir,
                                                 progress=progress)
        R.write_results_json(run.out_dir / "results.json", results)
    if run.ctx.is_main:
        R.write_report(results, run.out_dir)
    if run.ctx.enabled:
        import torch.distributed as dist

        dist.barrier()
    return results
