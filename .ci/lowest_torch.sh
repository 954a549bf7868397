#!/usr/bin/env bash
# CI lane "lowest torch" (issue 12 §2): `pip install vefast` into a user's environment.
#
# A fresh venv gets the lowest torch that pyproject.toml supports and the triton that torch itself requires
# (torch's own dependency, not requirements.txt's pin); vefast goes in from the pure-Python wheel that
# `python -m build` makes (sdist, then the wheel from the sdist; no CUDA extension), and pip must keep that
# torch. Then the smoke subset (.ci/smoke_tests.txt) runs from a copy of tests/, outside the source tree,
# so that `import vefast` is the installed wheel (checked).
#
#   bash .ci/lowest_torch.sh            (or: make test-lowest)
# Environment: VEFAST_LOWEST_TORCH (default 2.6.0), PYTHON (creates the venv; default python3),
# BUILD_PYTHON (runs `python -m build`; default .venv/bin/python, which has the pinned `build`),
# VEFAST_LOWEST_KEEP=1 keeps the work directory (its path is printed).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION="${VEFAST_LOWEST_TORCH:-2.6.0}"
PYTHON="${PYTHON:-python3}"
BUILD_PYTHON="${BUILD_PYTHON:-$ROOT/.venv/bin/python}"
unset PYTHONPATH
WORK="$(mktemp -d --suffix=-vefast-lowest-torch)"
if [[ "${VEFAST_LOWEST_KEEP:-0}" == 1 ]]; then
  echo "lowest-torch lane: keeping $WORK"
else
  trap 'rm -rf "$WORK"' EXIT
fi
START=$SECONDS
phase() { echo "lowest-torch lane [$((SECONDS - START)) s]: $*"; }
# pip, quietly: this machine's pip.conf names local indexes that warn about every package they lack.
pip_install() { "$VPY" -m pip install --quiet "$@" 2>&1 | { grep -v '^WARNING: Location .* is ignored' || true; }; }

phase "building the sdist and the pure-Python wheel from a copy of the sources"
mkdir -p "$WORK/src" "$WORK/dist" "$WORK/run"
# The working tree's files (tracked, or new and not ignored; a file deleted in the tree stays out).
git ls-files -co --exclude-standard -z | while IFS= read -r -d '' f; do if [[ -e "$f" ]]; then printf '%s\0' "$f"; fi; done \
  | tar --null -T - -cf - | tar -xf - -C "$WORK/src"
(cd "$WORK/src" && VEFAST_SKIP_CUDA_BUILD=1 "$BUILD_PYTHON" -m build --no-isolation -o "$WORK/dist" >"$WORK/build.log" 2>&1) \
  || { cat "$WORK/build.log"; exit 1; }
WHEEL="$(ls "$WORK"/dist/vefast-*-py3-none-any.whl)"
ls "$WORK/dist"

phase "fresh venv with torch==$TORCH_VERSION and the triton it requires"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
pip_install --upgrade pip
pip_install "torch==$TORCH_VERSION"
# vefast's other dependencies and the test tools at requirements.txt's versions; torch/triton/torchvision
# are not constrained here (that is the point of the lane).
grep -vE '^(torch|triton|torchvision)[=<>~ ]' requirements.txt >"$WORK/constraints.txt"
phase "pip install $(basename "$WHEEL") (must keep torch $TORCH_VERSION)"
# matplotlib (with pillow): the VR table's plot and the recipe's sample grid.
pip_install -c "$WORK/constraints.txt" "$WHEEL" pytest pytest-benchmark hypothesis scipy matplotlib

cd "$WORK/run"
"$VPY" - "$TORCH_VERSION" "$WORK/venv" <<'EOF'
import sys
from importlib.metadata import requires, version

import torch
import vefast

want, venv = sys.argv[1], sys.argv[2]
if torch.__version__.split("+")[0] != want:
    sys.exit(f"pip replaced torch {want} with {torch.__version__} while installing the vefast wheel")
triton_req = [r for r in requires("torch") or [] if r.startswith("triton")]
print(f"torch {torch.__version__}, triton {version('triton')} (torch requires {triton_req})")
if not vefast.__file__.startswith(venv):
    sys.exit(f"import vefast resolved to {vefast.__file__}, not the wheel installed in {venv}")
print(f"vefast {vefast.__version__} from {vefast.__file__}")
ext = vefast.info(verbose=True)["extension"]
if ext["loaded"]:
    sys.exit("the pure-Python wheel must not carry the CUDA extension")
EOF
"$WORK/venv/bin/vefast" --help >/dev/null

phase "smoke subset (.ci/smoke_tests.txt) from a copy of tests/"
# tests/ with what it imports beside it in the repository (benchmarks/: table and harness helpers) and the
# pytest configuration (markers, options); no vefast/ there, so `import vefast` stays the installed wheel.
cp -r "$ROOT/tests" "$ROOT/benchmarks" "$WORK/run/"
cp "$ROOT/pyproject.toml" "$WORK/run/"
find "$WORK/run" -name __pycache__ -prune -exec rm -rf {} +
mapfile -t SMOKE < <(sed -e 's/#.*//' -e 's/[[:space:]]*$//' "$ROOT/.ci/smoke_tests.txt" | grep -v '^$')
rc=0
"$VPY" -m pytest -q -p no:cacheprovider -m "not gpu" "${SMOKE[@]}" || rc=$?
phase "done (pytest exit $rc)"
exit $rc
