"""Selection diagnostics: known answers on planted data, chance on random models, the geometry oracle."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from stella_avalanche.data.synthetic import get_preset, render_split
from stella_avalanche.evaluation import diagnostics as D
from stella_avalanche.models.avm import build_avm
from stella_avalanche.models.cav import build_model


def test_roc_auc_matches_sklearn_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 5, (40,), generator=g).float()
    neg = torch.randint(0, 4, (30,), generator=g).float()
    want = roc_auc_score(np.r_[np.ones(40), np.zeros(30)], np.r_[pos.numpy(), neg.numpy()])
    assert D.roc_auc(pos, neg) == pytest.approx(want, abs=1e-12)


def test_pair_auc_planted_and_shuffled() -> None:
    g = torch.Generator().manual_seed(0)
    n, d = 60, 16
    labels = torch.arange(n) // 5
    cls = torch.randn(12, d, generator=g)
    inst = torch.randn(n, d, generator=g)
    z_a = cls[labels] + inst
    z_v = cls[labels] + inst + 0.05 * torch.randn(n, d, generator=g)
    good = D.pair_auc(z_a, z_v, labels)
    assert good["same_class"] > 0.98 and good["other_class"] > 0.98
    # class only, no instance cue: other-class pairs are separated, same-class pairs at chance
    cls_only = D.pair_auc(cls[labels] + 0.01 * torch.randn(n, d, generator=g),
                          cls[labels] + 0.01 * torch.randn(n, d, generator=g), labels)
    assert cls_only["other_class"] > 0.95 and abs(cls_only["same_class"] - 0.5) < 0.1
    rand = D.pair_auc(torch.randn(n, d, generator=g), torch.randn(n, d, generator=g), labels)
    assert abs(rand["same_class"] - 0.5) < 0.1 and abs(rand["other_class"] - 0.5) < 0.05


def test_lift_and_recall_planted() -> None:
    mask = torch.zeros(4, 16, dtype=torch.bool)
    mask[:, :4] = True                                   # share 1/4
    blind = torch.ones(4, 16)
    assert D.importance_lift(blind, mask) == pytest.approx(1.0)
    focused = torch.zeros(4, 16)
    focused[:, :4] = 1.0                                 # all mass on the mask
    assert D.importance_lift(focused, mask) == pytest.approx(4.0)
    ids = torch.tensor([[0, 1, 8, 9]] * 4)
    assert D.recall_in(ids, mask) == pytest.approx(0.5)


def _tiny_clips(n_per_class: int = 2):
    clips = render_split("tiny", 0, "retrieval", per_class=n_per_class)
    return clips


def test_random_models_are_at_chance() -> None:
    """A randomly initialised backbone and AVM on noise clips: lift ~ 1, accuracy and AUC ~ 0.5."""
    torch.manual_seed(0)
    model = build_model("tiny")
    avm = build_avm(model)
    clips = _tiny_clips(3)
    g = torch.Generator().manual_seed(1)
    # replace the media by noise, keep the ground truth: nothing in the input marks the object
    clips = {**clips, "video": torch.randn(clips["video"].shape, generator=g),
             "audio": torch.randn(clips["audio"].shape, generator=g)}
    out = D.selection_diagnostics(model, avm, clips)
    assert abs(out["avm_accuracy"] - 0.5) < 0.15
    assert abs(out["video_object_lift"] - 1.0) < 0.15
    assert abs(out["audio_sounding_lift"] - 1.0) < 0.15
    assert abs(out["init_pair_auc_other_class"] - 0.5) < 0.1
    for k in ("video_object_recall_candidates", "audio_sounding_recall_kept", "rca_twin_c", "rca_unrelated_c"):
        assert 0.0 <= out[k] <= 1.0


class _PlantedAVM(torch.nn.Module):
    """An 'AVM' whose queries/keys make every token attend to the ground-truth tokens, and whose logit
    is +1 for matched and -1 for mismatched pairs (it reads a planted id channel)."""

    def __init__(self, num_heads: int = 1) -> None:
        super().__init__()
        self.num_heads = num_heads

    def project(self, E_a, E_v):  # E carries the truth in channel 0 and an instance id in channel 1
        q_a = torch.ones_like(E_a[..., :1])[:, None]
        q_v = torch.ones_like(E_v[..., :1])[:, None]
        k_a = 20.0 * E_a[..., :1][:, None]
        k_v = 20.0 * E_v[..., :1][:, None]
        return {"q_a": q_a, "k_a": k_a, "q_v": q_v, "k_v": k_v}

    def forward(self, E_a, E_v):
        return torch.where((E_a[:, 0, 1] - E_v[:, 0, 1]).abs() < 1e-6, 1.0, -1.0)


class _PlantedBackbone(torch.nn.Module):
    """Token features = [ground truth flag, instance id, ...]; embeddings = one-hot instance."""

    def __init__(self, cfg, masks_a, masks_v) -> None:
        super().__init__()
        self.config = cfg
        self.ma, self.mv = masks_a.float(), masks_v.float()

    def patchify_audio(self, audio):
        return audio.flatten(1)[:, :1].expand(-1, self.config.num_audio_tokens)[..., None]

    def patchify_video(self, video):
        return video.flatten(1)[:, :1].expand(-1, self.config.num_video_tokens)[..., None]

    def encode_modality(self, patches, ids, m):
        rows = patches[:, 0, 0].long()
        truth = (self.ma if m == "audio" else self.mv)[rows]
        return torch.stack([truth, rows[:, None].float().expand_as(truth)], dim=-1)

    def fuse_joint(self, U_a, a_ids, U_v, v_ids):
        return U_a, U_v

    def fuse_unimodal(self, U, ids, m, final_norm=True):  # for configs with avm_features="unimodal"
        return U

    def embed(self, video, audio):
        rows_v, rows_a = video.flatten(1)[:, 0].long(), audio.flatten(1)[:, 0].long()
        n = int(max(rows_v.max(), rows_a.max())) + 1
        return (torch.nn.functional.one_hot(rows_a, n).float(), torch.nn.functional.one_hot(rows_v, n).float())


def test_planted_model_gives_the_known_answers() -> None:
    import dataclasses

    # at most half of the segments sounding: every sounding token fits among the K_A candidates
    clips = render_split(dataclasses.replace(get_preset("tiny"), max_on_segments=2), 0, "retrieval", per_class=3)
    cfg = build_model("tiny").config
    n = clips["label"].numel()
    gt = D.truth_masks(clips["truth"], image_size=cfg.img_size, patch_size=cfg.patch_size, frame_size=cfg.img_size,
                       audio_time_tokens=cfg.audio_time_tokens, audio_freq_tokens=cfg.audio_freq_tokens)
    # the planted input encodes the row number, so the planted backbone can look up the truth
    rows = torch.arange(n, dtype=torch.float32)
    video = rows[:, None, None, None, None].expand(n, *clips["video"].shape[1:]).contiguous()
    audio = rows[:, None, None, None].expand(n, *clips["audio"].shape[1:]).contiguous()
    model = _PlantedBackbone(cfg, gt["audio"], gt["video"])
    out = D.selection_diagnostics(model, _PlantedAVM(), {**clips, "video": video, "audio": audio})
    assert out["avm_accuracy"] == pytest.approx(1.0)
    assert out["avm_auc"] == pytest.approx(1.0)
    assert out["init_pair_auc_same_class"] == pytest.approx(1.0)
    # all mass on the truth: lift = 1 / share, every object patch a candidate
    assert out["video_object_lift"] > 4.0
    assert out["video_object_recall_candidates"] == pytest.approx(1.0)
    assert out["audio_sounding_lift"] > 1.5
    assert out["audio_sounding_recall_candidates"] == pytest.approx(1.0)
    # without RCA the importance sampling keeps what the planted map points at (the object's patches,
    # a minority of the tokens, are drawn first); with RCA its coin costs part of them
    assert out["video_object_recall_selected_no_rca"] > 0.9
    assert out["video_object_recall_selected_no_rca"] > out["video_object_recall_selected_no_twin"]


@pytest.mark.parametrize("preset,identified", [("instance_cues", False), ("half_sounding", True), ("default", True)])
def test_oracle_pattern_survives_selection_only_on_the_new_geometry(preset: str, identified: bool) -> None:
    """One on/off segment goes into each audio chunk. v2's default (instance_cues) allows 3 of 4
    segments on: keeping half of the chunks then drops a sounding chunk of every 3-segment clip. The
    half_sounding preset and the v3 default keep at most half of the segments sounding, so the perfect
    selection keeps the whole pattern."""
    p = get_preset(preset)
    clips = render_split(p, 0, "retrieval", per_class=4)
    cfg = build_model("tiny").config
    kw = dict(audio_time_tokens=cfg.audio_time_tokens, audio_freq_tokens=cfg.audio_freq_tokens, chunk=4,
              video_tokens=cfg.num_video_tokens, image_size=p.image_size, patch_size=cfg.patch_size,
              frame_size=cfg.img_size)
    half = D.oracle_pattern_retrieval(clips["truth"], **kw)
    full = D.oracle_pattern_retrieval(clips["truth"], keep_ratio_audio=1.0, keep_ratio_video=1.0, **kw)
    assert full["identified"] == pytest.approx(1.0)
    if identified:
        assert half["identified"] == pytest.approx(1.0)
        assert half["sounding_chunks_dropped"] == 0.0
        assert half["r1_kept"] == pytest.approx(half["r1_full"])
    else:
        assert half["identified"] < 0.9
        assert half["sounding_chunks_dropped"] > 0.1
        assert half["r1_kept"] < half["r1_full"]


def test_run_diagnostics_writes_json_and_pictures(tmp_path) -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    avm = build_avm(model)
    out = D.run_diagnostics(model, avm, preset="tiny", per_class=2, out_dir=str(tmp_path))
    keys = {"init_pair_auc_same_class", "init_pair_auc_other_class", "avm_accuracy", "avm_auc", "video_object_lift",
            "video_object_recall_candidates", "video_object_recall_selected", "audio_sounding_lift",
            "audio_sounding_recall_kept", "rca_twin_c", "rca_unrelated_c", "oracle_pattern_identified"}
    assert keys <= set(out)
    import json
    assert keys <= set(json.loads((tmp_path / "diagnostics.json").read_text()))
    pics = sorted(tmp_path.glob("selection_clip*.png"))
    assert len(pics) == 4 and all(p.stat().st_size > 5000 for p in pics)


def test_embed_clips_sends_batches_to_the_model_device_and_returns_host_tensors() -> None:
    """Clips stay on the host; each batch goes where the weights are (the meta device stands in for a
    GPU here), and the embeddings come back to the host (a STELLA run on CUDA failed without this)."""
    from stella_avalanche.evaluation.diagnostics import embed_clips

    class OnMeta(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1, device="meta"))
            self.seen: list[torch.device] = []

        def embed(self, video, audio):
            self.seen += [video.device, audio.device]
            return torch.ones(video.shape[0], 3, device="meta"), torch.ones(video.shape[0], 3, device="meta")

    m = OnMeta()
    # the host copy of the results is attempted: a meta tensor cannot be copied out, so that copy raises
    with pytest.raises(NotImplementedError, match="Cannot copy out of meta tensor"):
        embed_clips(m, torch.zeros(5, 2, 3, 4, 4), torch.zeros(5, 1, 8, 4), batch_size=2)
    assert m.seen and all(d.type == "meta" for d in m.seen)


def test_load_models_keeps_the_pooling_a_checkpoint_was_trained_with(tmp_path) -> None:
    """A backbone made before the tiny preset's segment pooling (embed_segments=1) still loads for
    diagnosis; loading it into the preset's model fails with a message that says what to set."""
    from stella_avalanche.data.synthetic import default_features
    from stella_avalanche.evaluation.diagnosed_models import load_models
    from stella_avalanche.models.avm import build_avm
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.models.loading import load_backbone_weights

    torch.manual_seed(0)
    old = CAVMAE(model_config_for("tiny", default_features("tiny"), embed_segments=1))
    torch.save({"model": old.state_dict(), "meta": {}}, tmp_path / "backbone.pt")
    torch.save({"avm": build_avm(old).state_dict(), "meta": {}}, tmp_path / "avm.pt")
    model, _, _ = load_models(backbone=str(tmp_path / "backbone.pt"), avm=str(tmp_path / "avm.pt"), preset="tiny")
    assert model.config.embed_segments == 1
    torch.testing.assert_close(model.state_dict()["pos_embed_v"], old.state_dict()["pos_embed_v"])
    current = CAVMAE(model_config_for("tiny", default_features("tiny")))
    assert current.config.embed_segments == 4
    with pytest.raises(RuntimeError, match="set model.overrides.embed_segments=1"):
        load_backbone_weights(current, tmp_path / "backbone.pt")


def test_visual_group_and_twin_pairs_follow_the_generator_layout() -> None:
    """Classes of the last ``twin_offset`` tasks reuse the look of the class ``twin_offset`` tasks
    earlier, as build_vocabulary draws them, also when the offset is not half the stream."""
    from stella_avalanche.data.synthetic import build_vocabulary, get_preset

    for offset in (4, 2):
        p = dataclasses.replace(get_preset("tiny"), twin_offset=offset)
        vocab = build_vocabulary(p, 0)
        labels = torch.arange(p.num_classes)
        vis = D.visual_group(labels, classes_per_task=p.classes_per_task, twin_offset=offset, num_tasks=p.num_tasks)
        same_look = torch.tensor([[a.visual == b.visual for b in vocab.classes] for a in vocab.classes])
        assert torch.equal(vis[:, None] == vis[None, :], same_look)
        rows, twins, unrel = D.twin_pairs(labels, torch.zeros_like(labels), classes_per_task=p.classes_per_task,
                                          twin_offset=offset, num_tasks=p.num_tasks)
        assert rows.numel() == offset * p.classes_per_task
        assert bool(same_look[rows, twins].all()) and not bool(same_look[rows, unrel].any())


def test_same_pattern_partners_share_the_pattern_and_split_by_class() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    patterns = torch.tensor([[1, 0], [1, 0], [1, 0], [0, 1], [0, 1], [0, 1]], dtype=torch.bool)
    rows, same, other = D.same_pattern_partners(labels, patterns, torch.Generator().manual_seed(0))
    # rows 0 and 1 have both partners (row 0: same class 1, other class 2); row 3 only an other class
    assert rows.tolist() == [0, 1]
    assert same.tolist() == [1, 0] and other.tolist() == [2, 2]


class _ClassAVM(_PlantedAVM):
    """Logit +1 when the audio's and the video's clips share a class (read through the planted row id)."""

    def __init__(self, labels: torch.Tensor, read_class: bool) -> None:
        super().__init__()
        self.labels, self.read_class = labels, read_class

    def forward(self, E_a, E_v):
        ra, rv = E_a[:, 0, 1].long(), E_v[:, 0, 1].long()
        if self.read_class:
            return torch.where(self.labels[ra] == self.labels[rv], 1.0, -1.0)
        return torch.where(ra == rv, 1.0, -1.0)  # instance only: every mismatched pair alike


def test_avm_class_auc_separates_an_avm_that_reads_the_class() -> None:
    clips = render_split(dataclasses.replace(get_preset("tiny"), min_on_segments=1, max_on_segments=1), 0, "retrieval",
                         per_class=4)
    cfg = build_model("tiny").config
    n = clips["label"].numel()
    rows = torch.arange(n, dtype=torch.float32)
    video = rows[:, None, None, None, None].expand(n, *clips["video"].shape[1:]).contiguous()
    audio = rows[:, None, None, None].expand(n, *clips["audio"].shape[1:]).contiguous()
    gt = D.truth_masks(clips["truth"], image_size=cfg.img_size, patch_size=cfg.patch_size, frame_size=cfg.img_size,
                       audio_time_tokens=cfg.audio_time_tokens, audio_freq_tokens=cfg.audio_freq_tokens)
    model = _PlantedBackbone(cfg, gt["audio"], gt["video"])
    reads = D.avm_class_auc(model, _ClassAVM(clips["label"], True), video, audio, clips["label"], gt["pattern"])
    blind = D.avm_class_auc(model, _ClassAVM(clips["label"], False), video, audio, clips["label"], gt["pattern"])
    assert reads["avm_class_pairs"] > 5
    assert reads["avm_class_auc"] == pytest.approx(1.0)
    assert blind["avm_class_auc"] == pytest.approx(0.5)


def test_rca_twin_auc_is_one_when_only_twins_raise_c_and_half_when_c_ignores_them() -> None:
    n, h, l, d, k = 9, 2, 5, 1, 3
    proj = {"k_v": torch.ones(n, h, l, d), "k_a": torch.ones(n, h, l, d)}
    cand = torch.arange(k).expand(n, k).contiguous()
    rows, twins, unrel = torch.tensor([0, 1, 2]), torch.tensor([3, 4, 5]), torch.tensor([6, 7, 8])
    # C = sigmoid(<k, qbar_replay - qbar_cur>): the replayed twins carry larger summary queries
    level = torch.tensor([0, 0, 0, 3.0, 4.0, 5.0, 0.2, 0.1, 0.0])[:, None, None].expand(n, h, d)
    out = D._rca_twins(proj, level, level.clone(), cand, cand, (rows, twins, unrel))
    assert out["rca_twin_auc"] == pytest.approx(1.0)
    assert out["rca_twin_c"] > out["rca_unrelated_c"]
    # the same mean gap, but one twin below every unrelated pair: AUC 2/3
    level2 = torch.tensor([0, 0, 0, 9.0, 4.0, -1.0, 0.2, 0.1, 0.0])[:, None, None].expand(n, h, d)
    assert D._rca_twins(proj, level2, level2.clone(), cand, cand, (rows, twins, unrel))["rca_twin_auc"] == \
        pytest.approx(2 / 3)
    zero = torch.zeros(n, h, d)
    assert D._rca_twins(proj, zero, zero, cand, cand, (rows, twins, unrel))["rca_twin_auc"] == pytest.approx(0.5)
