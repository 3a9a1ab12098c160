#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(cooperative_128x256_cluster_2x1, Cooperative, 128, 256, 2, 1)
}  // namespace fusedskip::configs
