#!/usr/bin/env bash
# One hash of every source an extension build reads (setup.py, csrc/, the tile-shape configs'
# folder), as they are in this working tree: scripts/build_for_device.sh writes it beside the .so
# files it makes, and scripts/gpu_check.sh with FUSEDSKIP_PREBUILT=1 refuses a build whose hash
# is not the tree's, so a GPU run never tests kernels other than the sources beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
find setup.py csrc benchmarks/cutlass_configs -type f \
  \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) -print0 |
  LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64
