#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(tile_256x128_cluster_1x2, 256, 128, 1, 2)
}  // namespace fusedskip::configs
