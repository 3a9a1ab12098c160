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
# worktree), MAX_JOBS (default: all cores). A second run reuses the venv and rebuilds only what
# changed. With two cores the first run took ~10 minutes here, most of it the CUTLASS kernels.
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
  found=$(ls -d "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/*/bin/"$DEVICE_PYTHON" \
    2>/dev/null | tail -n 1)
  [[ -n "$found" ]] ||
    { echo "build_for_device: no $DEVICE_PYTHON here (set DEVICE_PYTHON)" >&2; exit 2; }
  DEVICE_PYTHON="$found"
fi
mkdir -p "$WORK"
if [[ ! -x "$VENV/bin/python" ]]; then
  "$DEVICE_PYTHON" -m venv "$VENV"
fi
# The CUDA 13.0 build, as on the lent GPUs; a different CUDA major would not load there.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  "$VENV/bin/pip" install --quiet "torch==$DEVICE_TORCH" -r requirements.txt
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
(cd "$TREE" && "$VENV/bin/python" setup.py build_ext --inplace)
# None left here from an older build of the same Python (a configs module that this build no
# longer makes would be carried along with it).
suffix=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
rm -f "$REPO/fusedskip/_C$suffix" "$REPO/fusedskip/_cutlass_configs$suffix"
for so in "$TREE"/fusedskip/_C.*.so "$TREE"/fusedskip/_cutlass_configs.*.so; do
  [[ -e "$so" ]] || continue
  strip --strip-debug "$so"
  cp "$so" "$REPO/fusedskip/"
  echo "build_for_device: fusedskip/$(basename "$so") ($(du -h "$so" | cut -f1)), from $(git -C "$TREE" rev-parse --short HEAD)"
done
# What gpu_check.sh (FUSEDSKIP_PREBUILT=1) compares with the sources beside it; carry it along.
bash "$TREE/scripts/source_stamp.sh" > "$REPO/fusedskip/_prebuilt_sources.sha256"
echo "build_for_device: carry fusedskip/_prebuilt_sources.sha256 and the .so files above"
echo "build_for_device: to run the CPU suite on it here: PYTHONPATH=$REPO $VENV/bin/python -m pytest -q tests"
