"""Tests of the replay baselines (``docs/method.md`` §8): each test exercises the mechanism that
distinguishes its method, with the tiny backbone and batch 4; the last one trains every plugin for
two experiences through :class:`AudioVideoPretraining`."""
from __future__ import annotations

import copy
import math
from typing import Any, Optional

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin

torch.set_num_threads(1)

from stella_avalanche.models.cav import build_model  # noqa: E402
from stella_avalanche.training.buffer import video_from_uint8, video_to_uint8  # noqa: E402
from stella_avalanche.training.plugins import (  # noqa: E402
    CLSERPlugin,
    DERPPPlugin,
    ERPlugin,
    ESMERPlugin,
    GMEDPlugin,
    LUMPPlugin,
    MIRPlugin,
)
from stella_avalanche.training.plugins import clser as clser_mod  # noqa: E402
from stella_avalanche.training.plugins.replay_base import virtual_adam_params  # noqa: E402
from stella_avalanche.training.template import make_adam  # noqa: E402

N = 4


def tiny_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("tiny")


def rand_batch(model: torch.nn.Module, n: int, *, start: int, seed: int) -> dict[str, torch.Tensor]:
    """Random clips whose video is uint8-exact and audio fp16-exact (lossless compact storage)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    u8 = torch.randint(0, 256, (n, cfg.num_frames, 3, cfg.img_size, cfg.img_size), generator=g,
                       dtype=torch.uint8)
    audio = torch.randn((n, 1, cfg.audio_length, cfg.mel_bins), generator=g).half().float()
    return {"video": video_from_uint8(u8), "audio": audio,
            "category": torch.full((n,), seed % 3, dtype=torch.long),
            "label": torch.randint(0, 5, (n,), generator=g),
            "index": torch.arange(start, start + n, dtype=torch.long)}


class FakeStrategy:
    """The strategy attributes the plugins use, driven in Avalanche's callback order (§4)."""

    def __init__(self, model: torch.nn.Module, *, lr: float = 1e-3) -> None:
        self.model = model
        self.backbone = model
        self.optimizer = make_adam(model, lr=lr)
        self.device = torch.device("cpu")
        self.amp_dtype = None
        self.is_training = True
        self.mbatch: dict[str, Any] = {}
        self.mb_output: dict[str, torch.Tensor] = {}
        self.loss = torch.zeros(1)
        self.forward_batch: dict[str, torch.Tensor] = {}

    def forward_part(self, plugins: list, batch: dict) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.mbatch = dict(batch)
        for p in plugins:
            p.before_forward(self)
        self.forward_batch = {k: v.clone() for k, v in self.mbatch.items()}
        self.mb_output = self.model(video=self.mbatch["video"], audio=self.mbatch["audio"])
        self.loss = torch.zeros(1) + self.mb_output["loss"]
        for p in plugins:
            p.before_backward(self)
        self.loss.sum().backward()
        self.optimizer.step()

    def step(self, plugins: list, batch: dict) -> None:
        self.forward_part(plugins, batch)
        for p in plugins:
            p.after_training_iteration(self)


def stored_indices(plugin) -> set[int]:
    b = plugin.buffer
    return set(b.data["index"][: len(b)].tolist())


# ------------------------------------------------------------------------------------------ ER
def test_er_concatenates_replay_and_stores_only_current_items():
    model = tiny_model()
    s = FakeStrategy(model)
    p = ERPlugin(mem_size=16, seed=0)
    a = rand_batch(model, N, start=0, seed=1)
    s.step([p], a)
    assert s.forward_batch["video"].shape[0] == N  # empty buffer: no replay rows
    assert len(p.buffer) == N and stored_indices(p) == {0, 1, 2, 3}
    assert p.buffer_bytes_per_item == p.buffer.bytes_per_item() > 0

    b = rand_batch(model, N, start=10, seed=2)
    s.step([p], b)
    fb = s.forward_batch
    for k in ("video", "audio", "category", "label", "index"):
        assert fb[k].shape[0] == 2 * N, k
    assert fb["index"][:N].tolist() == [10, 11, 12, 13]          # current rows first
    assert sorted(fb["index"][N:].tolist()) == [0, 1, 2, 3]      # then the replay rows
    order = fb["index"][N:]
    torch.testing.assert_close(fb["video"][N:], a["video"][order], atol=1e-5, rtol=0)
    torch.testing.assert_close(fb["audio"][N:], a["audio"][order])
    assert torch.equal(fb["label"][N:], a["label"][order])
    # the reservoir received the 4 current clips only, not the replayed rows again
    assert p.buffer.seen == 2 * N and len(p.buffer) == 2 * N
    assert stored_indices(p) == {0, 1, 2, 3, 10, 11, 12, 13}
    slot = (p.buffer.data["index"][: len(p.buffer)] == 12).nonzero().item()
    assert torch.equal(p.buffer.data["video"][slot], video_to_uint8(b["video"][2]))


def test_state_dict_roundtrip_restores_buffer_and_rng():
    model = tiny_model()
    s = FakeStrategy(model)
    p = ERPlugin(mem_size=6, seed=3)
    for i in range(3):
        s.step([p], rand_batch(model, N, start=10 * i, seed=i))
    q = ERPlugin(mem_size=6, seed=99)
    q.load_state_dict(copy.deepcopy(p.state_dict()))
    assert q.buffer.seen == p.buffer.seen == 12 and q.step == 3
    for k, v in p.buffer.data.items():
        assert torch.equal(q.buffer.data[k], v)
    assert torch.equal(q.sample(4, torch.device("cpu"))[1], p.sample(4, torch.device("cpu"))[1])


# ------------------------------------------------------------------------------------------ DER++
def _deterministic_masks(model: torch.nn.Module) -> None:
    """Make the visible tokens a fixed function of the clip (first n ids) so z is reproducible."""

    def split(patches, ids, n_vis, generator):
        k = ids.shape[1]
        order = torch.arange(k, device=ids.device).expand(ids.shape[0], k)
        vis, tgt = order[:, :n_vis], order[:, n_vis:]
        take = lambda x, i: torch.gather(x, 1, i[..., None].expand(-1, -1, x.shape[-1]))  # noqa: E731
        return take(patches, vis), torch.gather(ids, 1, vis), take(patches, tgt), torch.gather(ids, 1, tgt)

    model._split_tokens = split


def test_derpp_penalty_zero_when_unchanged_and_positive_after_perturbation():
    model = tiny_model()
    _deterministic_masks(model)
    s = FakeStrategy(model, lr=0.0)  # Adam with lr 0: the weights never move
    p = DERPPPlugin(mem_size=16, seed=0, alpha=0.5)
    s.step([p], rand_batch(model, N, start=0, seed=1))
    assert p.last_penalty is None
    assert p.buffer.fields["z_a"] == ((model.config.embed_dim,), torch.float32)

    s.step([p], rand_batch(model, N, start=10, seed=2))
    assert p.last_penalty is not None and float(p.last_penalty) < 1e-8
    # the penalty is added on top of the model's loss
    torch.testing.assert_close(s.loss.detach(), (s.mb_output["loss"] + p.last_penalty).detach().reshape(1))

    with torch.no_grad():  # move the model away from the weights that produced the stored z
        for prm in model.blocks_v[0].parameters():
            prm.add_(0.05 * torch.randn_like(prm))
    s.step([p], rand_batch(model, N, start=20, seed=3))
    assert float(p.last_penalty) > 1e-4
    # and the penalty is α·(MSE_a + MSE_v) of the replay rows against their stored z
    out, rep_idx = s.mb_output, s.forward_batch["index"][N:]
    data = p.buffer.data
    slots = torch.stack([(data["index"][: len(p.buffer)] == i).nonzero().flatten()[0] for i in rep_idx])
    expect = 0.5 * (torch.nn.functional.mse_loss(out["z_audio"][N:], data["z_a"][slots])
                    + torch.nn.functional.mse_loss(out["z_video"][N:], data["z_v"][slots]))
    torch.testing.assert_close(p.last_penalty, expect.detach())


# ------------------------------------------------------------------------------------------ LUMP
def test_lump_mixes_without_concatenation_and_stores_unmixed_clips():
    model = tiny_model()
    s = FakeStrategy(model)
    p = LUMPPlugin(mem_size=16, seed=0)
    a = rand_batch(model, N, start=0, seed=1)
    s.step([p], a)
    assert p.last_lambda is None and torch.equal(s.forward_batch["video"], a["video"])

    b = rand_batch(model, N, start=10, seed=2)
    s.step([p], b)
    lam = p.last_lambda
    assert lam is not None and 0.0 < lam < 1.0
    fb = s.forward_batch
    assert fb["video"].shape[0] == N and fb["audio"].shape[0] == N  # no concatenation
    assert fb["index"].tolist() == [10, 11, 12, 13]
    # every mixed row is λ·x_cur + (1-λ)·x_buf for one distinct buffered clip, same clip for both modalities
    partners = []
    for n in range(N):
        err_v = ((fb["video"][n] - lam * b["video"][n])[None] - (1 - lam) * a["video"]).flatten(1).abs().amax(1)
        j = int(err_v.argmin())
        assert float(err_v[j]) < 1e-4
        torch.testing.assert_close(fb["audio"][n], lam * b["audio"][n] + (1 - lam) * a["audio"][j])
        partners.append(j)
    assert sorted(partners) == [0, 1, 2, 3]
    # the buffer got the unmixed current clips
    data = p.buffer.data
    for n, idx in enumerate(b["index"].tolist()):
        slot = (data["index"][: len(p.buffer)] == idx).nonzero().item()
        assert torch.equal(data["video"][slot], video_to_uint8(b["video"][n]))
        assert torch.equal(data["audio"][slot].float(), b["audio"][n])


# ------------------------------------------------------------------------------------------ MIR
def test_virtual_adam_step_matches_a_real_step_without_touching_the_optimizer():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = make_adam(net, lr=1e-2, weight_decay=1e-2)
    x = torch.randn(8, 5)
    for _ in range(2):  # non-trivial moments and step count
        opt.zero_grad()
        net(x).pow(2).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    before = copy.deepcopy(opt.state_dict())
    x2 = torch.randn(8, 5)
    theta1 = virtual_adam_params(net, opt, net(x2).pow(2).mean())
    assert set(theta1) == {n for n, _ in net.named_parameters()}
    assert all(p.grad is None for p in net.parameters())  # autograd.grad: no .grad side effect
    after = opt.state_dict()
    for k, st in before["state"].items():  # optimizer state untouched
        for name, v in st.items():
            assert torch.equal(torch.as_tensor(after["state"][k][name]), torch.as_tensor(v))
    opt.zero_grad()
    net(x2).pow(2).mean().backward()
    opt.step()  # the real step (torch scales eps by sqrt(bias correction): differences ~1e-8)
    for name, prm in net.named_parameters():
        torch.testing.assert_close(theta1[name], prm.detach(), atol=1e-6, rtol=1e-5)


def test_mir_keeps_the_candidates_with_the_largest_loss_increase():
    model = tiny_model()
    s = FakeStrategy(model)
    p = MIRPlugin(mem_size=64, seed=0, search_factor=5)
    pool = rand_batch(model, 24, start=100, seed=5)
    p.insert(pool, torch.device("cpu"))
    # planted per-item increase: a fixed random score per buffered clip
    planted = torch.rand(200, generator=torch.Generator().manual_seed(1))
    calls: list[Optional[dict]] = []
    drawn: list[torch.Tensor] = []

    def fake_losses(strategy, cands, params):
        calls.append(params)
        drawn.append(cands["index"].clone())
        base = cands["index"].float() * 0.01
        return base if params is None else base + planted[cands["index"]]

    p.candidate_losses = fake_losses
    weights_before = copy.deepcopy(model.state_dict())
    opt_before = copy.deepcopy(s.optimizer.state_dict())
    s.mbatch = rand_batch(model, N, start=0, seed=6)
    p.before_forward(s)
    # 5·N = 20 candidates scored twice: before and after a (virtual) parameter update
    assert len(calls) == 2 and calls[0] is None and calls[1]
    assert torch.equal(drawn[0], drawn[1]) and drawn[0].unique().numel() == 20
    torch.testing.assert_close(p.last_scores, planted[drawn[0]])
    chosen = s.mbatch["index"][N:]
    # the replay rows are the 4 candidates with the highest planted increase
    best = drawn[0][planted[drawn[0]].topk(N).indices]
    assert sorted(chosen.tolist()) == sorted(best.tolist())
    # θ and the optimizer are untouched by the look-ahead
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights_before[k])
    assert s.optimizer.state_dict()["state"] == opt_before["state"]
    assert s.mbatch["video"].shape[0] == 2 * N


# ------------------------------------------------------------------------------------------ GMED
def test_gmed_edits_move_inputs_along_the_documented_direction_in_place():
    model = tiny_model()
    s = FakeStrategy(model)
    p = GMEDPlugin(mem_size=16, seed=0)  # fp32 storage
    assert not p.compact
    p.insert(rand_batch(model, 8, start=100, seed=5), torch.device("cpu"))
    assert p.buffer.seen == 8
    old = {k: v.clone() for k, v in p.buffer.data.items()}
    g = torch.Generator().manual_seed(3)
    cv1, cv2 = torch.randn((2, *old["video"].shape[1:]), generator=g)
    ca1, ca2 = torch.randn((2, *old["audio"].shape[1:]), generator=g)
    seen_params: list = []

    def linear_loss(strategy, video, audio, params):  # ∇x is cv1/ca1 at θ and cv2/ca2 at θ'
        seen_params.append(params)
        cv, ca = (cv1, ca1) if params is None else (cv2, ca2)
        return (video * cv).sum() + (audio * ca).sum()

    p.replay_loss = linear_loss
    s.mbatch = rand_batch(model, N, start=0, seed=6)
    p.before_forward(s)
    assert seen_params[0] is None and seen_params[1]  # post loss at the look-ahead θ'
    slots = p.last_slots
    assert slots.shape == (N,) and p.buffer.seen == 8  # the reservoir counter is unchanged
    s_, beta = 0.1, 0.05
    dv = s_ * (cv2 - cv1 + beta * cv1)
    da = s_ * (ca2 - ca1 + beta * ca1)
    data = p.buffer.data
    torch.testing.assert_close(data["video"][slots], old["video"][slots] + dv)
    torch.testing.assert_close(data["audio"][slots], old["audio"][slots] + da)
    untouched = torch.tensor([i for i in range(8) if i not in slots.tolist()])
    assert torch.equal(data["video"][untouched], old["video"][untouched])
    assert torch.equal(data["index"], old["index"])  # same items, same slots
    # the step replays the edited clips
    torch.testing.assert_close(s.mbatch["video"][N:], data["video"][slots])
    assert torch.equal(s.mbatch["index"][N:], old["index"][slots])


def test_gmed_real_gradients_edit_and_train():
    model = tiny_model()
    s = FakeStrategy(model)
    p = GMEDPlugin(mem_size=16, seed=0)
    p.insert(rand_batch(model, 8, start=100, seed=5), torch.device("cpu"))
    old = p.buffer.data["video"].clone()
    s.step([p], rand_batch(model, N, start=0, seed=6))
    moved = (p.buffer.data["video"][:8] - old[:8]).flatten(1).abs().amax(1)
    assert int((moved > 0).sum()) >= 1 and torch.isfinite(s.loss).all()


# ------------------------------------------------------------------------------------------ CLS-ER
def test_clser_ema_updates_follow_alpha_schedule_and_seeded_coin_flips():
    model = tiny_model()
    s = FakeStrategy(model)
    p = CLSERPlugin(mem_size=16, seed=4, plastic_alpha=0.6, stable_alpha=0.999)
    p.before_training(s)
    for e, m in zip(p.plastic.parameters(), model.parameters()):
        assert torch.equal(e, m) and not e.requires_grad
    n_updates = [0, 0]
    for t in range(1, 5):
        s.forward_part([p], rand_batch(model, N, start=10 * t, seed=t))
        gstate = p.generator.get_state()
        old_p = [x.clone() for x in p.plastic.parameters()]
        old_s = [x.clone() for x in p.stable.parameters()]
        theta = [x.detach().clone() for x in model.parameters()]
        p.after_training_iteration(s)
        u = torch.rand(2, generator=torch.Generator().manual_seed(0).set_state(gstate))
        for which, copy_, old, prob, cap in ((0, p.plastic, old_p, 0.8, 0.6),
                                             (1, p.stable, old_s, 0.6, 0.999)):
            alpha = min(1 - 1 / (t + 1), cap)
            updated = bool(u[which] < prob)
            assert p.last_updates[which] == updated
            n_updates[which] += updated
            for new, o, th in zip(copy_.parameters(), old, theta):
                expect = alpha * o + (1 - alpha) * th if updated else o
                torch.testing.assert_close(new, expect, atol=1e-6, rtol=1e-6)
    assert sum(n_updates) > 0


def test_clser_targets_come_from_the_copy_with_higher_diagonal_probability(monkeypatch):
    model = tiny_model()
    s = FakeStrategy(model)
    p = CLSERPlugin(mem_size=16, seed=0)
    p.before_training(s)
    e = torch.eye(3)
    planted = {  # plastic: right on items 0, 1; stable: right on item 2 (and scaled by 2)
        id(p.plastic): (e.clone(), torch.stack([e[0], e[1], e[0]])),
        id(p.stable): (2 * e, 2 * torch.stack([e[1], e[0], e[2]])),
    }
    monkeypatch.setattr(clser_mod, "masked_embeddings", lambda m, v, a, **kw: planted[id(m)])
    rep = {"video": torch.zeros(3, 1), "audio": torch.zeros(3, 1)}
    target_a, target_v = p.targets(s, rep)
    expect = torch.stack([e[0], e[1], 2 * e[2]])
    torch.testing.assert_close(target_v, expect)
    torch.testing.assert_close(target_a, expect)


# ------------------------------------------------------------------------------------------ ESMER
def test_esmer_downweights_and_skips_high_loss_samples():
    model = tiny_model()
    s = FakeStrategy(model)
    p = ESMERPlugin(mem_size=16, seed=0)
    p.before_training(s)
    # empty buffer: plain unweighted loss
    s.step([p], rand_batch(model, N, start=0, seed=1))
    torch.testing.assert_close(s.loss, torch.zeros(1) + s.mb_output["loss"])
    assert p.loss_mean > 0 and p.buffer.seen == N

    p.loss_mean, p.step = 1.0, 1
    planted = torch.tensor([0.5, 1.0, 3.0, 10.0])
    p.ema_losses = lambda strategy, video, audio: planted.clone()
    s.forward_part([p], rand_batch(model, N, start=10, seed=2))
    torch.testing.assert_close(p.weights, torch.tensor([1.0, 1.0, 1 / 3, 0.1]))
    per = s.mb_output["per_sample_loss"].detach()
    w = torch.cat([p.weights, torch.ones(N)])
    torch.testing.assert_close(s.loss.detach(), (w * per).mean().reshape(1) + p.last_penalty)
    assert float(p.last_penalty) > 0
    # running mean: 10 is an outlier (> mean + std of the batch), a = min(1 - 1/2, 0.99) = 0.5
    assert math.isclose(p.loss_mean, 0.5 * 1.0 + 0.5 * 1.5, rel_tol=1e-6)
    p.after_training_iteration(s)
    # only the samples under margin·μ were offered to the reservoir
    assert p.buffer.seen == N + 2
    assert stored_indices(p) == {0, 1, 2, 3, 10, 11}


# ------------------------------------------------------------------------------------------ smoke
class _DictSet(torch.utils.data.Dataset):
    def __init__(self, model, n: int, task: int) -> None:
        self.b = rand_batch(model, n, start=100 * task, seed=50 + task)
        self.b["category"] = torch.full((n,), task, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.b["index"])

    def __getitem__(self, i: int) -> dict:
        return {k: v[i] for k, v in self.b.items()}


class _LossSpy(SupervisedPlugin):
    """Records the final training loss of every iteration (placed after the baseline plugin)."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []

    def before_backward(self, strategy, **kw) -> None:
        self.losses.append(float(strategy.loss.detach().sum()))


@pytest.mark.parametrize("cls", [ERPlugin, DERPPPlugin, LUMPPlugin, MIRPlugin, GMEDPlugin, CLSERPlugin,
                                 ESMERPlugin])
def test_every_plugin_trains_two_experiences(cls):
    from avalanche.benchmarks import benchmark_from_datasets
    from avalanche.benchmarks.utils import AvalancheDataset

    from stella_avalanche.training.template import AudioVideoPretraining

    model = tiny_model()
    wrap = lambda d: AvalancheDataset([d], collate_fn=torch.utils.data.default_collate)  # noqa: E731
    bm = benchmark_from_datasets(train=[wrap(_DictSet(model, 8, t)) for t in range(2)])
    plugin, spy = cls(mem_size=32, seed=0), _LossSpy()
    strategy = AudioVideoPretraining(model=model, train_mb_size=N, train_epochs=1, eval_mb_size=N,
                                     device="cpu", plugins=[plugin, spy], seed=0)
    for exp in bm.train_stream:
        strategy.train(exp)
    assert len(spy.losses) == 4 and all(math.isfinite(x) for x in spy.losses)
    assert 0 < len(plugin.buffer) <= 16 and plugin.step == 4
    clone = cls(mem_size=32, seed=1)
    clone.load_state_dict(plugin.state_dict())
    assert clone.buffer.seen == plugin.buffer.seen
    for k, v in plugin.buffer.data.items():
        assert torch.equal(clone.buffer.data[k], v)


def test_plugins_are_distributed_aware_and_lazily_exported():
    import stella_avalanche.training.plugins as plugins

    for name in ("ERPlugin", "DERPPPlugin", "LUMPPlugin", "MIRPlugin", "GMEDPlugin", "CLSERPlugin",
                 "ESMERPlugin"):
        cls = getattr(plugins, name)
        assert cls.supports_distributed, name
        assert cls().buffer_bytes_per_item is None  # no shapes before the first insertion
    with pytest.raises(AttributeError):
        plugins.NoSuchPlugin  # noqa: B018


# ------------------------------------------------------------------------------------------ injected storage
def test_replay_plugins_use_an_injected_storage_as_their_buffer_and_codec():
    """A ReplayStorage given to a plugin holds its items (Avalanche's storage policy): its capacity is
    the plugin's memory, its codec stores the rows; the default equals an explicit default storage."""
    from stella_avalanche.training.item_codec import ClipCodec
    from stella_avalanche.training.replay_storage import ReplayStorage
    from stella_avalanche.utils import derive_seed

    model = tiny_model()
    storage = ReplayStorage(capacity=5, codec=ClipCodec(compact=False), seed=11)
    p = ERPlugin(mem_size=2000, seed=0, storage=storage)
    assert p.mem_size == 5 and p.storage is storage and p.codec is storage.codec and p.buffer is None
    s = FakeStrategy(model, lr=0.0)
    s.step([p], rand_batch(model, 4, start=0, seed=1))
    s.step([p], rand_batch(model, 4, start=4, seed=2))
    assert p.buffer is storage.buffer and len(storage) == 5 and storage.buffer.capacity == 5
    assert storage.buffer.data["video"].dtype == torch.float32  # the injected fp32 codec, not the compact default
    default = ERPlugin(mem_size=5, seed=3)
    explicit = ERPlugin(mem_size=5, seed=3, storage=ReplayStorage(
        capacity=5, codec=ClipCodec(compact=True), seed=derive_seed(3, ERPlugin.seed_purposes[1])))
    for q in (default, explicit):
        q.insert(rand_batch(model, 8, start=0, seed=4), torch.device("cpu"))
    assert torch.equal(default.buffer.data["video"], explicit.buffer.data["video"])
    assert torch.equal(default.storage.generator.get_state(), explicit.storage.generator.get_state())
