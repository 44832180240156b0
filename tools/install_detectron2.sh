#!/usr/bin/env bash
# Install detectron2 0.6 into the active Python environment.
#
# detectron2 is not published on PyPI. PyPI's `pb1-detectron2==0.6` is an sdist
# of detectron2 v0.6 whose Python sources match the upstream tag, but it lacks
# the C++/CUDA sources, so its declared extension cannot be built. We build it
# without that extension; kd_det registers a placeholder for `detectron2._C`
# (rotated boxes, deformable conv and the fast COCO evaluator need it, nothing
# this project uses does). Users with a full detectron2 build keep theirs.
set -euo pipefail
PY=${PYTHON:-python}
if "$PY" -c "import detectron2" 2>/dev/null; then
  echo "detectron2 already installed: $("$PY" -c 'import detectron2; print(detectron2.__version__)')"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# --no-build-isolation: the sdist's setup.py imports torch even to read its metadata.
"$PY" -m pip download --no-deps --no-build-isolation --no-binary :all: -d "$work" pb1-detectron2==0.6
tar -xzf "$work"/pb1-detectron2-0.6.tar.gz -C "$work" 2>/dev/null || tar -xzf "$work"/pb1_detectron2-0.6.tar.gz -C "$work"
src=$(find "$work" -maxdepth 1 -mindepth 1 -type d | head -n 1)
# Drop the C++ extension (its sources are not in the sdist).
"$PY" - "$src/setup.py" <<'PYEOF'
import re, sys
p = sys.argv[1]
s = open(p).read()
s2 = re.sub(r"ext_modules\s*=\s*get_extensions\(\)", "ext_modules=[]", s)
if s2 == s:
    raise SystemExit("could not find ext_modules=get_extensions() in " + p)
open(p, "w").write(s2)
PYEOF
"$PY" -m pip install --no-build-isolation --no-deps "$src"
"$PY" -c "import detectron2; print('detectron2', detectron2.__version__, 'installed')"
