#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(cooperative_256x128_cluster_1x2, Cooperative, 256, 128, 1, 2)
}  // namespace fusedskip::configs
