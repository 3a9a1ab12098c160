#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(cooperative_128x256_cluster_1x2, Cooperative, 128, 256, 1, 2)
}  // namespace fusedskip::configs
