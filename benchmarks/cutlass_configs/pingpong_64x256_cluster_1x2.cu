#include "configs.cuh"
namespace fusedskip::configs {
FUSEDSKIP_CONFIG(pingpong_64x256_cluster_1x2, Pingpong, 64, 256, 1, 2)
}  // namespace fusedskip::configs
