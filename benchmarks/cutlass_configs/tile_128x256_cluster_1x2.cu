#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(tile_128x256_cluster_1x2, 128, 256, 1, 2)
}  // namespace fusedskip::configs
