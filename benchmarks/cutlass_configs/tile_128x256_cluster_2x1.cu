#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(tile_128x256_cluster_2x1, 128, 256, 2, 1)
}  // namespace fusedskip::configs
