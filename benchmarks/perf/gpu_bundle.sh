#!/usr/bin/env bash
# Copy avalanche-lib and dill from this machine's venv into .gpu_site/ (git-ignored through
# .git/info/exclude), for a GPU machine whose image lacks them:
#   benchmarks/perf/gpu_bundle.sh
#   (on the GPU machine, carrying .gpu_site)
#   python3 benchmarks/perf/gpu_suite.py --site .gpu_site --stub-missing --out $OUT/gpu_suite.json
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
SITE=$("$PY" -c "import avalanche, os; print(os.path.dirname(os.path.dirname(avalanche.__file__)))")
rm -rf .gpu_site
mkdir -p .gpu_site
cp -r "$SITE/avalanche" "$SITE/dill" .gpu_site/
find .gpu_site -name __pycache__ -prune -exec rm -rf {} +
grep -qx '/.gpu_site/' .git/info/exclude 2>/dev/null || echo '/.gpu_site/' >> .git/info/exclude
du -sh .gpu_site
