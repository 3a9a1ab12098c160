#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(tile_128x128_cluster_2x1, 128, 128, 2, 1)
}  // namespace fusedskip::configs
