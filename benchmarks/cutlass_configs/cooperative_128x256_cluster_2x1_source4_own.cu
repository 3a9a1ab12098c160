#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_SOURCE_CONFIG(cooperative_128x256_cluster_2x1_source4_own, 128, 256, 2, 1, 4, false)
}  // namespace fusedskip::configs
