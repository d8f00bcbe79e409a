"""The keys of the sample / mini-batch dicts (``docs/contracts.md``), named once.

Per-sample keys come from the datasets; the keep / patch keys are written by plugins during a
training step and passed to the model by the strategy's ``forward``.
"""
from __future__ import annotations

__all__ = ["VIDEO", "AUDIO", "CATEGORY", "LABEL", "INDEX", "VIDEO_KEEP", "AUDIO_KEEP", "VIDEO_PATCHES",
           "AUDIO_PATCHES", "SKIPPED", "SAMPLE_KEYS", "KEEP_KEYS", "PATCH_KEYS", "MODEL_INPUT_KEYS"]

VIDEO = "video"            #: (B, T, 3, S, S) float32, ImageNet-normalised frames
AUDIO = "audio"            #: (B, 1, A, F) float32, normalised log-mel fbank
CATEGORY = "category"      #: (B,) int64 task id
LABEL = "label"            #: (B,) int64 class id or (B, C) float32 multi-hot
INDEX = "index"            #: (B,) int64 position in the dataset
VIDEO_KEEP = "video_keep"  #: (B, K_V) int64 kept video-patch ids (plugins)
AUDIO_KEEP = "audio_keep"  #: (B, K_A) int64 kept audio-patch ids (plugins)
VIDEO_PATCHES = "video_patches"  #: (B, K_V, 3 p^2) rows given as patches (STELLA+ replay)
AUDIO_PATCHES = "audio_patches"  #: (B, K_A, p^2)
#: not a tensor: clips dropped from this batch because they failed to decode (``on_error="skip"``);
#: the strategy removes it before plugins see the batch
SKIPPED = "skipped_clips"

#: what every sample of an ``AudioVideoDataset`` holds
SAMPLE_KEYS = (VIDEO, AUDIO, CATEGORY, LABEL, INDEX)
#: kept-patch ids written by a patch-selecting plugin
KEEP_KEYS = (VIDEO_KEEP, AUDIO_KEEP)
#: rows given as selected patches instead of full clips
PATCH_KEYS = (VIDEO_PATCHES, AUDIO_PATCHES)
#: batch keys a conforming strategy forwards to ``model.pretrain_forward``
MODEL_INPUT_KEYS = (VIDEO, AUDIO, *KEEP_KEYS, *PATCH_KEYS)
