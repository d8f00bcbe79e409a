"""Probe: where does a backbone keep (or lose) the on/off pattern that audio and video share?

The synthetic benchmark's transferable cue is *which* segments of a clip show the object and sound
it (docs/synthetic.md). This probe renders the stream's retrieval clips, runs the backbone's unimodal
fusion pass on full clips, and fits a logistic regression (5-fold cross-validation) for each
segment's on/off bit from three views of each modality's tokens:

- ``segment``: the concatenated means of each time segment's tokens (what is in the tokens);
- ``global``: the mean of all tokens (the paper's retrieval pooling);
- ``embedding``: the model's own retrieval embedding (``model.embed``: ``embed_segments`` pooling).

It prints one JSON object: the balanced accuracy per bit for each view and modality (0.5 = the bit is
not there) and the embedding's pair AUC (own partner against same-class / other-class clips).

    python experiments/probe_pattern.py                      # the cached default initialisation
    python experiments/probe_pattern.py --backbone runs/s1/backbone_step1000.pt --model-override embed_segments=4
    python experiments/probe_pattern.py --random             # an untrained backbone
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

import numpy as np
import torch

from stella_avalanche.config import field_override


def pattern_probe(model: torch.nn.Module, clips: dict, *, folds: int = 5) -> dict:
    """Balanced accuracy of each on/off bit from the segment means, the global mean and the embedding.

    :param clips: ``render_split`` output (``video``, ``audio``, ``label``, ``truth`` with ``pattern``).
    :returns: ``{modality: {view: [accuracy per segment]}}`` plus ``pair_auc`` of the embedding.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    from stella_avalanche.evaluation.diagnostics import embed_clips, pair_auc

    pattern = np.array([t["pattern"] for t in clips["truth"]], dtype=int)     # (N, segments)
    n_seg = pattern.shape[1]

    def accuracy(x: torch.Tensor) -> list[float]:
        out = []
        for k in range(n_seg):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence chatter on easy folds
                out.append(round(float(cross_val_score(LogisticRegression(max_iter=3000), x.numpy(), pattern[:, k],
                                                       cv=folds, scoring="balanced_accuracy").mean()), 3))
        return out

    was = model.training
    model.eval()
    result: dict = {}
    z_a, z_v = embed_clips(model, clips["video"], clips["audio"])
    with torch.no_grad():
        for m, x, z in (("audio", clips["audio"], z_a), ("video", clips["video"], z_v)):
            patches = model.patchify_audio(x) if m == "audio" else model.patchify_video(x)
            tokens = model.fuse_unimodal(model.encode_modality(patches, None, m), None, m, final_norm=False)
            b, k, d = tokens.shape  # both modalities are segment-major (frames / time tokens first)
            segments = tokens.view(b, n_seg, k // n_seg, d).mean(dim=2)
            result[m] = {"segment": accuracy(segments.reshape(b, -1)), "global": accuracy(tokens.mean(dim=1)),
                         "embedding": accuracy(z)}
    model.train(was)
    result["pair_auc"] = {k: round(v, 4) for k, v in pair_auc(z_a, z_v, clips["label"]).items()}
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None, help="stage-1 checkpoint (default: the cached synthetic init)")
    p.add_argument("--random", action="store_true", help="probe an untrained backbone instead")
    p.add_argument("--preset", default="default", help="synthetic preset")
    p.add_argument("--seed", type=int, default=0, help="data seed (and the init's)")
    p.add_argument("--per-class", type=int, default=10, help="stream retrieval clips per class")
    p.add_argument("--model-override", nargs="*", default=[], metavar="FIELD=VALUE", type=field_override,
                   help="tiny-preset fields, e.g. embed_segments=1 (values parsed as YAML)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from stella_avalanche.data import synthetic as S
    from stella_avalanche.models.cav import CAVMAE
    from stella_avalanche.models.config import model_config_for
    from stella_avalanche.models.loading import load_backbone_weights
    from stella_avalanche.training.pretrain import synthetic_initialisation

    cfg = model_config_for("tiny", S.default_features(args.preset), **dict(args.model_override))
    torch.manual_seed(args.seed)
    model = CAVMAE(cfg)
    if not args.random:
        path = args.backbone or synthetic_initialisation(cfg, preset=args.preset, seed=args.seed)["backbone"]
        load_backbone_weights(model, path)
    clips = S.render_split(args.preset, args.seed, "retrieval", per_class=args.per_class)
    out = {"backbone": "random" if args.random else str(path), "clips": int(clips["label"].numel()),
           "embed_segments": cfg.embed_segments, **pattern_probe(model, clips)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
