#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_SOURCE_CONFIG(cooperative_128x256_cluster_2x1_source8_own, 128, 256, 2, 1, 8, false)
}  // namespace fusedskip::configs
