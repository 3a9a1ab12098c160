#!/usr/bin/env bash
# Build the extension here for a GPU machine that cannot build it itself (no network, so no
# CUTLASS headers there; or a build there would cost its time): a venv with that machine's Python
# and torch, CUTLASS's headers, a build of this commit in a worktree of its own (the checkout's
# own build is left alone), and its .so files copied into fusedskip/ here, stripped. Then carry
# them to the GPU machine, with the hash of the sources they came from
# (fusedskip/_prebuilt_sources.sha256), and run `FUSEDSKIP_PREBUILT=1 bash scripts/gpu_check.sh`
# there.
#
#   bash scripts/build_for_device.sh                  # Python 3.12, torch 2.11, sm_90a (an H100)
#   DEVICE_PYTHON=python3.11 DEVICE_TORCH=2.14.1 bash scripts/build_for_device.sh
#
# Knobs: DEVICE_PYTHON (interpreter to build the venv from), DEVICE_TORCH (a pip version spec),
# FUSEDSKIP_CUDA_ARCHS (default 9.0a), FUSEDSKIP_CUTLASS_CONFIGS (default 1: also the tile-shape
# configs that gpu_check.sh benchmarks), WORK (default /tmp/fusedskip-device: the venv and the
# worktree), MAX_JOBS (default: all cores). A second run reuses the venv (refused where its Python
# is not DEVICE_PYTHON's; torch reinstalled where it is not DEVICE_TORCH) and rebuilds only what
# changed. With two cores the first run took ~10 minutes here, most of it the CUTLASS kernels.
# It replaces in fusedskip/ only the files an earlier run of it put there (their hashes are in
# $WORK/copied.sha256, or the worktree holds the same bytes): a build it did not make there for
# that Python (the checkout's own, when the checkout's Python is DEVICE_PYTHON's) stops it before
# anything is built.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
DEVICE_PYTHON="${DEVICE_PYTHON:-python3.12}"
DEVICE_TORCH="${DEVICE_TORCH:-2.11.*}"
WORK="${WORK:-/tmp/fusedskip-device}"
VENV="$WORK/venv"
TREE="$WORK/tree"
export FUSEDSKIP_CUDA_ARCHS="${FUSEDSKIP_CUDA_ARCHS:-9.0a}"
export FUSEDSKIP_CUTLASS_CONFIGS="${FUSEDSKIP_CUTLASS_CONFIGS:-1}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"

if ! "$DEVICE_PYTHON" --version > /dev/null 2>&1; then
  # pyenv's shim names a version it has but does not run it unless selected: take it directly.
  # A glob, not `ls | tail`: under set -e and pipefail a failing ls would end the script before
  # the message below.
  found=""
  for candidate in "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/*/bin/"$DEVICE_PYTHON"; do
    if [[ -x "$candidate" ]]; then found="$candidate"; fi
  done
  [[ -n "$found" ]] ||
    { echo "build_for_device: no $DEVICE_PYTHON here (set DEVICE_PYTHON)" >&2; exit 2; }
  DEVICE_PYTHON="$found"
fi
VERSION='import sys; print("%d.%d" % sys.version_info[:2])'
want_python=$("$DEVICE_PYTHON" -c "$VERSION")
# A venv an earlier run made for another device's Python would build a .so that Python's name
# and ABI, not DEVICE_PYTHON's.
if [[ -x "$VENV/bin/python" ]]; then
  have_python=$("$VENV/bin/python" -c "$VERSION" 2>/dev/null || echo "unknown")
  if [[ "$have_python" != "$want_python" ]]; then
    echo "build_for_device: $VENV is Python $have_python, not $want_python ($DEVICE_PYTHON):" \
      "remove it (rm -rf $VENV) or set WORK to another folder" >&2
    exit 2
  fi
fi

# What this build writes into fusedskip/ (the extension, and the tile-shape configs' module
# where FUSEDSKIP_CUTLASS_CONFIGS asks for it) replaces what is there under those names: only
# where that is a copy an earlier run made. Checked now, before any time goes into the build.
suffix=$("$DEVICE_PYTHON" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
OUTPUTS=("_C$suffix" "_cutlass_configs$suffix")
COPIED="$WORK/copied.sha256"  # "hash  name" of each file a run copied into fusedskip/
ours() {  # ours NAME: fusedskip/NAME is a copy a run of this script made
  local file="$REPO/fusedskip/$1"
  # The worktree's same bytes: a run from before the record was kept.
  cmp -s "$file" "$TREE/fusedskip/$1" ||
    grep -qxF "$(sha256sum < "$file" | cut -c1-64)  $1" "$COPIED" 2>/dev/null
}
for name in "${OUTPUTS[@]}"; do
  if [[ -e "$REPO/fusedskip/$name" ]] && ! ours "$name"; then
    echo "build_for_device: fusedskip/$name is not a build this script made (the checkout's" \
      "own for Python $want_python?), and this build would replace it: move it away first" \
      "(mv fusedskip/$name somewhere), or build for another DEVICE_PYTHON" >&2
    exit 2
  fi
done

mkdir -p "$WORK"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$DEVICE_PYTHON" -m venv "$VENV"
fi
# The CUDA 13.0 build, as on the lent GPUs (a different CUDA major would not load there), of the
# torch asked for (a reused venv may hold another device's).
TORCH_OK='import sys, torch
try:
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.specifiers import SpecifierSet
    from pip._vendor.packaging.version import Version
wanted = SpecifierSet("==" + sys.argv[1]).contains(Version(torch.__version__).public, True)
sys.exit(0 if torch.version.cuda and wanted else 1)'
if ! "$VENV/bin/python" -c "$TORCH_OK" "$DEVICE_TORCH" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet "torch==$DEVICE_TORCH" -r requirements.txt
  if ! "$VENV/bin/python" -c "$TORCH_OK" "$DEVICE_TORCH"; then
    echo "build_for_device: $VENV holds torch" \
      "$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null ||
         echo none), not a CUDA build of $DEVICE_TORCH (DEVICE_TORCH), after installing it" >&2
    exit 2
  fi
fi
"$VENV/bin/pip" install --quiet --no-deps "nvidia-cutlass==4.2.0.0"
"$VENV/bin/python" -c "import torch; print('build_for_device: torch', torch.__version__, \
'CUDA', torch.version.cuda)"

# A worktree at this checkout's commit; uncommitted changes are not in it.
if [[ ! -e "$TREE/.git" ]]; then
  git worktree add --detach "$TREE" HEAD
else
  git -C "$TREE" checkout --quiet --detach "$(git rev-parse HEAD)"
fi
# The worktree builds the commit: uncommitted sources would travel to the GPU machine beside a
# build that lacks them (gpu_check.sh refuses that pair, after a machine start).
SOURCES=(setup.py csrc benchmarks/cutlass_configs)
if [[ -n "$(git status --porcelain -- "${SOURCES[@]}")" ]]; then
  echo "build_for_device: uncommitted changes in ${SOURCES[*]}; commit them first:" >&2
  git status --short -- "${SOURCES[@]}" >&2
  exit 2
fi
# The worktree's copies of this Python's modules go first: what is there after the build is what
# this build made (build_ext --inplace copies each module it builds in), not a module an older
# build made that this one no longer does (configs off now).
for name in "${OUTPUTS[@]}"; do
  rm -f "$TREE/fusedskip/$name"
done
(cd "$TREE" && "$VENV/bin/python" setup.py build_ext --inplace)
# None left here from an earlier run for the same Python (its configs module, where this build
# makes none, would be carried with this build's stamp); the check above found them its own.
for name in "${OUTPUTS[@]}"; do
  rm -f "$REPO/fusedskip/$name"
done
# This build's modules only: not other Pythons' from older commits' builds in the worktree,
# which the stamp below would vouch for.
for name in "${OUTPUTS[@]}"; do
  so="$TREE/fusedskip/$name"
  [[ -e "$so" ]] || continue
  strip --strip-debug "$so"
  cp "$so" "$REPO/fusedskip/"
  (cd "$REPO/fusedskip" && sha256sum "$name") >> "$COPIED"  # for the check above, next run
  echo "build_for_device: fusedskip/$name ($(du -h "$so" | cut -f1)), from" \
    "$(git -C "$TREE" rev-parse --short HEAD)"
done
# What gpu_check.sh (FUSEDSKIP_PREBUILT=1) compares with the sources beside it; carry it along.
bash "$TREE/scripts/source_stamp.sh" > "$REPO/fusedskip/_prebuilt_sources.sha256"
echo "build_for_device: carry fusedskip/_prebuilt_sources.sha256 and the .so files above"
echo "build_for_device: to run the CPU suite on it here: PYTHONPATH=$REPO $VENV/bin/python -m pytest -q tests"
