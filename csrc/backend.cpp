#include "backend.h"

#include <atomic>
#include <cstdlib>
#include <iterator>
#include <limits>

#include <c10/util/Exception.h>
#include <c10/util/safe_numerics.h>

#include "tile_gemm.h"

namespace fusedskip {
namespace {

constexpr const char* kNames[] = {"auto", "native", "gemm_epilogue", "cuda_emulation", "cutlass"};

bool parse(const std::string& name, Backend* backend) {
  for (int i = 0; i < static_cast<int>(std::size(kNames)); ++i) {
    if (name == kNames[i]) {
      *backend = static_cast<Backend>(i);
      return true;
    }
  }
  return false;
}

}  // namespace

std::string backend_choices() {
  std::string choices;
  for (const char* name : kNames) {
    choices += (choices.empty() ? "'" : ", '") + std::string(name) + "'";
  }
  return choices;
}

namespace {

Backend from_environment() {
  const char* value = std::getenv("FUSEDSKIP_BACKEND");
  Backend backend = Backend::kAuto;
  if (value != nullptr && value[0] != '\0' && !parse(value, &backend)) {
    TORCH_WARN("fusedskip: FUSEDSKIP_BACKEND=", value, " is not one of ", backend_choices(),
               "; using auto");
  }
  return backend;
}

std::atomic<Backend>& selected() {
  static std::atomic<Backend> backend{from_environment()};
  return backend;
}

// CPU: direct loops below this many multiply-adds, BLAS above (measured on x86-64:
// benchmarks/NOTES.md, "CPU: direct loops or ATen GEMMs").
constexpr int64_t kCpuLoopsMaxWork = int64_t{1} << 15;

// CUDA: the native kernel up to this many multiply-adds, cuBLAS + element-wise pass above.
// Measured on an H200 (bf16, benchmarks/NOTES.md "Native kernel", run 3): the native kernel was
// faster up to 4096x256x256 = 2^28 (forward 62.5 vs 64.0 us there, forward+backward 248 vs 407;
// one exception, noise-level between runs: the backward of 65536x30x30), slower from 2^29, and
// 5x and 18x slower at 2^32 and 2^37 (forward), where its mainloop (no software pipelining,
// element-wise bounds-checked loads) runs at ~22 TFLOP/s against cuBLAS's hundreds.
constexpr int64_t kCudaNativeMaxWork = int64_t{1} << 28;

// CUDA: the CUTLASS GEMM with the epilogue inside (where it applies) from this many
// multiply-adds and output tiles, cuBLAS + the element-wise pass below. Measured on an H100 (bf16
// relu_add forward, device time; results/h100-2026-11-27/5-library-128x256): cuBLAS + pass was
// faster at 4096x512x512 = 2^30 (9.2 against 12.5 us; 64 tiles leave half the SMs idle), the
// CUTLASS GEMM at every size measured from 8192x512x512 = 2^31 (128 tiles) up (13.2 against
// 15.0; 18.5 against 19.8 at 4096x1024x1024; 378.3 against 409.7 at 8192x4096x4096). The tile
// count keeps deep, narrow products (1024x4096x1024: 2^32 but 32 tiles), which the persistent
// kernel cannot split along K as cuBLAS can, on cuBLAS: not measured there.
constexpr int64_t kCudaFusedGemmMinWork = int64_t{1} << 31;
constexpr int64_t kCudaFusedGemmMinTiles = 128;

// The native kernel's 1-D grid: the forward's tiles, and the backward's (each input gradient's
// tiles; each weight-gradient block's and the bias gradient's tiles times their split-K slices),
// must fit one launch.
bool tiles_fit(const Geometry& g) {
  const int64_t row_tiles = ceil_div(g.rows, kTileEdge), col_tiles = ceil_div(g.cols, kTileEdge);
  int64_t backward = col_tiles * kTileMaxSplits;
  for (int64_t width : g.widths) {
    backward += (row_tiles + col_tiles * kTileMaxSplits) * ceil_div(width, kTileEdge);
  }
  return row_tiles * col_tiles <= kTileMaxBlocks && backward <= kTileMaxBlocks;
}

GemmPath forced_tiles(Backend backend, const Geometry& g) {
  TORCH_CHECK_VALUE(tiles_fit(g), "fusedskip: backend '", backend_name(backend),
                    "' cannot run a layer this large (", g.rows, " rows x ", g.cols,
                    " outputs: more thread blocks than one launch holds); use the 'auto' or ",
                    "'gemm_epilogue' backend");
  return GemmPath::kTiles;
}

}  // namespace

Backend current_backend() { return selected().load(std::memory_order_relaxed); }

void set_backend(const std::string& name) {
  Backend backend;
  TORCH_CHECK_VALUE(parse(name, &backend), "fusedskip: unknown backend '", name,
                    "'; choose one of ", backend_choices());
  selected().store(backend, std::memory_order_relaxed);
}

const char* backend_name(Backend backend) { return kNames[static_cast<int>(backend)]; }

namespace {
std::atomic<int64_t> fused_gemm_launch_count{0};
std::atomic<int64_t> concat_gemm_launch_count{0};
std::atomic<int64_t> grouped_gemm_launch_count{0};
std::atomic<int64_t> backward_pass_run_count{0};
}  // namespace

bool fused_gemm_built() {
#ifdef FUSEDSKIP_WITH_CUTLASS
  return true;
#else
  return false;
#endif
}

int64_t fused_gemm_launches() { return fused_gemm_launch_count.load(std::memory_order_relaxed); }

void count_fused_gemm_launch() { fused_gemm_launch_count.fetch_add(1, std::memory_order_relaxed); }

int64_t concat_gemm_launches() { return concat_gemm_launch_count.load(std::memory_order_relaxed); }

void count_concat_gemm_launch() {
  concat_gemm_launch_count.fetch_add(1, std::memory_order_relaxed);
}

int64_t grouped_gemm_launches() {
  return grouped_gemm_launch_count.load(std::memory_order_relaxed);
}

void count_grouped_gemm_launch() {
  grouped_gemm_launch_count.fetch_add(1, std::memory_order_relaxed);
}

int64_t backward_pass_runs() { return backward_pass_run_count.load(std::memory_order_relaxed); }

void count_backward_pass_run() { backward_pass_run_count.fetch_add(1, std::memory_order_relaxed); }

GemmPath choose_gemm_path(const at::Tensor& weight, const Geometry& g) {
  const Backend backend = current_backend();
  // Multiply-adds, saturated: a product past int64 would wrap negative and pass for small.
  int64_t work = 0;
  if (c10::mul_overflows(g.rows, g.cols, &work) ||
      c10::mul_overflows(work, weight.size(1), &work)) {
    work = std::numeric_limits<int64_t>::max();
  }
  if (weight.is_cpu()) {
    switch (backend) {
      case Backend::kNative: return GemmPath::kCpuLoops;
      case Backend::kGemmEpilogue:
      case Backend::kCutlass: return GemmPath::kLibrary;
      case Backend::kCudaEmulation: return forced_tiles(backend, g);
      default: return work <= kCpuLoopsMaxWork ? GemmPath::kCpuLoops : GemmPath::kLibrary;
    }
  }
  if (weight.is_cuda()) {
    switch (backend) {
      case Backend::kGemmEpilogue: return GemmPath::kLibrary;
      case Backend::kCutlass: return GemmPath::kFusedGemm;
      case Backend::kNative:
      case Backend::kCudaEmulation: return forced_tiles(backend, g);
      default:
        // The CUTLASS GEMM hands the shapes it does not apply to, and the backward, to the
        // library path.
        if (work <= kCudaNativeMaxWork && tiles_fit(g)) return GemmPath::kTiles;
        if (fused_gemm_built() && work >= kCudaFusedGemmMinWork &&
            ceil_div(g.rows, kFusedGemmTileRows) * ceil_div(g.cols, kFusedGemmTileCols) >=
                kCudaFusedGemmMinTiles) {
          return GemmPath::kFusedGemm;
        }
        return GemmPath::kLibrary;
    }
  }
  return GemmPath::kLibrary;
}

// Per block where one GEMM per block runs at full speed, which needs neither the cat nor the
// copies: every operand block (each input, each column block of weight and of its gradient)
// starts on a 16-byte boundary and its rows are whole 16-byte words apart (cuBLAS's fast kernels
// need that), and every block is at least kMinGemmBlockWidth wide (narrower ones make
// memory-bound GEMMs, each rereading the whole output gradient). One GEMM per block also sums in
// full: no extra rounding.
constexpr int64_t kMinGemmBlockWidth = 64;

bool library_gemm_per_block(const std::vector<at::Tensor>& inputs_2d, const at::Tensor& weight) {
  const int64_t item = static_cast<int64_t>(weight.element_size());
  if (!on_16_byte_words(weight)) return false;
  for (const at::Tensor& x : inputs_2d) {
    // The width sets where each weight block starts and its gradient's row length.
    if (x.size(1) < kMinGemmBlockWidth || x.size(1) * item % 16 != 0) return false;
    if (!on_16_byte_words(x)) return false;
  }
  return true;
}

bool cutlass_concat_wanted(const at::Tensor& weight, const Geometry& g) {
  // Only when asked for: under auto a concat layer stays on the cat and one cuBLAS GEMM per
  // block. On an H100 (concat2 8192x(1360+2736)->4096 bf16 forward+backward) these kernels took
  // 7% more device time and 2-3% less time per call; neither reached eager (benchmarks/NOTES.md,
  // "Concat on the cuBLAS path").
  return weight.is_cuda() && g.widths.size() > 1 && current_backend() == Backend::kCutlass &&
         fused_gemm_built();
}

}  // namespace fusedskip
