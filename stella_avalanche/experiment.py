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
from pathlib import Path
from typing import Any, Optional

import torch

from stella_avalanche.config import default_preset, load_config
from stella_avalanche.utils import atomic_write_json, progress_enabled, resolve_device, seed_everything

__all__ = ["load_config", "run_experiment", "model_config_for", "default_preset"]

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


def model_config_for(preset: str, features: Any = None, **overrides: Any):
    """A model size preset with the input geometry of the benchmark's preprocessing."""
    import dataclasses

    from stella_avalanche.models.cav import MODEL_PRESETS

    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    geometry = {}
    if features is not None:
        geometry = {"num_frames": features.num_frames, "img_size": features.frame_size,
                    "audio_length": features.target_length, "mel_bins": features.mel_bins}
    return dataclasses.replace(MODEL_PRESETS[preset], **{**geometry, **overrides})


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
        from stella_avalanche.training.pretrain import synthetic_initialisation

        built = synthetic_initialisation(model_cfg, preset=cfg["benchmark"].get("preset", "default"),
                                         seed=int(cfg["benchmark"].get("data_seed", 0)), device=device,
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


def run_experiment(cfg: dict, *, out_dir: str | Path, seed: int = 0, device: str = "auto",
                   progress: bool = True, resume: bool = False) -> dict:
    """Train one strategy over a benchmark's stream, evaluate retrieval after every task, and write
    ``results.json`` (after every task, atomically), ``summary.md`` and the plots into ``out_dir``.

    Checkpoints go to ``out_dir/checkpoints`` every ``checkpoint.every_n_iterations`` iterations and
    after each task's evaluation; ``resume=True`` continues from the newest one (same results as
    an uninterrupted run on CPU with a fixed seed).

    :returns: the results dict (layout: ``docs/contracts.md``, "results.json").
    """
    from stella_avalanche.evaluation import metrics as M
    from stella_avalanche.evaluation import report as R
    from stella_avalanche.evaluation.loggers import make_loggers
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.loading import load_backbone_weights
    from stella_avalanche.evaluation.downstream import after_first_task, at_end_of_stream, downstream_enabled
    from stella_avalanche.training.pretrain import load_avm_checkpoint
    from stella_avalanche.training.strategies import get_spec, make_strategy
    from stella_avalanche.training.template import make_adam
    from stella_avalanche import checkpoint as C
    from stella_avalanche.distributed import all_gather_cat, init_from_env, wrap_ddp
    from avalanche.training.plugins import EvaluationPlugin

    cfg = copy.deepcopy(cfg)
    out_dir = Path(out_dir)
    ctx = init_from_env(device)  # torchrun: process group, device by LOCAL_RANK; else single process
    out_dir.mkdir(parents=True, exist_ok=True)
    if not os.access(out_dir, os.W_OK):
        raise PermissionError(f"results directory is not writable: {out_dir}")
    dev = ctx.device if ctx.enabled else resolve_device(device)
    tr = cfg["train"]
    if tr.get("threads"):
        torch.set_num_threads(int(tr["threads"]))
    name = cfg["strategy"]["name"]
    spec = get_spec(name)
    t0 = time.perf_counter()

    bm = _build_benchmark(cfg)
    features = getattr(bm, "features", None)
    model_cfg = _model_config(cfg, features)
    need_avm = spec.needs_avm
    init = _resolve_init(cfg, model_cfg, dev, need_avm)

    seed_everything(seed)
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

    gallery = cfg.get("eval", {}).get("gallery", "pooled")
    ks = tuple(cfg.get("eval", {}).get("ks", (1, 5, 10)))
    metrics = M.retrieval_metrics(ks=ks, gallery=gallery, num_tasks=len(bm.task_names),
                                  gather_fn=all_gather_cat if ctx.enabled else None,
                                  gallery_pools=int(cfg.get("eval", {}).get("gallery_pools", 1)))
    tracker = M.find_recall_matrix_plugin(metrics)
    evaluator = EvaluationPlugin(*metrics, loggers=make_loggers(out_dir, interactive=progress and ctx.is_main)
                                 if ctx.is_main else None)
    ck = cfg.get("checkpoint", {}) or {}
    # one checkpoint series per rank: the replay buffers are per rank (resume needs the same world size)
    ckpt_dir = out_dir / "checkpoints" / (f"rank{ctx.rank}" if ctx.enabled else "")
    ckpt_plugin = C.CheckpointPlugin(directory=ckpt_dir, every_n_iterations=int(ck.get("every_n_iterations", 0)),
                                     keep_last=int(ck.get("keep_last", 3)),
                                     extra_state=lambda: {"tracker": tracker.state_dict()})
    # finetune / multitask have no plugin: the preset's replay parameters do not apply to them. The
    # rank goes to make_strategy: each rank draws its own replay items (per-rank reservoirs, as the
    # paper's 4 x 500)
    plugin_kwargs = dict(cfg["strategy"].get("params") or {}) if spec.takes_params else {}
    if need_avm and "lr" not in plugin_kwargs:  # the paper trains backbone and AVM with one Adam: same lr
        plugin_kwargs["lr"] = float(tr["lr"])
    diag = _selection_diagnostics(cfg, plugin_kwargs) if need_avm and ctx.is_main else None
    optimizer = make_adam(model, lr=float(tr["lr"]), betas=tuple(tr["betas"]),
                          weight_decay=float(tr["weight_decay"]))  # before DDP wrapping (parameter names)
    if ctx.enabled:
        model = wrap_ddp(model, ctx)  # no unused-parameter search: every parameter takes part
    strategy = make_strategy(
        name, model=model, avm=avm, plugin_kwargs=plugin_kwargs, rank=ctx.rank, world_size=ctx.world_size,
        plugins=[ckpt_plugin],
        optimizer=optimizer,
        train_mb_size=int(tr["batch_size"]), train_epochs=int(tr["epochs"]),
        eval_mb_size=int(tr.get("eval_batch_size", 64)), device=dev, evaluator=evaluator,
        amp=tr.get("amp", "auto"), grad_clip=tr.get("grad_clip"), seed=seed,
        num_workers=int(tr.get("num_workers", 0)))

    results_path = out_dir / "results.json"

    def write(done: bool) -> dict:
        cost = strategy.cost()
        plugin = next((p for p in strategy.plugins if hasattr(p, "buffer_bytes_per_item")), None)
        cost["buffer_bytes"] = int(getattr(plugin, "buffer_bytes_per_item", 0) or 0)
        cost["wall_seconds"] = round(time.perf_counter() - t0, 3)
        res = R.build_results(strategy=name, benchmark=cfg["benchmark"]["name"], seed=seed,
                              tasks=list(bm.task_names), recall_matrix=tracker.matrix,
                              config=cfg, cost=cost)
        res["complete"] = done
        res["init"] = init
        if diag is not None:
            res["diagnostics"] = diag.entries
        res["world_size"] = ctx.world_size
        if ctx.is_main:  # only rank 0 writes results
            R.write_results_json(results_path, res)
        return res

    if spec.joint:
        from stella_avalanche.benchmarks.common import multitask_experience

        experiences = [multitask_experience(bm)]
    else:
        experiences = list(bm.train_stream)
    start = 0
    if resume:
        path = C.latest_checkpoint(ckpt_dir)
        if path is None:
            log.info("--resume: no checkpoint in %s, starting from the beginning", ckpt_dir)
        else:
            state = C.load_checkpoint(path)
            tracker.load_state_dict(state["extra"]["tracker"])
            if diag is not None and "diagnostics" in state["extra"]:
                diag.load_state_dict(state["extra"]["diagnostics"])
            start = C.restore_strategy(strategy, state).experience
            log.info("resumed from %s at %s", path.name, state["position"])
    results = None
    if diag is not None and not diag.entries:  # the stage-1 backbone with the stage-2 AVM
        diag.measure(strategy.backbone, avm, "init")
    for k in range(start, len(experiences)):
        strategy.train(experiences[k], eval_streams=[])
        strategy.eval(bm.retrieval_stream)
        if diag is not None:
            diag.measure(strategy.backbone, avm, str(bm.task_names[k]) if not spec.joint else "joint")
        # --- downstream suite (issue 12): one task's embeddings after the first task (PCA picture) ---
        if k == 0 and ctx.is_main and downstream_enabled(cfg):
            after_first_task(strategy.backbone, bm, cfg, out_dir)
        # --- end downstream ---
        results = write(done=k == len(experiences) - 1)
        extra = {"tracker": tracker.state_dict()}
        if diag is not None:
            extra["diagnostics"] = diag.state_dict()
        C.save_checkpoint(ckpt_dir, strategy, C.Position(experience=k + 1),
                          extra=extra, keep_last=int(ck.get("keep_last", 3)))
    if results is None:  # resumed after the last experience: nothing left to train
        results = write(done=True)
    # --- downstream suite (issue 12): frozen-backbone probe / transfer / localisation / gap at the end ---
    if ctx.is_main and downstream_enabled(cfg):
        results["downstream"] = at_end_of_stream(strategy.backbone, bm, cfg, results, out_dir, progress=progress)
        R.write_results_json(results_path, results)
    # --- end downstream ---
    if ctx.is_main:
        R.write_report(results, out_dir)
    if ctx.enabled:
        import torch.distributed as dist

        dist.barrier()
    return results
