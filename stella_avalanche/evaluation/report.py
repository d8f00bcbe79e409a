"""results.json (layout in ``docs/contracts.md``), the paper-style summary table and recall plots.

``results.json`` layout (documented keys; extra keys are additions, never replacements)::

    {"strategy", "benchmark", "seed", "tasks",
     "recall": {"a2v"|"v2a": {"R@1"|"R@5"|"R@10": L x T list of lists, percent}},
     "summary": {"a2v"|"v2a": {"R@K": {"A", "F"}, "Avg": {"A", "F"}}},
     "forgetting_definition": "standard"|"official", "config": {...},
     "cost": {"train_seconds", "samples_per_second", "peak_memory_bytes", "buffer_bytes"}}

``recall[dir][K][l][k]`` is R@K on task k's queries after training experience l. When the run kept
them, ``ranks`` holds the per-query strict ranks of every end-of-experience evaluation
(``{"gallery", "task": [N], "index": [N], "a2v"|"v2a": L x N[, "a2v_task_gallery"|"v2a_task_gallery":
L x N]}``, queries in (task, index) order), from which ``recall_task_gallery`` / ``summary_task_gallery``
(the per-task gallery beside the pooled one) are derived; :func:`recall_from_ranks` recomputes any
recall matrix from them. Lists of numbers are written on one line each (a compact file). ``F`` follows
``forgetting_definition``; every summary cell also carries ``F_standard`` and ``F_official``, and the
top-level ``forgetting_official`` repeats the official-code variant. A single-row matrix (the
multitask upper bound) has ``F = null``. Plots use matplotlib's Agg canvas directly (no pyplot state).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

import numpy as np

from stella_avalanche.evaluation.metrics import RecallMatrix, average_accuracy, forgetting
from stella_avalanche.evaluation.plotting import new_figure, save_png
from stella_avalanche.evaluation.retrieval import DIRECTIONS
from stella_avalanche.utils import atomic_write

__all__ = ["build_results", "validate_results", "write_results_json", "load_results", "summary_table_markdown",
           "plot_recall_matrix", "plot_task_curves", "write_report", "COST_KEYS", "recall_from_ranks",
           "dumps_compact", "diagnostics_markdown", "mean_std_over_seeds"]

COST_KEYS: tuple[str, ...] = ("train_seconds", "samples_per_second", "peak_memory_bytes", "buffer_bytes")
_TOP_KEYS = ("strategy", "benchmark", "seed", "tasks", "recall", "summary", "forgetting_definition", "config",
             "cost")
_DIR_TITLE = {"a2v": "A→V", "v2a": "V→A"}
_FORGETTING_NOTE = ("F follows forgetting_definition; F_standard = mean_{k<T} max_{k<=l<T}(a[l,k]-a[T,k]); "
                    "F_official = official-code variant (max over all rows l<T incl. before task k was "
                    "trained, sum over all k, divided by T-1). Recall in percent.")


def _to_jsonable(obj: Any, where: str = "results") -> Any:
    """Plain JSON types; paths/enums/other objects become strings, NaN/inf are rejected."""
    if isinstance(obj, Mapping):
        return {str(k): _to_jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (bool, str)) or obj is None:
        return obj
    if hasattr(obj, "tolist") and not isinstance(obj, (int, float)):  # numpy / torch
        return _to_jsonable(obj.tolist(), where)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        if not math.isfinite(float(obj)):
            raise ValueError(f"{where} is {obj}, which is not valid JSON")
        return float(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def _k_labels(block: Mapping[str, Any]) -> list[str]:
    return sorted((k for k in block if k.startswith("R@")), key=lambda s: int(s[2:]))


def _mean_or_none(values: Sequence[float | None]) -> float | None:
    return None if not values or any(v is None for v in values) else float(np.mean(values))


def recall_from_ranks(ranks: Sequence[Sequence[int]], tasks: Sequence[int], *, num_tasks: int,
                      ks: Sequence[int] = (1, 5, 10)) -> dict[str, list[list[float]]]:
    """Recall matrices from per-query ranks: ``{"R@K": L x T}`` in percent.

    :param ranks: L x N strict ranks (row l = after training experience l).
    :param tasks: (N,) task id of every query.
    :param num_tasks: T; a task without queries gets ``None``.
    :param ks: the K values.
    """
    r = np.asarray(ranks, dtype=np.int64)
    t = np.asarray(tasks, dtype=np.int64)
    if r.ndim != 2 or r.shape[1] != t.shape[0]:
        raise ValueError(f"ranks must be L x N with N = len(tasks) = {t.shape[0]}, got shape {r.shape}")
    onehot = (t[:, None] == np.arange(num_tasks)[None, :]).astype(np.float64)   # (N, T)
    counts = onehot.sum(axis=0)
    out = {}
    for k in ks:
        hits = (r <= int(k)).astype(np.float64) @ onehot                          # (L, T)
        rec = 100.0 * hits / np.maximum(counts, 1)[None, :]
        out[f"R@{k}"] = [[(float(v) if counts[j] else None) for j, v in enumerate(row)] for row in rec]
    return out


def _task_gallery_extras(ranks: Mapping[str, Any] | None, recall: Mapping[str, Any], num_tasks: int,
                         definition: Literal["standard", "official"]) -> dict[str, Any]:
    """``recall_task_gallery`` / ``summary_task_gallery``: the per-task gallery beside the pooled one,
    derived from a pooled matrix's ranks (not the paper's protocol); empty without them."""
    if ranks is None or ranks.get("gallery") != "pooled" or "a2v_task_gallery" not in ranks:
        return {}
    ks = [int(lab[2:]) for lab in _k_labels(recall[DIRECTIONS[0]])]
    tg = {d: recall_from_ranks(ranks[f"{d}_task_gallery"], ranks["task"], num_tasks=num_tasks, ks=ks)
          for d in DIRECTIONS}
    summary: dict[str, Any] = {}
    for d in DIRECTIONS:
        cells = {lab: {"A": average_accuracy(m), "F": forgetting(m, definition)} for lab, m in tg[d].items()}
        cells["Avg"] = {key: _mean_or_none([c[key] for c in cells.values()]) for key in ("A", "F")}
        summary[d] = cells
    return {"recall_task_gallery": tg, "summary_task_gallery": summary}


def build_results(*, strategy: str, benchmark: str, seed: int, tasks: Sequence[str],
                  recall_matrix: RecallMatrix | Mapping[str, Mapping[str, Sequence[Sequence[float]]]],
                  config: Mapping[str, Any] | None = None, cost: Mapping[str, Any] | None = None,
                  forgetting_definition: Literal["standard", "official"] = "standard") -> dict[str, Any]:
    """Assemble the results.json dictionary.

    :param strategy: strategy name (``stella``, ``er``, ...).
    :param benchmark: benchmark name.
    :param seed: run seed.
    :param tasks: task names in training order (T).
    :param recall_matrix: a :class:`RecallMatrix` or ``{dir: {"R@K": L x T}}`` in percent.
    :param config: the run configuration (made JSON-safe).
    :param cost: ``train_seconds``, ``samples_per_second``, ``peak_memory_bytes``, ``buffer_bytes``
        (missing ones are null; extra keys kept).
    :param forgetting_definition: which definition ``F`` reports.
    :return: the results dict (plain JSON types).
    """
    if forgetting_definition not in ("standard", "official"):
        raise ValueError(f"forgetting_definition must be 'standard' or 'official', got {forgetting_definition!r}")
    extras: dict[str, Any] = {}
    if isinstance(recall_matrix, RecallMatrix):
        recall = recall_matrix.as_lists()
        extras["gallery"] = recall_matrix.gallery
        if recall_matrix.initial is not None:
            extras["recall_initial"] = recall_matrix.initial
        gap = recall_matrix.modality_gap_lists()
        if gap is not None:
            extras["modality_gap"] = gap
        ranks = recall_matrix.ranks_lists()
        if ranks is not None:
            extras["ranks"] = ranks
    else:
        recall = {d: {k: [list(r) for r in m] for k, m in recall_matrix[d].items()} for d in recall_matrix}
    tasks = [str(t) for t in tasks]
    summary: dict[str, Any] = {}
    official: dict[str, Any] = {}
    for d in DIRECTIONS:
        if d not in recall:
            raise ValueError(f"recall matrix lacks direction {d!r}")
        labels = _k_labels(recall[d])
        if not labels:
            raise ValueError(f"recall[{d!r}] has no R@K entries")
        summary[d], official[d] = {}, {}
        for lab in labels:
            m = recall[d][lab]
            if any(len(r) != len(tasks) for r in m):
                raise ValueError(f"recall[{d!r}][{lab!r}] rows must have {len(tasks)} entries (one per task)")
            f_std, f_off = forgetting(m, "standard"), forgetting(m, "official")
            summary[d][lab] = {"A": average_accuracy(m), "F": f_std if forgetting_definition == "standard" else f_off,
                               "F_standard": f_std, "F_official": f_off}
            official[d][lab] = f_off
        cells = [summary[d][lab] for lab in labels]
        summary[d]["Avg"] = {key: _mean_or_none([c[key] for c in cells])
                             for key in ("A", "F", "F_standard", "F_official")}
        official[d]["Avg"] = summary[d]["Avg"]["F_official"]
    extras.update(_task_gallery_extras(extras.get("ranks"), recall, len(tasks), forgetting_definition))
    cost_out = {k: (cost or {}).get(k) for k in COST_KEYS}
    cost_out.update({k: v for k, v in (cost or {}).items() if k not in cost_out})
    results = {"strategy": str(strategy), "benchmark": str(benchmark), "seed": int(seed), "tasks": tasks,
               "recall": recall, "summary": summary, "forgetting_definition": forgetting_definition,
               "config": dict(config or {}), "cost": cost_out, "forgetting_official": official,
               "notes": _FORGETTING_NOTE, **extras}
    return _to_jsonable(results)


def validate_results(results: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the first missing / malformed documented field."""
    for key in _TOP_KEYS:
        if key not in results:
            raise ValueError(f"results: missing key {key!r}")
    t = len(results["tasks"])
    for d in DIRECTIONS:
        for lab in ("R@1", "R@5", "R@10"):
            m = results["recall"].get(d, {}).get(lab)
            if m is None:
                raise ValueError(f"results.recall.{d}.{lab} is missing")
            if not m or any(len(r) != t for r in m):
                raise ValueError(f"results.recall.{d}.{lab} must be L x {t} (one column per task)")
            cell = results["summary"].get(d, {}).get(lab)
            if not isinstance(cell, Mapping) or "A" not in cell or "F" not in cell:
                raise ValueError(f"results.summary.{d}.{lab} must have 'A' and 'F'")
        avg = results["summary"][d].get("Avg")
        if not isinstance(avg, Mapping) or "A" not in avg or "F" not in avg:
            raise ValueError(f"results.summary.{d}.Avg must have 'A' and 'F'")
    missing = [k for k in COST_KEYS if k not in results["cost"]]
    if missing:
        raise ValueError(f"results.cost lacks {missing}")
    ranks = results.get("ranks")
    if ranks is not None:
        rows = len(results["recall"][DIRECTIONS[0]]["R@1"])
        n = len(ranks.get("task", []))
        if len(ranks.get("index", [])) != n:
            raise ValueError("results.ranks.task and results.ranks.index must have the same length")
        for key in [d for d in DIRECTIONS] + [k for k in ranks if k.endswith("_task_gallery")]:
            m = ranks.get(key)
            if m is None or len(m) != rows or any(len(r) != n for r in m):
                raise ValueError(f"results.ranks.{key} must be {rows} x {n} (one rank per query per recall row)")


_NUMBER_LIST = re.compile(r"\[\n[0-9eE+\-.,\s]*\]")


def dumps_compact(data: Any) -> str:
    """``json.dumps(indent=2)`` with every list of plain numbers on one line.

    Only lists spanning several lines are rewritten; a JSON string never contains a raw newline, so
    string contents are never touched.
    """
    text = json.dumps(data, indent=2, allow_nan=False)
    return _NUMBER_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(0)[1:-1].split(",")) + "]", text)


def write_results_json(path: str | os.PathLike, results: Mapping[str, Any]) -> Path:
    """Validate and write ``results`` atomically (valid JSON at every moment). Returns the path."""
    validate_results(results)
    data = _to_jsonable(results)
    with atomic_write(path, "w") as fh:  # the temporary file is removed if anything below fails
        fh.write(dumps_compact(data))
    return Path(path)


def load_results(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a results.json."""
    with open(path, encoding="utf-8") as fh:
        results = json.load(fh)
    try:
        validate_results(results)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return results


# ------------------------------------------------------------------------------------------- table
def _fmt(mean: float | None, std: float | None, decimals: int) -> str:
    if mean is None:
        return "–"
    return f"{mean:.{decimals}f}" + (f"±{std:.{decimals}f}" if std is not None else "")


def mean_std_over_seeds(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """(mean, population std) of one number over seeds - the package's one rule for missing values.

    A seed without the value (``None``) is left out; both numbers are ``None`` when no seed has it, and
    the std is ``None`` for a single value (one seed has no spread). Population std, as the official
    aggregation.
    """
    present = [v for v in values if v is not None]
    if not present:
        return None, None
    arr = np.asarray(present, dtype=np.float64)
    return float(arr.mean()), (float(arr.std()) if len(arr) > 1 else None)


def summary_table_markdown(results: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, decimals: int = 2) -> str:
    """Markdown table in the paper's layout: one row per method, cells ``𝒜 / ℱ``.

    Several results of one strategy (seeds) are averaged; ``±`` gives the population std.

    :param results: one results dict or a list of them (e.g. strategies x seeds).
    :param decimals: digits after the decimal point.
    :return: the markdown text (a title line plus the table).
    """
    runs = [results] if isinstance(results, Mapping) else list(results)
    if not runs:
        raise ValueError("summary_table_markdown needs at least one results dict")
    labels = _k_labels(runs[0]["summary"][DIRECTIONS[0]]) + ["Avg"]
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for r in runs:
        groups.setdefault(str(r["strategy"]), []).append(r)
    header = ["method"] + [f"{_DIR_TITLE[d]} {lab}" for d in DIRECTIONS for lab in labels]
    lines = [f"Benchmark: {runs[0].get('benchmark', '?')}; cells 𝒜 / ℱ in % "
             f"(ℱ: {runs[0].get('forgetting_definition', 'standard')} definition)", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, group in groups.items():
        cells = [name if len(group) == 1 else f"{name} (n={len(group)})"]
        for d in DIRECTIONS:
            for lab in labels:
                a = mean_std_over_seeds([g["summary"][d][lab]["A"] for g in group])
                f = mean_std_over_seeds([g["summary"][d][lab]["F"] for g in group])
                cells.append(f"{_fmt(*a, decimals)} / {_fmt(*f, decimals)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- plots
def _metric_matrix(results: Mapping[str, Any], direction: str, metric: str) -> tuple[np.ndarray, str]:
    block = results["recall"][direction]
    if metric == "Avg":
        labs = _k_labels(block)
        m = np.mean([np.asarray(block[lab], dtype=np.float64) for lab in labs], axis=0)
        return m, "mean of " + "/".join(labs)
    if metric not in block:
        raise ValueError(f"metric must be 'Avg' or one of {_k_labels(block)}, got {metric!r}")
    return np.asarray(block[metric], dtype=np.float64), metric


def _plot_per_direction(results: Mapping[str, Any], out_dir: str | os.PathLike, metric: str, stem: str,
                        size: Callable[[int, int], tuple[float, float]],
                        draw: Callable[[Any, Any, np.ndarray, str, str, list], None]) -> list[Path]:
    """One PNG per retrieval direction, ``<out_dir>/<stem>_<dir>.png``: ``draw(fig, ax, matrix, direction,
    label, tasks)`` fills a one-axes figure of ``size(rows, cols)`` inches for the direction's matrix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tasks = list(results["tasks"])
    paths = []
    for d in DIRECTIONS:
        m, label = _metric_matrix(results, d, metric)
        fig = new_figure(*size(*m.shape))
        draw(fig, fig.add_subplot(1, 1, 1), m, d, label, tasks)
        fig.tight_layout()
        paths.append(save_png(fig, out / f"{stem}_{d}.png"))
    return paths


def plot_recall_matrix(results: Mapping[str, Any], out_dir: str | os.PathLike, *, metric: str = "Avg") -> list[Path]:
    """One annotated heatmap PNG per direction: rows = after training experience l, columns = task k.

    :param results: a results dict.
    :param out_dir: output directory (``recall_matrix_<dir>.png``).
    :param metric: "Avg" (mean over R@1/5/10) or one of "R@K".
    :return: the written paths.
    """
    def draw(fig: Any, ax: Any, m: np.ndarray, d: str, label: str, tasks: list) -> None:
        rows, cols = m.shape
        im = ax.imshow(m, cmap="viridis", aspect="auto", vmin=0.0, vmax=max(float(m.max()), 1e-6))
        mid = 0.5 * float(m.max())
        for i in range(rows):
            for j in range(cols):
                ax.text(j, i, f"{m[i, j]:.1f}", ha="center", va="center", fontsize=7,
                        color="black" if m[i, j] > mid else "white")
        ax.set_xticks(range(cols), [str(t) for t in tasks[:cols]], rotation=45, ha="right", fontsize=7)
        ax.set_yticks(range(rows), [f"after {tasks[i] if i < len(tasks) else i + 1}" for i in range(rows)],
                      fontsize=7)
        ax.set_xlabel("evaluated task k")
        ax.set_ylabel("training progress l")
        ax.set_title(f"{results.get('strategy', '')} {_DIR_TITLE[d]} recall (%)\n{label}", fontsize=9)
        fig.colorbar(im, ax=ax)

    return _plot_per_direction(results, out_dir, metric, "recall_matrix",
                               lambda rows, cols: (max(4.8, 2.0 + 0.75 * cols), max(3.2, 1.6 + 0.6 * rows)), draw)


def plot_task_curves(results: Mapping[str, Any], out_dir: str | os.PathLike, *, metric: str = "Avg") -> list[Path]:
    """One PNG per direction: each task's recall across training progress (one line per task).

    :param results: a results dict.
    :param out_dir: output directory (``task_curves_<dir>.png``).
    :param metric: "Avg" (mean over R@1/5/10) or one of "R@K".
    :return: the written paths.
    """
    def draw(fig: Any, ax: Any, m: np.ndarray, d: str, label: str, tasks: list) -> None:
        rows, cols = m.shape
        x = np.arange(1, rows + 1)
        for k in range(cols):
            ax.plot(x, m[:, k], marker="o", markersize=3, label=str(tasks[k]) if k < len(tasks) else str(k))
            if k < rows:  # mark the point where task k was trained
                ax.plot([k + 1], [m[k, k]], marker="*", markersize=9, color=ax.lines[-1].get_color())
        ax.set_xticks(x)
        ax.set_xlabel("after training experience")
        ax.set_ylabel(f"recall (%), {label}")
        ax.set_title(f"{results.get('strategy', '')} {_DIR_TITLE[d]} per-task recall (★ = just trained)", fontsize=9)
        ax.legend(fontsize=6, ncol=2)

    return _plot_per_direction(results, out_dir, metric, "task_curves", lambda rows, cols: (6.0, 3.8), draw)


def read_loss_series(metrics_jsonl: str | os.PathLike, *, prefix: str = "loss_iter") -> dict[str, list[tuple[int, float]]]:
    """The training-loss series a run logged (``<prefix>/<name>`` lines of ``metrics.jsonl``):
    ``{name: [(iteration, value), ...]}`` in file order; empty when there are none."""
    series: dict[str, list[tuple[int, float]]] = {}
    path = Path(metrics_jsonl)
    if not path.is_file():
        return series
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut by a killed run
            continue
        name = str(row.get("name", ""))
        if name.startswith(prefix + "/") and isinstance(row.get("value"), (int, float)):
            series.setdefault(name[len(prefix) + 1:], []).append((int(row.get("x", 0)), float(row["value"])))
    return series


def plot_loss_curves(metrics_jsonl: str | os.PathLike, out_dir: str | os.PathLike, *,
                     title: str = "") -> Optional[Path]:
    """``loss_curve.png``: the total training loss and each logged part against iterations (the
    ``loss_iter/*`` series, or the per-epoch ``loss_epoch/*`` means when the run logged no windows).

    :returns: the written path, or None when ``metrics_jsonl`` holds no loss.
    """
    series = read_loss_series(metrics_jsonl) or read_loss_series(metrics_jsonl, prefix="loss_epoch")
    if not series:
        return None
    fig = new_figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for name in sorted(series, key=lambda n: (n != "total", n)):
        xs, ys = zip(*series[name])
        ax.plot(xs, ys, label=name, linewidth=2.0 if name == "total" else 1.0,
                marker="o" if len(xs) < 3 else None, markersize=3)
    if all(v > 0 for pts in series.values() for _, v in pts):
        ax.set_yscale("log")  # the parts differ by orders of magnitude
    ax.set_xlabel("training iteration")
    ax.set_ylabel("loss (mean over the logging window)")
    ax.set_title(f"{title} training loss and its parts".strip(), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_png(fig, Path(out_dir) / "loss_curve.png")


#: diagnostics columns of summary.md (docs/diagnostics.md explains each)
_DIAG_COLUMNS = (("pair AUC same / other", ("init_pair_auc_same_class", "init_pair_auc_other_class")),
                 ("AVM acc / AUC", ("avm_accuracy", "avm_auc")),
                 ("video lift / recall cand. / sel.", ("video_object_lift", "video_object_recall_candidates",
                                                       "video_object_recall_selected")),
                 ("audio lift / recall kept", ("audio_sounding_lift", "audio_sounding_recall_kept")),
                 ("RCA C twin / unrelated", ("rca_twin_c", "rca_unrelated_c")))


def diagnostics_markdown(entries: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of the selection diagnostics measured before the stream and after each task."""
    head = "| after | " + " | ".join(name for name, _ in _DIAG_COLUMNS) + " |"
    lines = ["## Selection diagnostics (retrieval clips, generator ground truth)", "", head,
             "|" + "---|" * (len(_DIAG_COLUMNS) + 1)]
    for e in entries:
        cells = [" / ".join("-" if e.get(k) is None else f"{float(e[k]):.2f}" for k in keys) for _, keys in _DIAG_COLUMNS]
        mark = " (AVM at chance)" if e.get("avm_at_chance") else ""
        lines.append(f"| {e.get('after', '?')}{mark} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(results: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, Any]:
    """Write ``results.json``, ``summary.md`` and the plots (recall matrix, task curves and, from the run's
    ``metrics.jsonl``, the loss curve) into ``out_dir``; returns their paths."""
    out = Path(out_dir)
    paths: dict[str, Any] = {"results": write_results_json(out / "results.json", results)}
    with atomic_write(out / "summary.md", "w") as fh:
        fh.write(summary_table_markdown(results))
        if results.get("diagnostics"):
            fh.write("\n" + diagnostics_markdown(results["diagnostics"]))
    paths["summary"] = out / "summary.md"
    paths["recall_matrix"] = plot_recall_matrix(results, out)
    paths["task_curves"] = plot_task_curves(results, out)
    paths["loss_curve"] = plot_loss_curves(out / "metrics.jsonl", out, title=str(results.get("strategy", "")))
    return paths
