"""InfoNCE with negatives gathered over ranks (docs/method.md §1.5, D16), on 2 CPU processes (gloo).

Each rank holds half of one fixed batch. Checked against references computed here by hand from the
full batch:

- forward: rank r's loss = rows of rank r scored against *all* columns, positive at ``r*B + n``;
  the mean over ranks is the plain full-batch loss;
- backward: only the local column slice carries gradient, so rank r's gradient is rows r of the
  gradient of ``sum_s L_s`` where L_s holds the columns of the other ranks constant; after DDP's
  averaging the parameter gradient equals that of ``mean_s L_s`` (stop-gradient on foreign
  columns) in one process. It is *not* the gradient of the full-batch loss (that would need an
  autograd all_gather), which the test also pins down;
- ``gather=False`` / ``gather_negatives=False`` keep the loss per rank; unequal per-rank batches
  raise the same clear error on every rank instead of hanging;
- in a single process the result is bit-identical to the plain B x B loss.

One spawn (module fixture) serves all checks; it takes a few seconds, mostly importing torch twice.
"""
from __future__ import annotations

import os
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from stella_avalanche.models.cav import CAVMAE, build_model
from stella_avalanche.models.contrastive import info_nce

WORLD = 2
B = 4          # rows per rank
DIM = 8        # embedding width
IN = 6         # input width of the toy encoder used for the DDP check
TAU = 0.1
WEIGHT = 0.5


def _full_batch() -> tuple[Tensor, Tensor, Tensor]:
    """Fixed (W*B, D) audio / video embeddings and (W*B, IN) encoder inputs, identical in every process."""
    g = torch.Generator().manual_seed(1234)
    z_a = torch.randn(WORLD * B, DIM, generator=g, dtype=torch.float64).float()
    z_v = (0.7 * z_a + torch.randn(WORLD * B, DIM, generator=g)).float()  # correlated pairs
    x = torch.randn(WORLD * B, IN, generator=g)
    return z_a, z_v, x


class _ToyEncoder(nn.Module):
    """Two linear heads: x (N, IN) -> (z_a, z_v) each (N, DIM); fixed init for every process."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.audio = nn.Linear(IN, DIM)
        self.video = nn.Linear(IN, DIM)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.audio(x), self.video(x)


def _rows(rank: int) -> slice:
    return slice(rank * B, (rank + 1) * B)


def _tiny_inputs(model: CAVMAE, rank: int) -> tuple[Tensor, Tensor]:
    cfg = model.config
    g = torch.Generator().manual_seed(100 + rank)  # different clips on each rank
    video = torch.randn(2, cfg.num_frames, 3, cfg.img_size, cfg.img_size, generator=g)
    audio = torch.randn(2, 1, cfg.audio_length, cfg.mel_bins, generator=g)
    return video, audio


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    res: dict[str, Any] = {}
    try:
        z_a, z_v, x = _full_batch()
        rows = _rows(rank)

        # gathered loss and the gradient it leaves on the local embeddings
        la, lv = z_a[rows].clone().requires_grad_(True), z_v[rows].clone().requires_grad_(True)
        loss, per = info_nce(la, lv, temperature=TAU, weight=WEIGHT, gather=True)
        loss.backward()
        res.update(loss=loss.detach(), per=per.detach(), grad_a=la.grad, grad_v=lv.grad)

        # per-rank loss when gathering is switched off
        res["loss_local"] = info_nce(z_a[rows], z_v[rows], temperature=TAU, weight=WEIGHT, gather=False)[0]

        # end to end under DDP: parameter gradients after DDP's all-reduce average
        ddp = nn.parallel.DistributedDataParallel(_ToyEncoder())
        ea, ev = ddp(x[rows])
        info_nce(ea, ev, temperature=TAU, weight=WEIGHT, gather=True)[0].backward()
        res["ddp_grads"] = {n: p.grad.clone() for n, p in ddp.module.named_parameters()}

        # the backbone honours config.gather_negatives and the per-call override
        torch.manual_seed(0)
        model = build_model("tiny").eval()
        video, audio = _tiny_inputs(model, rank)
        with torch.no_grad():
            out = model(video, audio, generator=torch.Generator().manual_seed(5))
            off = model(video, audio, generator=torch.Generator().manual_seed(5), gather_negatives=False)
        res.update(tiny_loss_nce=out["loss_nce"], tiny_nce_off=off["loss_nce"],
                   tiny_z_audio=out["z_audio"], tiny_z_video=out["z_video"])

        # unequal per-rank batches: every rank must raise (and none may hang in a later collective)
        n = B if rank == 0 else B - 1
        try:
            info_nce(z_a[:n], z_v[:n], temperature=TAU, weight=WEIGHT, gather=True)
            res["uneven_error"] = None
        except ValueError as e:
            res["uneven_error"] = str(e)
        dist.barrier()  # proves the process group still works after the error
    except Exception:  # pragma: no cover - surfaced by the parent test
        res["crash"] = traceback.format_exc()
    finally:
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(WORLD, str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    out = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for r, res in enumerate(out):
        assert "crash" not in res, f"rank {r} crashed:\n{res['crash']}"
    return out


# ---------------------------------------------------------------------------------------------
# hand-written references (log_softmax + explicit positive index, not the code under test)
# ---------------------------------------------------------------------------------------------
def _rank_loss_ref(z_a: Tensor, z_v: Tensor, rank: int, *, stop_foreign: bool) -> tuple[Tensor, Tensor]:
    """Loss of rank ``rank``'s rows against all W*B columns; foreign columns detached if asked."""
    a, v = F.normalize(z_a, dim=-1), F.normalize(z_v, dim=-1)
    if stop_foreign:
        keep = torch.zeros(a.shape[0], 1, dtype=torch.bool)
        keep[_rows(rank)] = True
        a_cols, v_cols = torch.where(keep, a, a.detach()), torch.where(keep, v, v.detach())
    else:
        a_cols, v_cols = a, v
    rows = _rows(rank)
    pos = torch.arange(rank * B, (rank + 1) * B)
    lsm_va = torch.log_softmax(v[rows] @ a_cols.t() / TAU, dim=1)
    lsm_av = torch.log_softmax(a[rows] @ v_cols.t() / TAU, dim=1)
    n = torch.arange(B)
    per = -WEIGHT * 0.5 * (lsm_va[n, pos] + lsm_av[n, pos])
    return per.mean(), per


def _mean_over_ranks(z_a: Tensor, z_v: Tensor, *, stop_foreign: bool) -> Tensor:
    return torch.stack([_rank_loss_ref(z_a, z_v, r, stop_foreign=stop_foreign)[0] for r in range(WORLD)]).mean()


# ---------------------------------------------------------------------------------------------
# tests
# ---------------------------------------------------------------------------------------------
def test_rank_loss_uses_all_columns_with_offset_positive(ranks: list[dict[str, Any]]) -> None:
    z_a, z_v, _ = _full_batch()
    for r, res in enumerate(ranks):
        ref_loss, ref_per = _rank_loss_ref(z_a, z_v, r, stop_foreign=False)
        torch.testing.assert_close(res["loss"], ref_loss)
        torch.testing.assert_close(res["per"], ref_per)
        # the gathered negatives really change the loss compared with local columns only
        assert not torch.allclose(res["loss"], res["loss_local"])
    # equal batch sizes: the mean of the rank losses is the plain full-batch loss
    full, _ = info_nce(z_a, z_v, temperature=TAU, weight=WEIGHT)
    torch.testing.assert_close(torch.stack([res["loss"] for res in ranks]).mean(), full)


def test_gather_off_keeps_loss_per_rank(ranks: list[dict[str, Any]]) -> None:
    z_a, z_v, _ = _full_batch()
    for r, res in enumerate(ranks):
        rows = _rows(r)
        a, v = F.normalize(z_a[rows], dim=-1), F.normalize(z_v[rows], dim=-1)
        lsm = torch.log_softmax(v @ a.t() / TAU, dim=1), torch.log_softmax(a @ v.t() / TAU, dim=1)
        ref = -WEIGHT * 0.5 * (lsm[0].diagonal() + lsm[1].diagonal()).mean()
        torch.testing.assert_close(res["loss_local"], ref)


def test_local_gradient_is_own_loss_with_foreign_columns_constant(ranks: list[dict[str, Any]]) -> None:
    z_a, z_v, _ = _full_batch()
    za, zv = z_a.clone().requires_grad_(True), z_v.clone().requires_grad_(True)
    # rank r's local gradient = rows r of d(sum_s L_s)/dz = W * rows r of d(mean_s L_s)/dz
    (WORLD * _mean_over_ranks(za, zv, stop_foreign=True)).backward()
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["grad_a"], za.grad[_rows(r)])
        torch.testing.assert_close(res["grad_v"], zv.grad[_rows(r)])
    # the spec's rule ("only the local slice keeps its gradient") is not the full-batch gradient:
    # foreign ranks' losses do not push on this rank's embeddings as negatives
    fa, fv = z_a.clone().requires_grad_(True), z_v.clone().requires_grad_(True)
    (WORLD * _mean_over_ranks(fa, fv, stop_foreign=False)).backward()
    assert not torch.allclose(ranks[0]["grad_a"], fa.grad[_rows(0)], atol=1e-4)


def test_ddp_parameter_gradient_equals_single_process_mean_over_ranks(ranks: list[dict[str, Any]]) -> None:
    _, _, x = _full_batch()
    enc = _ToyEncoder()
    ea, ev = enc(x)
    _mean_over_ranks(ea, ev, stop_foreign=True).backward()
    for r, res in enumerate(ranks):
        for name, p in enc.named_parameters():
            torch.testing.assert_close(res["ddp_grads"][name], p.grad, msg=f"rank {r} param {name}")


def test_backbone_follows_config_flag(ranks: list[dict[str, Any]]) -> None:
    cfg = build_model("tiny").config
    assert cfg.gather_negatives is True
    z_a = torch.cat([res["tiny_z_audio"] for res in ranks])
    z_v = torch.cat([res["tiny_z_video"] for res in ranks])
    b = ranks[0]["tiny_z_audio"].shape[0]
    a, v = F.normalize(z_a, dim=-1), F.normalize(z_v, dim=-1)
    for r, res in enumerate(ranks):
        rows, pos = slice(r * b, (r + 1) * b), torch.arange(r * b, (r + 1) * b)
        lsm_va = torch.log_softmax(v[rows] @ a.t() / cfg.temperature, dim=1)
        lsm_av = torch.log_softmax(a[rows] @ v.t() / cfg.temperature, dim=1)
        n = torch.arange(b)
        ref = -cfg.contrastive_weight * 0.5 * (lsm_va[n, pos] + lsm_av[n, pos]).mean()
        torch.testing.assert_close(res["tiny_loss_nce"], ref)
        local = info_nce(z_a[rows], z_v[rows], temperature=cfg.temperature, weight=cfg.contrastive_weight,
                         gather=False)[0]
        torch.testing.assert_close(res["tiny_nce_off"], local)


def test_unequal_rank_batches_raise_on_every_rank(ranks: list[dict[str, Any]]) -> None:
    for r, res in enumerate(ranks):
        msg = res["uneven_error"]
        assert msg is not None, f"rank {r} did not raise on unequal batch sizes"
        assert "same batch size" in msg and f"[{B}, {B - 1}]" in msg and "gather_negatives=False" in msg


def test_single_process_is_bit_identical_to_plain_loss() -> None:
    z_a, z_v, _ = _full_batch()
    assert not dist.is_initialized()
    a, v = F.normalize(z_a, dim=-1), F.normalize(z_v, dim=-1)
    logits = v @ a.t() / TAU
    t = torch.arange(z_a.shape[0])
    per = WEIGHT * (0.5 * (F.cross_entropy(logits, t, reduction="none")
                           + F.cross_entropy(logits.t(), t, reduction="none")))
    for gather in (True, False):
        loss, got = info_nce(z_a, z_v, temperature=TAU, weight=WEIGHT, gather=gather)
        assert torch.equal(got, per) and torch.equal(loss, per.mean())
    with pytest.raises(ValueError, match=r"\(B, D\)"):
        info_nce(z_a, z_v[:3], temperature=TAU)
