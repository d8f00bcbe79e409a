"""Do background video tokens know whether the object shows in their frame? Linear probe per token
feature source (codes / unimodal fusion / joint fusion) on the stream retrieval clips."""
import json, torch, numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from stella_avalanche.training import pretrain as P
from stella_avalanche.data import synthetic as S
from stella_avalanche.experiment import model_config_for
from stella_avalanche.models.cav import CAVMAE
from stella_avalanche.models.loading import load_backbone_weights
from stella_avalanche.evaluation import diagnostics as D
torch.set_num_threads(1)
cfg = model_config_for('tiny', S.default_features('default'))
paths = P.synthetic_initialisation(cfg, preset='default', progress=False)
model = CAVMAE(cfg); load_backbone_weights(model, paths['backbone']); model.eval()
clips = S.render_split('default', 0, 'retrieval', per_class=10)
gt = D.truth_masks(clips["truth"], image_size=S.get_preset('default').image_size, patch_size=cfg.patch_size, frame_size=cfg.img_size,
                   audio_time_tokens=cfg.audio_time_tokens, audio_freq_tokens=cfg.audio_freq_tokens)
n, L = gt["video"].shape; T = cfg.num_frames; per = L // T
obj = gt["video"].view(n, T, per)
frame_vis = obj.any(-1, keepdim=True).expand(-1, -1, per).reshape(n, L)
with torch.no_grad():
    U_a = model.encode_modality(model.patchify_audio(clips["audio"]), None, "audio")
    U_v = model.encode_modality(model.patchify_video(clips["video"]), None, "video")
    feats = {"codes": U_v, "unimodal": model.fuse_unimodal(U_v, None, "video", final_norm=False),
             "joint": model.fuse_joint(U_a, None, U_v, None)[1]}
tr = torch.arange(n) < int(0.67 * n)
bg = ~gt["video"]
out = {"frames_with_object": float(frame_vis[:, ::per].float().mean())}
for name, F in feats.items():
    X = F.numpy(); y = frame_vis.numpy(); m = bg.numpy()
    Xtr = X[tr.numpy()][m[tr.numpy()]]; ytr = y[tr.numpy()][m[tr.numpy()]]
    Xte = X[~tr.numpy()][m[~tr.numpy()]]; yte = y[~tr.numpy()][m[~tr.numpy()]]
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(Xtr, ytr)
    # second probe: is this token on the object? (all tokens of frames that show it)
    fm = frame_vis.numpy()
    Xo_tr = X[tr.numpy()][fm[tr.numpy()]]; yo_tr = gt["video"].numpy()[tr.numpy()][fm[tr.numpy()]]
    Xo_te = X[~tr.numpy()][fm[~tr.numpy()]]; yo_te = gt["video"].numpy()[~tr.numpy()][fm[~tr.numpy()]]
    clf2 = LogisticRegression(max_iter=2000, C=1.0).fit(Xo_tr, yo_tr)
    out[name] = {"background_token_knows_frame_shows_object_bal_acc": round(balanced_accuracy_score(yte, clf.predict(Xte)), 3),
                 "token_is_on_object_bal_acc": round(balanced_accuracy_score(yo_te, clf2.predict(Xo_te)), 3)}
print(json.dumps(out, indent=1))
