"""𝒜 / ℱ on hand-made matrices, the RecallMatrix, and the PluginMetrics inside a real Avalanche loop."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from stella_avalanche.evaluation.metrics import (RecallMatrix, RecallMatrixPlugin, RetrievalEmbeddingStore,
                                                 average_accuracy, find_recall_matrix_plugin, forgetting,
                                                 retrieval_metrics)
from stella_avalanche.evaluation.loggers import JSONLLogger
from stella_avalanche.evaluation.retrieval import recall_report

# rows = after training task l (1..3), columns = task k (1..3)
M = [[50.0, 10.0, 5.0],
     [40.0, 60.0, 20.0],
     [30.0, 45.0, 70.0]]


def test_average_accuracy_is_mean_of_last_row() -> None:
    assert average_accuracy(M) == pytest.approx((30 + 45 + 70) / 3)


def test_forgetting_standard_by_hand() -> None:
    # k=1: max(50-30, 40-30) = 20; k=2: max(60-45) = 15 -> (20 + 15) / 2
    assert forgetting(M, "standard") == pytest.approx(17.5)


def test_forgetting_official_by_hand() -> None:
    # k=1: max(50-30, 40-30) = 20; k=2: max(10-45, 60-45) = 15; k=3: max(5-70, 20-70) = -50
    # sum over all k, divided by T-1 = 2
    assert forgetting(M, "official") == pytest.approx((20 + 15 - 50) / 2)


def test_official_uses_rows_before_the_task_was_trained() -> None:
    m = [row[:] for row in M]
    m[0][1] = 80.0   # task 2 measured before it was trained
    assert forgetting(m, "standard") == pytest.approx(17.5)               # unchanged
    assert forgetting(m, "official") == pytest.approx((20 + 35 - 50) / 2)  # k=2: max(80-45, 60-45) = 35


def test_forgetting_keeps_negative_sign_and_single_row_is_none() -> None:
    m = [[50.0, 0.0], [60.0, 10.0]]
    assert forgetting(m, "standard") == pytest.approx(-10.0)
    assert forgetting(m, "official") == pytest.approx(-20.0)            # (-10 + (0 - 10)) / 1
    assert forgetting([[5.0, 6.0, 7.0]]) is None
    assert average_accuracy([[5.0, 6.0, 7.0]]) == pytest.approx(6.0)


def test_forgetting_partial_run_and_errors() -> None:
    partial = [M[0], M[1]]             # 2 of 3 experiences trained: T := 2
    assert forgetting(partial, "standard") == pytest.approx(50 - 40)
    assert forgetting(partial, "official") == pytest.approx((50 - 40) + (10 - 60))
    with pytest.raises(ValueError, match="rows"):
        forgetting([[1.0], [2.0]])
    with pytest.raises(ValueError, match="missing"):
        forgetting([[1.0, None], [2.0, 3.0]])
    with pytest.raises(ValueError, match="definition"):
        forgetting(M, "bogus")


def _row(vals: list[float]) -> dict:
    return {d: {f"R@{k}": [v + k for v in vals] for k in (1, 5, 10)} for d in ("a2v", "v2a")}


def test_recall_matrix_rows_lists_and_state() -> None:
    rm = RecallMatrix(num_tasks=3)
    rm.set_row(1, _row(M[1]))
    with pytest.raises(ValueError, match=r"no row for training experience\(s\) \[0\]"):
        rm.as_lists()
    rm.set_row(0, _row(M[0]))
    rm.set_row(2, _row(M[2]))
    rm.set_initial(_row([0.0, 0.0, 0.0]))
    lists = rm.as_lists()
    assert lists["a2v"]["R@1"] == [[v + 1 for v in r] for r in M]
    assert lists["v2a"]["R@10"][2] == [40.0, 55.0, 80.0]
    s = rm.summary("standard")
    assert s["a2v"]["R@5"]["F"] == pytest.approx(17.5)
    assert s["a2v"]["R@5"]["A"] == pytest.approx((30 + 45 + 70) / 3 + 5)
    with pytest.raises(ValueError, match="expected 3"):
        rm.set_row(3, _row([1.0, 2.0]))
    clone = RecallMatrix()
    clone.load_state_dict(json.loads(json.dumps(rm.state_dict())))   # JSON-safe state
    assert clone.as_lists() == lists and clone.initial == rm.initial


def test_embedding_store_deduplicates_by_experience_and_index() -> None:
    st = RetrievalEmbeddingStore()
    z = torch.arange(12.0).reshape(6, 2)
    st.update(z_audio=z[:4], z_video=z[:4], task=torch.zeros(4), index=torch.tensor([0, 1, 2, 3]), exp=0)
    # a padding duplicate of index 1 (same experience) and index 1 of another experience
    st.update(z_audio=z[4:], z_video=z[4:], task=torch.tensor([0, 1]), index=torch.tensor([1, 1]), exp=1)
    st.update(z_audio=z[1:2], z_video=z[1:2], task=torch.zeros(1), index=torch.tensor([1]), exp=0)
    out = st.result()
    assert out["index"].tolist() == [0, 1, 2, 3, 1]
    assert out["exp"].tolist() == [0, 0, 0, 0, 1]
    assert torch.equal(out["z_audio"], z[:5])       # first occurrences, arrival order


# ------------------------------------------------------------------------ a real Avalanche eval loop
N_TASKS, PER_TASK, DIM = 3, 6, 8


class _Clips(Dataset):
    """Retrieval clips of one task: ``index`` restarts at 0 per task, ``uid`` is global."""

    def __init__(self, task: int) -> None:
        self.task = task

    def __len__(self) -> int:
        return PER_TASK

    def __getitem__(self, i: int) -> dict:
        return {"uid": self.task * PER_TASK + i, "index": i, "category": self.task, "x": torch.zeros(1)}


class _Table(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(N_TASKS * PER_TASK, DIM, generator=g))
        self.v = nn.Parameter(torch.randn(N_TASKS * PER_TASK, DIM, generator=g))


def _expected(a: torch.Tensor, v: torch.Tensor, gallery: str = "pooled") -> dict:
    tasks = torch.arange(N_TASKS * PER_TASK) // PER_TASK
    return recall_report(F.normalize(a, dim=1), F.normalize(v, dim=1), tasks, gallery=gallery, num_tasks=N_TASKS)


def _flat(row: dict) -> list[float]:
    return [x for d in ("a2v", "v2a") for k in (1, 5, 10) for x in row[d][f"R@{k}"]]


def _as_row(rep: dict) -> dict:
    return {d: {f"R@{k}": [rep[d][f"R@{k}"]["per_task"][t] for t in range(N_TASKS)] for k in (1, 5, 10)}
            for d in ("a2v", "v2a")}


@pytest.fixture(scope="module")
def avalanche_run(tmp_path_factory):
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset
    from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
    from avalanche.training.templates import SupervisedTemplate
    from torch.utils.data import default_collate

    torch.set_num_threads(1)

    class TableStrategy(SupervisedTemplate):
        mb_x = property(lambda self: self.mbatch)
        mb_y = property(lambda self: self.mbatch["category"])
        mb_task_id = property(lambda self: self.mbatch["category"])

        def _unpack_minibatch(self):
            self.mbatch = {k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self.mbatch.items()}

        def forward(self):
            uid = self.mbatch["uid"]
            za, zv = F.normalize(self.model.a[uid], dim=1), F.normalize(self.model.v[uid], dim=1)
            return {"z_audio": za, "z_video": zv, "loss": -(za * zv).sum(1).mean()}

        def criterion(self):
            return self.mb_output["loss"]

        def make_train_dataloader(self, num_workers=0, shuffle=True, pin_memory=None, persistent_workers=False,
                                  drop_last=False, **kwargs):
            self.dataloader = DataLoader(self.adapted_dataset, batch_size=self.train_mb_size, shuffle=False,
                                         collate_fn=self.adapted_dataset.collate_fn)

    class Snapshot(SupervisedPlugin):
        def __init__(self):
            super().__init__()
            self.tables = []

        def after_training_exp(self, strategy, **kw):
            self.tables.append((strategy.model.a.detach().clone(), strategy.model.v.detach().clone()))

    def dup_gather(tensors):          # two "ranks" that saw the same clips (padding duplicates)
        return {k: torch.cat([v, v.flip(0)]) for k, v in tensors.items()}

    wrap = lambda ds: AvalancheDataset([ds], collate_fn=default_collate)
    bm = benchmark_from_datasets(train=[wrap(_Clips(t)) for t in range(N_TASKS)],
                                 test=[wrap(_Clips(t)) for t in range(N_TASKS)],
                                 retrieval=[wrap(_Clips(t)) for t in range(N_TASKS)])
    out = tmp_path_factory.mktemp("run")
    metrics = retrieval_metrics() + [RecallMatrixPlugin(gallery="per_task", gather_fn=dup_gather)]
    evaluator = EvaluationPlugin(*metrics, loggers=[JSONLLogger(out / "metrics.jsonl")])
    model = _Table()
    initial = (model.a.detach().clone(), model.v.detach().clone())
    snap = Snapshot()
    strategy = TableStrategy(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=2.0),
                             criterion=nn.Identity(), train_mb_size=4, train_epochs=2, eval_mb_size=5,
                             device="cpu", plugins=[snap], evaluator=evaluator, eval_every=1)
    for exp in bm.train_stream:
        strategy.train(exp, eval_streams=[bm.retrieval_stream, bm.test_stream])
    final_metrics = evaluator.get_last_metrics()
    return {"strategy": strategy, "initial": initial, "snap": snap, "metrics": final_metrics,
            "jsonl": out / "metrics.jsonl", "evaluator": evaluator}


def test_matrix_rows_follow_training_progress(avalanche_run) -> None:
    plugin = find_recall_matrix_plugin(avalanche_run["strategy"])
    assert plugin.gallery == "pooled"
    rm = plugin.matrix
    assert len(rm) == N_TASKS and rm.num_tasks == N_TASKS
    # the initial eval (PeriodicEval.do_initial) is a diagnostic row, not row 0
    assert rm.initial == _as_row(_expected(*avalanche_run["initial"]))
    for l, (a, v) in enumerate(avalanche_run["snap"].tables):
        assert _flat(rm.rows[l]) == pytest.approx(_flat(_as_row(_expected(a, v)))), f"row {l}"
    # the eval after epoch 1 of each experience is an intermediate diagnostic
    assert [(e["exp"], e["epoch"]) for e in rm.intermediate] == [(0, 1), (1, 1), (2, 1)]
    # training changed the embeddings, so the rows are not all the same
    assert rm.rows[0] != rm.rows[2]


def test_per_task_gallery_with_gather_dedup(avalanche_run) -> None:
    plugins = [m for m in avalanche_run["evaluator"].metrics if isinstance(m, RecallMatrixPlugin)]
    per_task = next(p for p in plugins if p.gallery == "per_task")
    a, v = avalanche_run["snap"].tables[-1]
    assert _flat(per_task.matrix.rows[N_TASKS - 1]) == pytest.approx(_flat(_as_row(_expected(a, v, "per_task"))))
    # the duplicated "rank" was removed before scoring
    assert per_task.last_report["num_queries"] == N_TASKS * PER_TASK


def _same_recall(a: dict, b: dict) -> None:
    """Two ``{"R@K": L x T}`` recall blocks agree (up to float rounding)."""
    assert set(a) == set(b)
    for k in a:
        assert a[k] == pytest.approx(b[k]) if not isinstance(a[k][0], list) else \
            all(ra == pytest.approx(rb) for ra, rb in zip(a[k], b[k], strict=True)), k


def test_matrix_keeps_per_query_ranks_of_every_row(avalanche_run) -> None:
    from stella_avalanche.evaluation.report import recall_from_ranks
    from stella_avalanche.evaluation.retrieval import retrieval_ranks

    plugins = [m for m in avalanche_run["evaluator"].metrics if isinstance(m, RecallMatrixPlugin)]
    pooled = next(p for p in plugins if p.gallery == "pooled")
    per_task = next(p for p in plugins if p.gallery == "per_task")
    ranks = pooled.matrix.ranks_lists()
    assert ranks is not None and ranks["gallery"] == "pooled"
    # queries in (task, index) order; one row of N ranks per end-of-experience evaluation only
    assert ranks["task"] == sorted(ranks["task"]) and ranks["index"] == list(range(PER_TASK)) * N_TASKS
    assert len(ranks["a2v"]) == N_TASKS and all(len(r) == N_TASKS * PER_TASK for r in ranks["v2a"])
    for l, (a, v) in enumerate(avalanche_run["snap"].tables):
        exp = retrieval_ranks(a, v, task_ids=torch.arange(N_TASKS * PER_TASK) // PER_TASK)
        tg = retrieval_ranks(a, v, task_ids=torch.arange(N_TASKS * PER_TASK) // PER_TASK, per_task_gallery=True)
        assert ranks["a2v"][l] == exp.a2v.tolist() and ranks["v2a"][l] == exp.v2a.tolist()
        assert ranks["a2v_task_gallery"][l] == tg.a2v.tolist()
    # the ranks reproduce both matrices
    for d in ("a2v", "v2a"):
        rec = recall_from_ranks(ranks[d], ranks["task"], num_tasks=N_TASKS)
        _same_recall(rec, pooled.matrix.as_lists()[d])
        rec_tg = recall_from_ranks(ranks[f"{d}_task_gallery"], ranks["task"], num_tasks=N_TASKS)
        _same_recall(rec_tg, per_task.matrix.as_lists()[d])
    assert "a2v_task_gallery" not in per_task.matrix.ranks_lists()
    # the ranks survive the checkpoint state
    clone = RecallMatrix()
    clone.load_state_dict(pooled.matrix.state_dict())
    assert clone.ranks_lists() == ranks


def test_metric_names_and_values(avalanche_run) -> None:
    m = avalanche_run["metrics"]
    a, v = avalanche_run["snap"].tables[-1]
    pooled, own = _expected(a, v), _expected(a, v, "per_task")
    assert m["A2V_R@1_Pooled/eval_phase/retrieval_stream/Task002"] == pytest.approx(
        pooled["a2v"]["R@1"]["per_task"][2])
    assert m["V2A_R@10_Pooled/eval_phase/retrieval_stream"] == pytest.approx(pooled["v2a"]["R@10"]["overall"])
    assert m["A2V_MR_Pooled/eval_phase/retrieval_stream"] == pytest.approx(pooled["a2v"]["MR"]["overall"])
    # per-experience gallery = that experience's clips = the per-task gallery of that task
    assert m["A2V_R@5_Exp/eval_phase/retrieval_stream/Exp001"] == pytest.approx(own["a2v"]["R@5"]["per_task"][1])
    assert m["V2A_R@1_TaskGallery/eval_phase/retrieval_stream/Task000"] == pytest.approx(
        own["v2a"]["R@1"]["per_task"][0])
    gap = (F.normalize(a[12:18], dim=1) - F.normalize(v[12:18], dim=1)).mean(0).norm()
    assert m["ModalityGap/eval_phase/retrieval_stream/Task002"] == pytest.approx(float(gap), rel=1e-5)
    # the test stream was evaluated too, but retrieval metrics ignore it
    assert not any("test_stream" in k for k in m)
    lines = [json.loads(line) for line in avalanche_run["jsonl"].read_text().splitlines()]
    names = {rec["name"] for rec in lines}
    assert "A2V_R@1_Pooled/eval_phase/retrieval_stream/Task002" in names
    assert all(set(rec) == {"name", "value", "x"} for rec in lines)


def test_find_recall_matrix_plugin_errors() -> None:
    with pytest.raises(LookupError):
        find_recall_matrix_plugin([])


def test_jsonl_logger_and_make_loggers(tmp_path) -> None:
    import pickle

    from stella_avalanche.evaluation.loggers import make_loggers

    loggers = make_loggers(tmp_path, interactive=False)
    kinds = [type(lg).__name__ for lg in loggers]
    assert kinds == ["TextLogger", "TensorboardLogger", "JSONLLogger"]
    jl = loggers[-1]
    jl.log_single_metric("A2V_R@1_Pooled/eval_phase/retrieval_stream/Task000", torch.tensor(12.5), 7)
    jl.log_single_metric("image", torch.zeros(3, 4, 4), 7)             # not a scalar: skipped
    jl.log_single_metric("nan", float("nan"), 8)                        # NaN is not JSON: null
    clone = pickle.loads(pickle.dumps(jl))                              # file handle dropped and reopened
    clone.log_single_metric("after_resume", 3, 9)
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert recs == [{"name": "A2V_R@1_Pooled/eval_phase/retrieval_stream/Task000", "value": 12.5, "x": 7},
                    {"name": "nan", "value": None, "x": 8}, {"name": "after_resume", "value": 3, "x": 9}]
    assert (tmp_path / "log.txt").exists() and (tmp_path / "tb").is_dir()


def test_matrix_plugin_gallery_pools() -> None:
    """gallery_pools=P ranks each query within its sub-pool (clip index % P) and records P."""
    g = torch.Generator().manual_seed(5)
    n, pools = 36, 3
    za, zv = torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)
    task, index = torch.arange(n) // 12, torch.arange(n) % 12
    plugin = RecallMatrixPlugin(num_tasks=3, gallery_pools=pools)
    for t in range(3):  # one retrieval experience per task (the store keys clips by experience and index)
        m = task == t
        plugin._metric.update(z_audio=za[m], z_video=zv[m], task=task[m], index=index[m], exp=t)
    rep = plugin.result()
    sub = recall_report(za, zv, task, num_tasks=3, gallery_groups=index % pools, return_ranks=True)
    assert torch.equal(rep["ranks"]["a2v"], sub["ranks"]["a2v"])
    assert rep["a2v"]["R@1"]["per_task"] == sub["a2v"]["R@1"]["per_task"]
    within = recall_report(za, zv, task, num_tasks=3, gallery="per_task", gallery_groups=index % pools,
                           return_ranks=True)
    assert torch.equal(rep["ranks"]["v2a_task_gallery"], within["ranks"]["v2a"])
    plugin.matrix.set_row(0, plugin.matrix.row_from_report(rep), ranks=rep["ranks"])
    assert plugin.matrix.ranks_lists()["gallery_pools"] == pools
    with pytest.raises(ValueError, match="gallery_pools"):
        RecallMatrixPlugin(gallery_pools=0)
    uneven = RecallMatrixPlugin(num_tasks=3, gallery_pools=5)
    uneven._metric.update(z_audio=za[:12], z_video=zv[:12], task=task[:12], index=index[:12], exp=0)
    with pytest.warns(UserWarning, match="differ in size"):
        uneven.result()
