"""Procedural audio-visual benchmark: class vocabulary, clip rendering, media + manifest writer.

The generator makes the STELLA problem real at small scale (``docs/benchmarks.md`` §7, which also
names the settings calibration runs found necessary; ``docs/synthetic.md``):

* **Classes** = visual identity (shape x texture x palette colour) + sound identity (1-3 harmonic
  partial bands with an amplitude-modulation timbre), grouped into tasks. Class ``j`` of task ``t``
  shares its *visual* identity with class ``j`` of task ``t + twin_offset`` but has a different sound,
  so learning the later pairing overwrites the earlier one (multimodal correlation overwriting).
* **Clip** = ``num_segments`` segments of ``segment_seconds``; the sounding object (20-32 px, straight
  path) is visible in a random 1..S-1 of the segments, and its sound is on in exactly those segments.
  Instance cues shared by both modalities: the on/off pattern, pitch shift by the object's mean height,
  loudness by its size. A faint full-frame tint marks the sounding frames.
* **Clutter**: an optional static silent distractor (another class's visual), a dark gradient
  background, pixel noise; an audio noise floor with a random spectral tilt and occasional off-screen
  sounds (a band with no visual counterpart).

Media are written in the prepared-VGGSound layout (``frames/<key>/frame_<i>.jpg`` + ``audio/<key>.wav``
+ header-less 6-field split CSVs + a label CSV), so the real loading path runs end to end. Audio and
video are time-aligned: the loader's window starts at 0 and spans the whole clip (see
``FeatureConfig.synthetic()``). Only the frames the loader reads are stored: frame ``i`` shows time
``i / frames_fps``, and the loader samples the start of each segment.

Everything is deterministic in ``(seed, split, class, clip index)``: every clip draws from its own
``numpy.random.Generator`` seeded with a ``SeedSequence`` of those values (disjoint per split), JPEG (PIL)
and PCM wav are deterministic encoders, and the ground truth is written as sorted JSON, so the same seed
gives byte-identical files.

Layout (one concern per module; no module of this package imports the package's ``__init__``):

* :mod:`.preset` - :class:`SyntheticPreset`, the named presets, :data:`SYNTHETIC_VERSION`;
* :mod:`.vocabulary` - identity families, class identities, the mel grid, :func:`build_vocabulary`;
* :mod:`.rendering` - :func:`render_clip`, the per-clip generators, the JPEG / wav encoders;
* :mod:`.writer` - :func:`generate_synthetic` (the on-disk data set) and its ground truth;
* :mod:`.samples` - in-memory samples through the dataset transform, :func:`render_split`;
* :mod:`.transfer` - the ``transfer`` split (classes neither the stream nor the init uses);
* :mod:`.init_stream` - the initialisation stream and its held-out pool.
"""
from stella_avalanche.data.synthetic.init_stream import (SyntheticInitDataset, SyntheticInitRetrievalDataset,
                                                         init_exclusions, init_render_preset, render_init_clip)
from stella_avalanche.data.synthetic.preset import PRESETS, SYNTHETIC_VERSION, SyntheticPreset, get_preset
from stella_avalanche.data.synthetic.rendering import RenderedClip, clip_rng, frame_indices, jpeg_roundtrip, render_clip
from stella_avalanche.data.synthetic.samples import check_features, default_features, render_split, sample_from_clip
from stella_avalanche.data.synthetic.vocabulary import (COLOUR_NAMES, PALETTE, SHAPES, TEXTURES, TIMBRES, ClassSpec,
                                                        SoundIdentity, SoundKey, VisualIdentity, Vocabulary,
                                                        build_vocabulary, clutter_pools, random_identity, sound_key)
from stella_avalanche.data.synthetic.writer import (INIT_ONLY_FIELDS, LABEL_CSV, SPLITS, clip_key, generate_synthetic,
                                                    is_complete, load_ground_truth, synthetic_root, truth_patch_mask)

__all__ = [
    "SYNTHETIC_VERSION",
    "SyntheticPreset",
    "PRESETS",
    "get_preset",
    "VisualIdentity",
    "SoundIdentity",
    "ClassSpec",
    "Vocabulary",
    "build_vocabulary",
    "clutter_pools",
    "RenderedClip",
    "render_clip",
    "clip_rng",
    "frame_indices",
    "generate_synthetic",
    "synthetic_root",
    "is_complete",
    "load_ground_truth",
    "truth_patch_mask",
    "SPLITS",
    "SyntheticInitDataset",
    "SyntheticInitRetrievalDataset",
    "default_features",
    "clip_key",
    "random_identity",
    "render_init_clip",
    "init_exclusions",
    "sound_key",
    "render_split",
    "jpeg_roundtrip",
    "LABEL_CSV",
    "SHAPES",
    "TEXTURES",
    "PALETTE",
    "COLOUR_NAMES",
    "TIMBRES",
    "SoundKey",
    "INIT_ONLY_FIELDS",
    "init_render_preset",
    "check_features",
    "sample_from_clip",
]
