#!/usr/bin/env bash
# Install detectron2 0.6 into the active Python environment.
#
# detectron2 is not published on PyPI. PyPI's `pb1-detectron2==0.6` is an sdist
# of detectron2 v0.6 whose Python sources match the upstream tag, but it lacks
# the C++/CUDA sources, so its declared extension cannot be built. We build it
# without that extension; kd_det registers a placeholder for `detectron2._C`
# (rotated boxes, deformable conv and the fast COCO evaluator need it, nothing
# this project uses does). Users with a full detectron2 build keep theirs.
#
# The sdist carries the model-zoo configs in detectron2/model_zoo/configs/, but
# its setup.py lists them relative to a top-level configs/ folder that the sdist
# does not have, so pip installs none of them and
# detectron2.model_zoo.get_config_file() fails. After installing, we copy them
# into the installed package. A detectron2 that is already installed but lacks
# them (e.g. installed by an earlier version of this script) gets only the copy.
#
# Environment: PYTHON (default: python) is the interpreter to install into.
set -euo pipefail
PY=${PYTHON:-python}
# A file every complete detectron2 0.6 install has (relative to the package dir).
SENTINEL=model_zoo/configs/COCO-Detection/retinanet_R_50_FPN_3x.yaml

d2_dir() {
  # Importing the top-level package only: it does not need detectron2._C.
  "$PY" -c 'import os, detectron2; print(os.path.dirname(os.path.abspath(detectron2.__file__)))'
}

work=""
fetch_sdist() {
  # Download and unpack the sdist into a temp dir; sets $src to its root.
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # --no-build-isolation: the sdist's setup.py imports torch even to read its metadata.
  "$PY" -m pip download --no-deps --no-build-isolation --no-binary :all: -d "$work" pb1-detectron2==0.6
  tar -xzf "$work"/pb1-detectron2-0.6.tar.gz -C "$work" 2>/dev/null || tar -xzf "$work"/pb1_detectron2-0.6.tar.gz -C "$work"
  src=$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n 1)
}

copy_model_zoo_configs() {
  local from="$src/detectron2/model_zoo/configs"
  local to
  to="$(d2_dir)/model_zoo/configs"
  if [ ! -d "$from" ]; then
    echo "error: the sdist has no detectron2/model_zoo/configs/ ($from)" >&2
    exit 1
  fi
  mkdir -p "$to"
  cp -R "$from"/. "$to"/
  echo "copied detectron2 model-zoo configs into $to"
}

if "$PY" -c "import detectron2" 2>/dev/null; then
  version=$("$PY" -c 'import detectron2; print(detectron2.__version__)')
  if [ -f "$(d2_dir)/$SENTINEL" ]; then
    echo "detectron2 already installed: $version"
    exit 0
  fi
  case "$version" in
    0.6|0.6.*) ;;
    *)
      echo "detectron2 $version is installed without its model-zoo configs; this script only has 0.6's, left as is" >&2
      exit 0
      ;;
  esac
  echo "detectron2 $version is installed without its model-zoo configs; adding them"
  fetch_sdist
  copy_model_zoo_configs
  exit 0
fi

fetch_sdist
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
copy_model_zoo_configs
"$PY" -c "import detectron2; print('detectron2', detectron2.__version__, 'installed')"
