#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(tile_256x128_cluster_2x1, 256, 128, 2, 1)
}  // namespace fusedskip::configs
