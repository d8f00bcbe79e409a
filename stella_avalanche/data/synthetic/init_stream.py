"""Initialisation data: the init stream and its held-out pool, rendered in memory and never written."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from stella_avalanche.data.synthetic.preset import SyntheticPreset, get_preset
from stella_avalanche.data.synthetic.rendering import RenderedClip, clip_rng, render_clip
from stella_avalanche.data.synthetic.samples import check_features, default_features, sample_from_clip
from stella_avalanche.data.synthetic.transfer import transfer_identities
from stella_avalanche.data.synthetic.vocabulary import (ClassSpec, SoundIdentity, SoundKey, VisualIdentity, Vocabulary,
                                                        build_vocabulary, random_identity, sound_key)

if TYPE_CHECKING:
    from stella_avalanche.data.features import FeatureConfig

__all__ = ["init_exclusions", "init_render_preset", "render_init_clip", "SyntheticInitDataset",
           "SyntheticInitRetrievalDataset"]


def _init_pools(vocab: Vocabulary, class_id: int) -> tuple[list[VisualIdentity], list[SoundIdentity]]:
    spec = vocab.init_classes[class_id]
    visuals = list(dict.fromkeys(c.visual for c in vocab.init_classes if c.visual != spec.visual))
    sounds = [c.sound for c in vocab.init_classes if c.class_id != class_id]
    return visuals, sounds


#: class id used in the clip seed of per-clip-identity init clips (no real class has it)
_PER_CLIP_CLASS = 0xFFFF


def init_exclusions(vocab: Vocabulary, preset: SyntheticPreset, seed: int | None = None
                    ) -> tuple[list[VisualIdentity], list[SoundKey]]:
    """Identities the per-clip init stream never draws: every benchmark class's visual and sound and,
    given the data ``seed``, those of the transfer classes (so transfer retrieval measures classes
    stage 1 never saw; see ``data/synthetic/transfer.py``)."""
    visuals = list(dict.fromkeys(c.visual for c in vocab.classes))
    sounds = [sound_key(c.sound, preset) for c in vocab.classes]
    if seed is not None:
        t = transfer_identities(preset, seed)
        visuals += [VisualIdentity(*v) for v in t.visuals]
        sounds += [sound_key(snd, preset) for snd in t.sounds]
    return visuals, sounds


def init_render_preset(preset: SyntheticPreset) -> SyntheticPreset:
    """The preset the per-clip init stream renders with (its ``init_*`` cue settings applied)."""
    changes = {k: v for k, v in (("tint", preset.init_tint), ("p_distractor", preset.init_p_distractor),
                                 ("p_offscreen", preset.init_p_offscreen)) if v is not None}
    return dataclasses.replace(preset, **changes) if changes else preset


def render_init_clip(vocab: Vocabulary, preset: SyntheticPreset, seed: int, split: str, i: int,
                     exclusions: tuple[list[VisualIdentity], list[SoundKey]] | None = None
                     ) -> tuple[RenderedClip, int]:
    """Clip number ``i`` of an init split (``"init"`` or ``"init_retrieval"``) and its label.

    ``init_identity == "class"``: clip ``i`` belongs to init class ``i % C`` and the label is that
    class. ``"per_clip"``: a fresh identity per clip (outside ``exclusions``, default
    :func:`init_exclusions`), a fresh silent distractor and off-screen sound; the label is ``i``.
    """
    preset = init_render_preset(preset)
    if preset.init_identity == "class":
        c = i % len(vocab.init_classes)
        visuals, sounds = _init_pools(vocab, c)
        return render_clip(vocab.init_classes[c], clip_rng(seed, split, c, i // len(vocab.init_classes)),
                           preset, visuals, sounds), c
    ex_v, ex_s = exclusions if exclusions is not None else init_exclusions(vocab, preset, seed)
    rng = clip_rng(seed, split, _PER_CLIP_CLASS, i)
    visual, sound = random_identity(rng, preset, exclude_visuals=ex_v, exclude_sounds=ex_s)
    d_visual, o_sound = random_identity(rng, preset, exclude_visuals=[*ex_v, visual], exclude_sounds=ex_s)
    spec = ClassSpec(class_id=-1, task=-1, mid="syn_init_clip", visual=visual, sound=sound)
    return render_clip(spec, rng, preset, [d_visual], [o_sound]), i


class SyntheticInitDataset(IterableDataset):
    """Endless, non-repeating stream of initialisation clips (the ``init`` split), rendered in memory.

    Clip ``i`` is :func:`render_init_clip` ``(..., "init", i)``: by default a fresh identity per clip
    (``preset.init_identity``), so the stream is deterministic and identical for any number of
    DataLoader workers (worker ``w`` of ``W`` yields clips ``w, w + W, ...``). Samples are the dicts of
    ``AudioVideoDataset``: ``video`` float32 (T, 3, S, S), ``audio`` float32 (1, A, F), ``category``
    int64 () = 0, ``label`` int64 () = init class id (per-clip identities: the clip number),
    ``index`` int64 () = clip number ``i``.

    :param preset: synthetic preset (sizes, difficulty, number of init classes).
    :param seed: data seed (the vocabulary is the benchmark's vocabulary of this seed).
    :param features: preprocessing config (default: :func:`default_features`).
    :param train: training transform (random crop, fbank noise + roll) or evaluation transform.
    :param start: first clip number (resume a stream).
    :param length: stop after this many clips (``None``: endless).
    :param jpeg: JPEG round trip of the frames, so init frames carry the same artefacts as stored ones.
    """

    def __init__(self, *, preset: str | SyntheticPreset = "default", seed: int = 0,
                 features: "FeatureConfig | None" = None, train: bool = True, start: int = 0,
                 length: int | None = None, jpeg: bool = True) -> None:
        super().__init__()
        self.preset = get_preset(preset)
        self.seed = int(seed)
        self.features = features if features is not None else default_features(self.preset)
        check_features(self.preset, self.features)
        self.train = train
        self.start = int(start)
        self.length = length
        self.jpeg = jpeg
        self.vocab = build_vocabulary(self.preset, self.seed)
        self.num_classes = len(self.vocab.init_classes)
        self._exclusions = init_exclusions(self.vocab, self.preset, self.seed)

    def __len__(self) -> int:
        if self.length is None:
            raise TypeError("endless SyntheticInitDataset has no length (pass length=...)")
        return self.length

    def sample(self, i: int) -> dict[str, torch.Tensor]:
        """Clip number ``i`` as a dict sample (deterministic in ``(seed, i)``)."""
        clip, c = render_init_clip(self.vocab, self.preset, self.seed, "init", i, self._exclusions)
        g = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, 0x1A17, i]).generate_state(1)[0]))
        video, audio = sample_from_clip(clip, self.features, train=self.train,
                                         jpeg_quality=self.preset.jpeg_quality if self.jpeg else None, generator=g)
        return {"video": video, "audio": audio, "category": torch.tensor(0, dtype=torch.int64),
                "label": torch.tensor(c, dtype=torch.int64), "index": torch.tensor(i, dtype=torch.int64)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        stop = None if self.length is None else self.start + self.length
        i = self.start + wid
        while stop is None or i < stop:
            yield self.sample(i)
            i += nw


class SyntheticInitRetrievalDataset(Dataset):
    """Fixed held-out retrieval pool of the init classes (monitoring the initialisation).

    ``init_retrieval_per_class`` clips per init class from the ``init_retrieval`` seed stream (disjoint
    from the init training stream), evaluation transform, rendered once in the constructor.
    Samples as :class:`SyntheticInitDataset` (``category`` 0, ``label`` = init class, ``index``).

    :param preset: synthetic preset.
    :param seed: data seed.
    :param features: preprocessing config (default: :func:`default_features`).
    :param jpeg: JPEG round trip of the frames.
    """

    def __init__(self, *, preset: str | SyntheticPreset = "default", seed: int = 0,
                 features: "FeatureConfig | None" = None, jpeg: bool = True) -> None:
        self.preset = get_preset(preset)
        self.features = features if features is not None else default_features(self.preset)
        check_features(self.preset, self.features)
        vocab = build_vocabulary(self.preset, seed)
        exclusions = init_exclusions(vocab, self.preset, seed)
        videos, audios, labels = [], [], []
        n = len(vocab.init_classes) * self.preset.init_retrieval_per_class
        for i in range(n):
            clip, c = render_init_clip(vocab, self.preset, seed, "init_retrieval", i, exclusions)
            v, a = sample_from_clip(clip, self.features, train=False,
                                     jpeg_quality=self.preset.jpeg_quality if jpeg else None, generator=None)
            videos.append(v)
            audios.append(a)
            labels.append(c)
        self.video = torch.stack(videos)  # (N, T, 3, S, S)
        self.audio = torch.stack(audios)  # (N, 1, A, F)
        self.label = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return int(self.label.numel())

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"video": self.video[i], "audio": self.audio[i], "category": torch.tensor(0, dtype=torch.int64),
                "label": self.label[i], "index": torch.tensor(int(i), dtype=torch.int64)}
