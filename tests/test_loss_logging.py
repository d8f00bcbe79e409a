"""The training loss and its parts are logged: per epoch and every N iterations, to metrics.jsonl
(and through the same loggers to TensorBoard), with a loss-curve picture in the run's folder.

Each strategy trains two tiny experiences (8 clips each, batch 4, one epoch); a term that stops
being logged (the model's MAE / InfoNCE parts, DER++'s logit penalty, STELLA's matching loss and
penalty, CLS-ER's and ESMER's consistency terms) fails its case here.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _noise_clips import NoiseClips
from avalanche.training.plugins import EvaluationPlugin

torch.set_num_threads(1)

from stella_avalanche.evaluation.loggers import JSONLLogger  # noqa: E402
from stella_avalanche.evaluation.report import plot_loss_curves, read_loss_series  # noqa: E402
from stella_avalanche.models.avm import AVMatching  # noqa: E402
from stella_avalanche.models.cav import build_model  # noqa: E402
from stella_avalanche.training.plugins import CLSERPlugin, DERPPPlugin, ESMERPlugin  # noqa: E402
from stella_avalanche.training.plugins.stella import STELLAPlugin  # noqa: E402
from stella_avalanche.training.template import AudioVideoPretraining, make_adam  # noqa: E402

N, CLIPS = 4, 8
MODEL_PARTS = {"total", "mae_audio", "mae_video", "nce"}


def _Clips(cfg, task: int) -> NoiseClips:
    return NoiseClips(cfg, task, clips=CLIPS, seed_base=70)


@pytest.fixture(scope="module")
def stream():
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset

    cfg = build_model("tiny").config
    wrap = lambda d: AvalancheDataset([d], collate_fn=torch.utils.data.default_collate)  # noqa: E731
    return benchmark_from_datasets(train=[wrap(_Clips(cfg, t)) for t in range(2)]).train_stream


def _plugin(name: str, model):
    if name == "derpp":
        return DERPPPlugin(mem_size=8)
    if name == "stella":
        return STELLAPlugin(avm=AVMatching.from_config(model.config), mem_size=8)
    if name == "clser":
        return CLSERPlugin(mem_size=8)
    if name == "esmer":
        return ESMERPlugin(mem_size=8)
    return None


#: the plugin terms each strategy must log (besides the model's parts and the total)
PLUGIN_TERMS = {"finetune": set(), "derpp": {"der_penalty"}, "stella": {"stella_matching", "stella_penalty"},
                "clser": {"clser_consistency"}, "esmer": {"esmer_weighted", "esmer_consistency"}}


@pytest.mark.parametrize("name", sorted(PLUGIN_TERMS))
def test_every_loss_part_is_logged(stream, tmp_path: Path, name: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    plugin = _plugin(name, model)
    jsonl = tmp_path / "metrics.jsonl"
    strategy = AudioVideoPretraining(model=model, optimizer=make_adam(model, lr=1e-3), train_mb_size=N,
                                     train_epochs=1, eval_mb_size=N, device="cpu",
                                     plugins=[plugin] if plugin is not None else [],
                                     evaluator=EvaluationPlugin(loggers=[JSONLLogger(jsonl)]), loss_log_every=1)
    for exp in stream:
        strategy.train(exp)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    names = {r["name"] for r in rows}
    expected = MODEL_PARTS | PLUGIN_TERMS[name]
    # the replay terms start with the second experience (the buffer is empty during the first)
    assert {f"loss_epoch/{t}" for t in expected} <= names, sorted(names)
    assert {f"loss_iter/{t}" for t in expected} <= names, sorted(names)
    # per-epoch means are kept on the strategy too, one entry per epoch, with the same parts
    assert len(strategy.loss_epochs) == 2 and MODEL_PARTS <= set(strategy.loss_epochs[-1])
    # every iteration logs once (loss_log_every=1) at its iteration count; the total is what was optimised
    totals = [r for r in rows if r["name"] == "loss_iter/total"]
    assert [r["x"] for r in totals] == list(range(1, 2 * CLIPS // N + 1))
    assert all(r["value"] > 0 for r in totals)
    if name == "finetune":  # without plugins the total is the model's own loss
        last = strategy.loss_epochs[-1]
        assert last["total"] == pytest.approx(last["mae_audio"] + last["mae_video"] + last["nce"], rel=1e-5)
    png = plot_loss_curves(jsonl, tmp_path, title=name)
    assert png is not None and png.stat().st_size > 1000
    assert set(read_loss_series(jsonl)) == expected


def test_window_means_every_n_iterations(stream, tmp_path: Path) -> None:
    """``loss_log_every=3`` over 4 iterations: one window mean (of iterations 1-3) at x=3."""
    torch.manual_seed(0)
    model = build_model("tiny")
    jsonl = tmp_path / "metrics.jsonl"
    strategy = AudioVideoPretraining(model=model, train_mb_size=N, train_epochs=1, device="cpu",
                                     evaluator=EvaluationPlugin(loggers=[JSONLLogger(jsonl)]), loss_log_every=3)
    for exp in stream:
        strategy.train(exp)
    series = read_loss_series(jsonl)
    assert [x for x, _ in series["total"]] == [3]
    assert [x for x, _ in read_loss_series(jsonl, prefix="loss_epoch")["total"]] == [2, 4]


def test_no_loss_no_picture(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"name": "A2V_R@1", "value": 1.0, "x": 0}) + "\n")
    assert plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path) is None
