#!/usr/bin/env bash
# Issue 27 items 3-4 in one device call: end to end from media, evaluation, checkpoint, and the projected
# runs (docs/results/gpu_step.md, "End to end from media and the projected run: how to measure").
#   here:    PYTHON=<venv python> benchmarks/perf/gpu_bundle.sh --media        # .gpu_site.tgz
#   device:  COMMIT=<hash> bash benchmarks/perf/gpu_e2e.sh     carry [".gpu_site.tgz"], timeout_s 600
# Writes to $OUT (6 files): gpu_e2e.log, stream.json, e2e.json, projection.json, projection.md and, when
# the time allows, e2e_cache.json (the decode-once feature cache's build and loader, one task).
# The media (about 8 GB), the checkpoints of e2e_media.py and the feature cache go to a scratch folder
# (mktemp -d: the machine's temp directory), never to $OUT.
# Knobs (environment): SCRATCH, MEDIA, LIMIT (seconds this script may take, 570), BUDGET (e2e_media.py starts no
# strategy after it, 300), BATCHES ("48 36": Continual-VS, Continual-AS), CACHE_NEEDS (seconds the
# cache step needs, 150), SMOKE=1 (a CPU rehearsal: tiny stream and model).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:?OUT must name the output folder}
SCRATCH=${SCRATCH:-$(mktemp -d)}
MEDIA=${MEDIA:-$SCRATCH/stella_media}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-570}
BUDGET=${BUDGET:-300}
BATCHES=${BATCHES:-48 36}
CACHE_NEEDS=${CACHE_NEEDS:-150}
COMMIT_ARGS=()
[ -n "${COMMIT:-}" ] && COMMIT_ARGS=(--commit "$COMMIT")   # the device copy has no .git
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/gpu_e2e.log") 2>&1
[ -d .gpu_site ] || { [ -f .gpu_site.tgz ] && tar xzf .gpu_site.tgz; }
SITE=(--site .gpu_site --stub-missing)
SMOKE_ARGS=()
STREAM_ARGS=(--workers "$(nproc --all)")
CACHE_ARGS=(--batch "${BATCHES%% *}" --loader-batches 9)   # 9 x 48 of the task's 480 training clips
if [ "${SMOKE:-0}" = 1 ]; then
    SMOKE_ARGS=(--smoke --device cpu); STREAM_ARGS+=(--smoke); BATCHES=2; CACHE_ARGS=(--batch 1 --loader-batches 2)
fi
left() { echo $((LIMIT - SECONDS)); }

echo "== 0. preflight: the data path's decoders on one clip (decord, torchaudio's fbank, torchvision's JPEG)"
$PY - <<'PY' || exit 1
import sys, tempfile, wave
from pathlib import Path
sys.path[:0] = [".gpu_site", "."]
import numpy as np, torch
from PIL import Image
from stella_avalanche.data import media
from stella_avalanche.data.features import FeatureConfig, compute_fbank, load_waveform
cfg = FeatureConfig.paper()
d = Path(tempfile.mkdtemp())
for i in range(4):
    Image.fromarray(np.full((256, 256, 3), 60 * i, np.uint8)).save(d / f"frame_{i}.jpg")
with wave.open(str(d / "a.wav"), "wb") as w:
    w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
    w.writeframes((np.sin(np.arange(16000) / 5) * 8000).astype(np.int16).tobytes())
f = media.read_frames(d, [0, 0.125, 0.25, 0.375], cfg)
a = compute_fbank(load_waveform(d / "a.wav", cfg), cfg)
print("preflight ok:", tuple(f.shape), tuple(a.shape), "torch", torch.__version__,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")
PY

echo "== 1. the stream ($(left) s left)"
$PY benchmarks/perf/make_media_stream.py --out "$MEDIA" "${STREAM_ARGS[@]}" || exit 1
cp "$MEDIA/stream.json" "$OUT/stream.json"

echo "== 2. e2e_media.py, batches $BATCHES ($(left) s left)"
# the JSON is rewritten after every measurement: a run stopped by the timeout keeps what it measured
timeout --signal=TERM $(( $(left) > 60 ? $(left) - 40 : 20 )) $PY benchmarks/perf/e2e_media.py "${SITE[@]}" "${SMOKE_ARGS[@]}" \
    --data "$MEDIA" --out "$OUT/e2e.json" --batch $BATCHES --budget-s "$BUDGET" "${COMMIT_ARGS[@]}" --scratch "$SCRATCH"
echo "e2e_media.py exit status $?"

echo "== 3. projection ($(left) s left)"
$PY benchmarks/perf/project_run.py --site .gpu_site "$OUT/e2e.json" \
    --suite docs/results/gpu/2026-11-30_suite_full.json --out "$OUT/projection.json" | tee "$OUT/projection.md"

if [ "$(left)" -gt "$CACHE_NEEDS" ]; then
    echo "== 4. feature cache: build and loader alone, one task ($(left) s left)"
    timeout --signal=TERM $(( $(left) > 20 ? $(left) - 10 : 10 )) $PY benchmarks/perf/e2e_media.py "${SITE[@]}" "${SMOKE_ARGS[@]}" \
        --data "$MEDIA" --out "$OUT/e2e_cache.json" --cache "$SCRATCH/stella_cache" --tasks others_part1 \
        --strategies --no-eval "${CACHE_ARGS[@]}" "${COMMIT_ARGS[@]}"
    echo "cache step exit status $?"
else
    echo "== 4. feature cache: skipped ($(left) s left, $CACHE_NEEDS needed)"
fi
echo "== done in $SECONDS s"
