"""HostSyncAudit (stella_avalanche/perf/sync_audit.py) finds the calls that synchronise on CUDA."""
from __future__ import annotations

import torch

from stella_avalanche.perf.sync_audit import HostSyncAudit


def test_records_value_reads_shapes_and_blocking_copies() -> None:
    x = torch.ones(4)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam([p])
    p.grad = torch.ones(3)
    with HostSyncAudit() as audit:
        if x.any():  # Python branch on a tensor value
            pass
        float(x.sum())
        x.tolist()
        x.nonzero()
        _ = x[x > 0]
        x.to("cpu")  # blocking device copy
        x.to("cpu", non_blocking=True)  # not recorded
        x.to(torch.float16)  # dtype only: not recorded
        x.sum() * 2  # no host read: not recorded
        opt.step()  # Adam reads its host step counter through torch
    kinds = {(k, n) for k, n, _, _ in audit.summary()}
    assert ("value_read", "__bool__") in kinds and ("value_read", "__float__") in kinds
    assert ("value_read", "tolist") in kinds
    assert ("value_shape", "nonzero") in kinds and ("value_shape", "__getitem__[bool mask]") in kinds
    assert audit.counts()["device_copy"] == 1
    sites = [s for _, _, s, _ in audit.summary()]
    assert all(s.startswith(__file__) for s in sites), sites
    assert any("via torch/optim/" in s for s in sites)  # attributed to this file, made by torch


def test_keep_filters_callers_and_mode_is_removed() -> None:
    with HostSyncAudit(keep=("no_such_file",)) as audit:
        torch.ones(1).item()
    assert audit.events == []
    from torch.overrides import _get_current_function_mode_stack

    assert _get_current_function_mode_stack() == []
