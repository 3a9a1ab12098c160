#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(cooperative_128x128_cluster_2x1, Cooperative, 128, 128, 2, 1)
}  // namespace fusedskip::configs
