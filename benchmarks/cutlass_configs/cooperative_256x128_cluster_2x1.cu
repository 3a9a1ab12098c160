#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(cooperative_256x128_cluster_2x1, Cooperative, 256, 128, 2, 1)
}  // namespace fusedskip::configs
