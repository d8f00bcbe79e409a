"""DDP runs without the unused-parameter search (stella_avalanche/distributed.py: wrap_ddp).

That is only safe if every trainable backbone parameter receives a gradient in every training step
of every strategy: checked here after the backward of two steps (the second with replay rows), and
for each model input form (full clips, kept ids, STELLA+ patches, ``contrastive_input="kept"``).
The 2-process gloo run through ``run_stella.py`` is tests/test_distributed.py.
"""
from __future__ import annotations

import pytest
import torch
from avalanche.benchmarks import benchmark_from_datasets
from avalanche.benchmarks.utils import AvalancheDataset
from avalanche.training.plugins import SupervisedPlugin
from torch.utils.data import default_collate

from stella_avalanche.distributed import DistContext, wrap_ddp
from stella_avalanche.models.avm import build_avm
from stella_avalanche.models.cav import build_model
from stella_avalanche.training.strategies import make_strategy
from stella_avalanche.perf.random_clips import RandomClips as _Clips


def _unused(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]




class _CheckGrads(SupervisedPlugin):
    def __init__(self) -> None:
        super().__init__()
        self.unused: list[list[str]] = []

    def after_backward(self, strategy, **kw):
        self.unused.append(_unused(strategy.backbone))


# the backbone sees three input forms: full clips (every baseline; LUMP mixes them first), kept ids
# (STELLA) and stored patches (STELLA+); MIR / GMED / CLS-ER / ESMER add passes outside the DDP model
@pytest.mark.parametrize("name", ["derpp", "lump", "stella", "stella_plus"])
def test_every_parameter_gets_a_gradient_each_step(name: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny")
    check = _CheckGrads()
    strategy = make_strategy(name, model=model, avm=build_avm(model) if name.startswith("stella") else None,
                             plugins=[check], plugin_kwargs={} if name == "finetune" else {"mem_size": 8},
                             train_mb_size=3, train_epochs=1, device="cpu")
    bm = benchmark_from_datasets(train=[AvalancheDataset([_Clips(model.config, 6)], collate_fn=default_collate)])
    strategy.train(bm.train_stream[0], eval_streams=[])
    assert len(check.unused) == 2
    assert check.unused == [[], []], f"{name}: parameters without gradient {check.unused}"


@pytest.mark.parametrize("form", ["clips", "keep", "patches", "kept_contrastive"])
def test_every_parameter_used_by_each_input_form(form: str) -> None:
    torch.manual_seed(0)
    model = build_model("tiny", contrastive_input="kept" if form == "kept_contrastive" else "visible")
    c = model.config
    b = 3
    video = torch.randn(b, c.num_frames, 3, c.img_size, c.img_size)
    audio = torch.randn(b, 1, c.audio_length, c.mel_bins)
    kw: dict = {"video": video, "audio": audio}
    if form != "clips":
        kw["video_keep"] = torch.rand(b, c.num_video_tokens).argsort(1)[:, : c.num_video_tokens // 2]
        kw["audio_keep"] = torch.rand(b, c.num_audio_tokens).argsort(1)[:, : c.num_audio_tokens // 2]
    if form == "patches":
        kw["video_patches"] = torch.gather(model.patchify_video(video), 1,
                                           kw["video_keep"][..., None].expand(-1, -1, c.video_patch_dim))
        kw["audio_patches"] = torch.gather(model.patchify_audio(audio), 1,
                                           kw["audio_keep"][..., None].expand(-1, -1, c.audio_patch_dim))
        del kw["video"], kw["audio"]
    model(**kw)["loss"].backward()
    assert _unused(model) == []


def test_wrap_ddp_turns_the_search_off_in_one_process() -> None:
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        model = build_model("tiny")
        ddp = wrap_ddp(model, DistContext(rank=0, world_size=1, device=torch.device("cpu")))
        assert ddp.find_unused_parameters is False and ddp.module is model
        c = model.config
        for _ in range(2):  # DDP raises at the second step if a parameter went unused
            out = ddp(torch.randn(2, c.num_frames, 3, c.img_size, c.img_size),
                      torch.randn(2, 1, c.audio_length, c.mel_bins))
            out["loss"].backward()
        assert _unused(model) == []
    finally:
        dist.destroy_process_group()
