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
    # the site is named relative to the repository (published GPU files carry no machine paths)
    assert all(s.startswith("tests/test_sync_audit.py:") for s in sites), sites
    assert any("via torch/optim/" in s for s in sites)  # attributed to this file, made by torch


def test_keep_filters_callers_and_mode_is_removed() -> None:
    with HostSyncAudit(keep=("no_such_file",)) as audit:
        torch.ones(1).item()
    assert audit.events == []
    from torch.overrides import _get_current_function_mode_stack

    assert _get_current_function_mode_stack() == []


def test_records_host_data_and_scalar_writes() -> None:
    """The two kinds the GPU sync pass found that the CPU audit had missed (docs/results/gpu_step.md)."""
    x = torch.zeros(5)
    with HostSyncAudit() as audit:
        torch.tensor([1.0, 2.0], device=x.device)  # host list -> device: a blocking copy on CUDA
        x.new_tensor([1.0])
        x[torch.tensor([1, 2])] = 0.0  # the scalar is copied from the host
        torch.tensor([1.0])  # no device named: stays on the host, not recorded
        x.index_fill_(0, torch.tensor([3]), 1.0)  # scalar passed to the kernel: not recorded
        x[torch.tensor([0])] = torch.ones(1)  # tensor value: not recorded
    counts = audit.counts()
    assert counts.get("host_data") == 2 and counts.get("scalar_write") == 1, counts


def test_replay_codec_and_matching_pairs_copy_no_host_data_per_call() -> None:
    """The buffer's ImageNet constants are built once per device, and the matching pairs' labels are
    derived on the device (each was a stream wait per step on the GPU)."""
    from stella_avalanche.models.avm import matching_pairs
    from stella_avalanche.training.buffer import video_from_uint8, video_to_uint8

    clip = torch.randn(2, 2, 3, 8, 8)
    video_from_uint8(video_to_uint8(clip))  # first use on this device may build the constants
    g = torch.Generator().manual_seed(0)
    with HostSyncAudit() as audit:
        video_from_uint8(video_to_uint8(clip))
        labels, vidx, neg = matching_pairs(9, generator=g)
    assert not {"host_data", "scalar_write"} & set(audit.counts()), audit.summary()
    assert torch.equal(labels, (vidx == torch.arange(9)).float()) and labels.sum() == 4
