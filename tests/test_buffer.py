"""Tests for stella_avalanche.training.buffer: reservoir semantics, compact storage, state."""
from __future__ import annotations

import pytest
import torch

from stella_avalanche.training.buffer import (
    ReservoirBuffer,
    audio_from_uint8,
    audio_to_uint8,
    bytes_per_item,
    stella_fields,
    stella_plus_fields,
    video_from_uint8,
    video_patches_from_uint8,
    video_patches_to_uint8,
    video_to_uint8,
)

torch.set_num_threads(1)

FIELDS = {"x": ((2,), torch.float32), "id": ((), torch.int64)}


def _batch(start: int, n: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(start, start + n)
    return {"x": torch.stack([ids.float(), -ids.float()], 1), "id": ids}


def _sequential_reference(capacity: int, n_total: int, batch: int, uniforms: torch.Tensor) -> list[int]:
    """Item-by-item reservoir with the same uniforms: slot = s if s < cap else floor(u * (s + 1))."""
    slots = [-1] * capacity
    for s in range(n_total):
        if s < capacity:
            slot = s
        else:
            r = int(torch.floor(uniforms[s] * (s + 1)))
            if r >= capacity:
                continue
            slot = r
        slots[slot] = s
    return slots


def test_fill_phase_is_in_order_and_len_seen() -> None:
    buf = ReservoirBuffer(10, fields=FIELDS, generator=torch.Generator().manual_seed(0))
    slots = buf.add(_batch(0, 4))
    assert slots.tolist() == [0, 1, 2, 3]
    assert len(buf) == 4 and buf.seen == 4
    buf.add(_batch(4, 4))
    assert buf.data["id"][:8].tolist() == list(range(8))
    torch.testing.assert_close(buf.data["x"][5], torch.tensor([5.0, -5.0]))


def test_vectorised_insertion_equals_sequential_semantics_last_wins() -> None:
    """Many duplicate slot hits in one batch: the buffer equals the one-by-one reservoir."""
    cap, batch, n_batches = 5, 16, 40   # batches much larger than capacity -> frequent duplicates
    gen_seed = 123
    buf = ReservoirBuffer(cap, fields=FIELDS, generator=torch.Generator().manual_seed(gen_seed))
    dup_batches = 0
    for b in range(n_batches):
        slots_before = buf.seen
        out = buf.add(_batch(b * batch, batch))
        kept = out[out >= 0]
        assert kept.unique().numel() == kept.numel()
        dup_batches += int(slots_before >= cap and (out == -1).sum() > 0)
        # returned slots point at the rows now stored there
        for row, slot in enumerate(out.tolist()):
            if slot >= 0:
                assert int(buf.data["id"][slot]) == b * batch + row
    # the uniforms the buffer drew, in the same order (one per sample, always)
    g = torch.Generator().manual_seed(gen_seed)
    uniforms = torch.cat([torch.rand(batch, generator=g, dtype=torch.float64) for _ in range(n_batches)])
    ref = _sequential_reference(cap, batch * n_batches, batch, uniforms)
    assert buf.data["id"].tolist() == ref
    assert dup_batches > 0


def test_reservoir_is_uniform_chi_square() -> None:
    """Each of 30 stream items ends up in a 10-slot reservoir with probability 1/3 (fixed seed)."""
    cap, n_items, batch, trials = 10, 30, 6, 600
    counts = torch.zeros(n_items)
    gen = torch.Generator().manual_seed(2024)
    for _ in range(trials):
        buf = ReservoirBuffer(cap, fields={"id": ((), torch.int64)}, generator=gen)
        for s in range(0, n_items, batch):
            buf.add({"id": torch.arange(s, s + batch)})
        counts[buf.data["id"]] += 1
    expected = trials * cap / n_items
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 29 degrees of freedom: the 0.999 quantile is 58.3
    assert chi2 < 58.3, chi2
    # and not trivially "in order": late items are present too
    assert float(counts[-batch:].sum()) > 0.2 * trials * batch * cap / n_items


def test_sample_without_replacement_among_filled() -> None:
    buf = ReservoirBuffer(20, fields=FIELDS, generator=torch.Generator().manual_seed(1))
    buf.add(_batch(0, 7))
    items, slots = buf.sample(7)
    assert sorted(slots.tolist()) == list(range(7))
    assert torch.equal(items["id"], slots)
    with pytest.raises(ValueError):
        buf.sample(8)
    # uniform over the filled slots
    hits = torch.zeros(7)
    g = torch.Generator().manual_seed(5)
    for _ in range(700):
        hits[buf.sample(2, generator=g)[1]] += 1
    assert float(hits.min()) > 150 and float(hits.max()) < 250


def test_write_back_and_validation_errors() -> None:
    buf = ReservoirBuffer(4, fields=FIELDS)
    buf.add(_batch(0, 3))
    buf.write(torch.tensor([2, 0]), {"x": torch.tensor([[9.0, 9.0], [7.0, 7.0]])})
    assert buf.data["x"][2].tolist() == [9.0, 9.0] and buf.data["x"][0].tolist() == [7.0, 7.0]
    assert buf.seen == 3 and int(buf.data["id"][2]) == 2
    with pytest.raises(IndexError):
        buf.write(torch.tensor([3]), {"x": torch.zeros(1, 2)})   # slot not filled yet
    with pytest.raises(ValueError, match="'x'"):
        buf.add({"x": torch.zeros(2, 3), "id": torch.zeros(2, dtype=torch.long)})
    with pytest.raises(KeyError, match="id"):
        buf.add({"x": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="video_to_uint8"):
        ReservoirBuffer(2, fields={"video": ((3, 2, 2), torch.uint8)}).add({"video": torch.zeros(1, 3, 2, 2)})


def test_state_dict_round_trip_continues_identically() -> None:
    a = ReservoirBuffer(6, fields=FIELDS, generator=torch.Generator().manual_seed(3))
    for s in range(0, 20, 4):
        a.add(_batch(s, 4))
    state = a.state_dict()
    b = ReservoirBuffer(6, fields=FIELDS, generator=torch.Generator().manual_seed(999))
    b.load_state_dict(state)
    assert len(b) == len(a) and b.seen == a.seen
    assert torch.equal(a.data["id"], b.data["id"])
    for s in range(20, 40, 4):  # same generator state -> same future
        assert torch.equal(a.add(_batch(s, 4)), b.add(_batch(s, 4)))
    assert torch.equal(a.data["x"], b.data["x"])
    assert torch.equal(a.sample(3)[1], b.sample(3)[1])
    with pytest.raises(ValueError):
        ReservoirBuffer(7, fields=FIELDS).load_state_dict(state)


def test_partial_state_dict_only_saves_filled_rows() -> None:
    a = ReservoirBuffer(100, fields=FIELDS)
    a.add(_batch(0, 3))
    st = a.state_dict()
    assert st["data"]["x"].shape == (3, 2)
    b = ReservoirBuffer(100, fields=FIELDS)
    b.load_state_dict(st)
    assert len(b) == 3 and torch.equal(b.data["id"][:3], torch.arange(3))


def test_video_uint8_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    pix = torch.randint(0, 256, (2, 4, 3, 8, 8), generator=g).float() / 255
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    x = (pix - mean) / std
    u8 = video_to_uint8(x)
    assert u8.dtype == torch.uint8
    assert torch.equal(u8, torch.round(pix * 255).to(torch.uint8))  # exact on integer pixels
    back = video_from_uint8(u8)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)
    # off-grid values: error at most half a grey level
    y = x + 0.3 / 255 / std
    assert float(((video_from_uint8(video_to_uint8(y)) - y) * std).abs().max()) <= 0.5 / 255 + 1e-6


def test_video_patch_uint8_uses_channel_last_order() -> None:
    g = torch.Generator().manual_seed(1)
    p = 4
    pix = torch.randint(0, 256, (3, 5, p * p, 3), generator=g)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    x = ((pix.float() / 255 - mean) / std).reshape(3, 5, 3 * p * p)
    u8 = video_patches_to_uint8(x)
    assert torch.equal(u8, pix.reshape(3, 5, -1).to(torch.uint8))
    torch.testing.assert_close(video_patches_from_uint8(u8), x, atol=1e-5, rtol=0)


def test_audio_uint8_affine_error_bound() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 1, 64, 16, generator=g) * 1.5
    q, lo, scale = audio_to_uint8(x)
    back = audio_from_uint8(q, lo, scale)
    bound = (x.flatten(1).amax(1) - x.flatten(1).amin(1)) / 510 + 1e-6
    assert bool(((back - x).abs().flatten(1).amax(1) <= bound).all())
    # a constant item survives exactly
    c = torch.full((1, 5), -0.7)
    torch.testing.assert_close(audio_from_uint8(*audio_to_uint8(c)), c)


def test_paper_size_bytes_per_item() -> None:
    paper = dict(num_frames=4, img_size=224, audio_length=1024, mel_bins=128, embed_dim=768, num_heads=12,
                 video_tokens=784, audio_tokens=512)
    compact = stella_fields(**paper)
    assert bytes_per_item(compact) == 747_598 <= 750_000
    assert ReservoirBuffer.item_bytes(compact) == 747_598
    # §6's layout (fp16 audio, fp32 statistics) plus category (2 B) and index (4 B)
    assert bytes_per_item(stella_fields(**paper, audio_storage="float16",
                                        stats_dtype=torch.float32)) == 886_912 + 6
    plus = stella_plus_fields(keep_video=392, keep_audio=256, patch_size=16, embed_dim=768, num_heads=12)
    assert bytes_per_item(plus) == 377_118 <= 400_000
    assert bytes_per_item(stella_plus_fields(keep_video=392, keep_audio=256, patch_size=16, embed_dim=768,
                                             num_heads=12, audio_storage="float16",
                                             stats_dtype=torch.float32)) == 445_712 + 6
    tiny = ReservoirBuffer(3, fields=stella_fields(num_frames=2, img_size=32, audio_length=64, mel_bins=32,
                                                   embed_dim=64, num_heads=4, video_tokens=32,
                                                   audio_tokens=32))
    assert tiny.bytes_per_item() == bytes_per_item(tiny.fields)
    assert tiny.data["video"].dtype == torch.uint8 and tiny.data["z_a"].dtype == torch.float32
