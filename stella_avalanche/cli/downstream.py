r"""Downstream evaluation of a trained backbone, frozen: linear probe, transfer retrieval, sounding-object
localisation and the modality gap (``docs/downstream.md``).

Examples::

    # a finished run: its config and final checkpoint; adds a 'downstream' block to its results.json
    stella-downstream --run runs/synthetic-finetune-seed0
    stella-downstream --run runs/ft --tasks probe,localise
    # a checkpoint on a benchmark (run checkpoint, stage-1 backbone, CAV-MAE weights); writes downstream.json
    stella-downstream --checkpoint stage1.pt --benchmark synthetic --model tiny --out runs/ds_init
    stella-downstream --checkpoint none --benchmark synthetic --model tiny --out runs/ds_random
    stella-downstream --checkpoint final.pt --benchmark vggsound --data-root /data --model base \
        downstream.msrvtt_json=/data/msrvtt_test.json downstream.avsbench_root=/data/AVSBench/Single-source

Trailing ``key=value`` items override the run / benchmark config (``downstream.*`` keys: see
``DownstreamConfig`` in ``stella_avalanche/evaluation/downstream.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", type=Path, help="a run directory (results.json + checkpoints/)")
    src.add_argument("--checkpoint", help="a checkpoint file, or 'none' for a randomly initialised backbone")
    p.add_argument("--benchmark", default="synthetic", choices=("synthetic", "vggsound", "audioset"),
                   help="benchmark of --checkpoint (a run uses its own)")
    p.add_argument("--data-root", default=None, help="data root of a real benchmark")
    p.add_argument("--config", default=None, help="config preset / YAML for --checkpoint (default: the benchmark's)")
    p.add_argument("--model", default=None, choices=("tiny", "base"), help="backbone size preset for --checkpoint")
    p.add_argument("--results", type=Path, default=None,
                   help="results.json whose modality_gap the gap task reads (--checkpoint only)")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory for --checkpoint (default: <checkpoint dir>/downstream)")
    p.add_argument("--tasks", default=None, help="comma-separated subset of probe,transfer,localise,gap")
    p.add_argument("--seed", type=int, default=0, help="torch seed of a random backbone (--checkpoint none)")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    return p.parse_intermixed_args(argv)


def _load_state(path: str) -> tuple[dict | None, str]:
    """A backbone state dict from a run checkpoint or a project backbone file; (None, kind) otherwise."""
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and obj.get("format") == 1 and "strategy" in obj:
        return obj["strategy"]["model"], "run checkpoint"
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict) and "pos_embed_v" in obj["model"]:
        return obj["model"], "backbone checkpoint"
    if isinstance(obj, dict) and "pos_embed_v" in obj:
        return obj, "state dict"
    return None, "external weights"


def latest_run_checkpoint(run: Path) -> Path:
    from stella_avalanche.checkpoint import latest_checkpoint

    for d in (run / "checkpoints", run / "checkpoints" / "rank0"):
        found = latest_checkpoint(d)
        if found is not None:
            return found
    raise FileNotFoundError(f"{run}: no checkpoint under checkpoints/ (or checkpoints/rank0/)")


def build_model(cfg: dict, ckpt: str, *, device: str = "auto", seed: int = 0) -> tuple[Any, Any]:
    """The benchmark of a resolved run config and its backbone loaded from ``ckpt`` (a run checkpoint, a
    backbone file, external weights, or "none" for a random backbone seeded with ``seed``), checked
    against the benchmark's input geometry and moved to ``device``."""
    import torch

    from stella_avalanche.evaluation import downstream as D
    from stella_avalanche.experiment import _build_benchmark
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.utils import resolve_device

    bm = _build_benchmark(cfg)
    bench_name = f"{bm.name} ({cfg['benchmark'].get('preset') or cfg['benchmark'].get('root')})"
    model_cfg = model_config_for(cfg["model"]["preset"], bm.features, **(cfg["model"].get("overrides") or {}))
    D.check_geometry(model_cfg, bm.features, model_name=f"{ckpt} (model preset {cfg['model']['preset']})",
                     benchmark_name=bench_name)
    torch.manual_seed(seed)
    model = CAVMAE(model_cfg)
    if ckpt != "none":
        state, kind = _load_state(ckpt)
        if state is not None:
            D.check_state_geometry(state, model_cfg, checkpoint=ckpt, benchmark_name=bench_name)
            missing, unexpected = model.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise SystemExit(f"{ckpt} ({kind}) does not match the {cfg['model']['preset']} backbone: "
                                 f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
        else:
            from stella_avalanche.models.loading import load_backbone_weights

            load_backbone_weights(model, ckpt)
        logging.info("loaded %s (%s)", ckpt, kind)
    return bm, model.to(resolve_device(device))


def _main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from stella_avalanche.config import load_config
    from stella_avalanche.evaluation import downstream as D
    from stella_avalanche.evaluation.report import write_results_json
    from stella_avalanche.utils import atomic_write_json, set_progress

    set_progress(not args.quiet)
    overrides = list(args.overrides)
    if args.tasks:
        overrides.append(f"downstream.tasks={args.tasks}")
    results: dict[str, Any] | None = None
    if args.run is not None:
        res_path = args.run / "results.json"
        if not res_path.is_file():
            raise SystemExit(f"{args.run}: no results.json")
        results = json.loads(res_path.read_text())
        from omegaconf import OmegaConf

        from stella_avalanche.config import field_override

        cfg = OmegaConf.create(results["config"])
        for item in overrides:
            key, value = field_override(item)
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        cfg = OmegaConf.to_container(cfg, resolve=True)
        ckpt = str(latest_run_checkpoint(args.run))
        out_dir = args.run
        if not results.get("complete"):
            logging.warning("%s: the run is not complete; evaluating its newest checkpoint %s", args.run, ckpt)
    else:
        pre = [f"benchmark.name={args.benchmark}"] if args.config is None else []
        if args.data_root:
            pre.append(f"benchmark.root={args.data_root}")
        if args.model:
            pre.append(f"model.preset={args.model}")
        cfg = load_config(args.config, benchmark=args.benchmark, overrides=pre + overrides)
        ckpt = args.checkpoint
        out_dir = args.out or (Path(ckpt).resolve().parent / "downstream" if ckpt != "none" else Path("runs/downstream"))
        if args.results is not None:
            results = json.loads(args.results.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)

    bm, model = build_model(cfg, ckpt, device=args.device, seed=args.seed)

    block = D.at_end_of_stream(model, bm, cfg, results or {}, out_dir, progress=not args.quiet)
    block["checkpoint"] = str(ckpt)
    if args.run is not None:
        results["downstream"] = block  # type: ignore[index]
        write_results_json(args.run / "results.json", results)  # type: ignore[arg-type]
        print(f"downstream block written into {args.run / 'results.json'}")
    else:
        atomic_write_json(out_dir / "downstream.json", block, indent=1)
        print(f"downstream results: {out_dir / 'downstream.json'}")
    print(D.summary_lines(block))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point (``stella-downstream``); returns the exit status (2 for a refused checkpoint)."""
    from stella_avalanche.evaluation.downstream import GeometryMismatchError

    try:
        return _main(argv)
    except GeometryMismatchError as e:  # a refused checkpoint: the message names both, no traceback needed
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
