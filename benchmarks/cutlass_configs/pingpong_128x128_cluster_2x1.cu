#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(pingpong_128x128_cluster_2x1, Pingpong, 128, 128, 2, 1)
}  // namespace fusedskip::configs
