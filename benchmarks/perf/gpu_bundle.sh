#!/usr/bin/env bash
# Copy the packages the GPU machine's image lacks from this machine's venv into .gpu_site/ (git-ignored):
#   benchmarks/perf/gpu_bundle.sh            avalanche-lib and dill (the training step: gpu_suite.py)
#   benchmarks/perf/gpu_bundle.sh --media    also decord with its FFmpeg libraries and omegaconf (the data
#                                            path and the config loader: e2e_media.py, gpu_e2e.sh), packed
#                                            into .gpu_site.tgz (about 15 MB; the unpacked folder, about
#                                            45 MB, would crowd the 64 MiB carry limit beside the tree)
# then, on the GPU machine (carrying .gpu_site, or .gpu_site.tgz which gpu_e2e.sh unpacks):
#   python3 benchmarks/perf/gpu_suite.py --site .gpu_site --stub-missing --out $OUT/gpu_suite.json
# decord is loaded through ctypes (no CPython extension), so a copy from this Python 3.11 venv runs
# under the image's Python 3.12; its FFmpeg libraries sit in decord.libs beside it (the RPATH).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
MEDIA=0
[ "${1:-}" = "--media" ] && MEDIA=1
SITE=$("$PY" -c "import avalanche, os; print(os.path.dirname(os.path.dirname(avalanche.__file__)))")
PKGS="avalanche dill"
[ "$MEDIA" = 1 ] && PKGS="$PKGS decord decord.libs omegaconf"
rm -rf .gpu_site .gpu_site.tgz
mkdir -p .gpu_site
for p in $PKGS; do cp -r "$SITE/$p" .gpu_site/; done
find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
if [ "$MEDIA" = 1 ]; then
    tar czf .gpu_site.tgz .gpu_site
    du -sh .gpu_site.tgz
else
    du -sh .gpu_site
fi
