"""Does the AVM carry class (appearance<->sound) information, or only the instance on/off pattern?
Matching logits of mismatched pairs whose on/off patterns are identical: same class vs other class."""
import json, sys, torch, numpy as np
from sklearn.metrics import roc_auc_score
torch.set_num_threads(2)
from stella_avalanche.data import synthetic as S
from stella_avalanche.evaluation.diagnostics import load_models, avm_projections
ckpt = sys.argv[1] if len(sys.argv) > 1 else None
model, avm, src = load_models(checkpoint=ckpt)
clips = S.render_split("default", 0, "retrieval", per_class=10)
pat = [tuple(t["pattern"]) for t in clips["truth"]]
lab = clips["label"].numpy()
n = len(pat)
rng = np.random.default_rng(0)
same_cls, other_cls = [], []
for i in range(n):
    cands_s = [j for j in range(n) if j != i and pat[j] == pat[i] and lab[j] == lab[i]]
    cands_o = [j for j in range(n) if pat[j] == pat[i] and lab[j] != lab[i]]
    if cands_s and cands_o:
        same_cls.append((i, rng.choice(cands_s))); other_cls.append((i, rng.choice(cands_o)))
# compute per pair: audio row a with video row v
def pair_logits(pairs):
    a = torch.tensor([p[0] for p in pairs]); v = torch.tensor([p[1] for p in pairs])
    out = avm_projections(model, avm, clips["video"][v], clips["audio"][a])
    return out["logit"].numpy()
own = avm_projections(model, avm, clips["video"], clips["audio"])["logit"].numpy()
ls, lo = pair_logits(same_cls), pair_logits(other_cls)
res = {"source": src, "pairs": len(same_cls), "own_mean": float(own.mean()), "same_class_same_pattern_mean": float(ls.mean()),
       "other_class_same_pattern_mean": float(lo.mean()),
       "auc_same_vs_other_class": float(roc_auc_score(np.r_[np.ones(len(ls)), np.zeros(len(lo))], np.r_[ls, lo])),
       "auc_own_vs_same_class_same_pattern": float(roc_auc_score(np.r_[np.ones(n), np.zeros(len(ls))], np.r_[own, ls]))}
print(json.dumps(res))
