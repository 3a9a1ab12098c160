// The native kernel's body: one tiled GEMM per thread block whose K loop runs over the concat
// inputs one after another (the concatenation is never built), finished by the fused epilogue of
// csrc/epilogue.h while the tile is still on chip.
//
// It is written once, as __host__ __device__ code against a small "block" interface:
//
//   block.for_each_thread(f)   f(thread) for every thread of the block
//   block.for_each_worker(f)   f(worker, accumulator) for every unit that owns an accumulator
//                              (a thread for the SIMT maths, a warp for tensor cores)
//   block.sync()               __syncthreads()
//
// csrc/cuda/tile_kernels.cu runs it as a CUDA thread block; csrc/cpu/tile_emulation.cpp runs it on
// the host, thread after thread between the syncs. The CPU tests (FUSEDSKIP_BACKEND=
// cuda_emulation) therefore check this kernel's tiling, bounds, concat segments, split-K and
// epilogue on every run, without a GPU. What they cannot check: the tensor-core instructions
// themselves (the host stands in for them, csrc/cpu/tile_emulation.cpp) and races between threads
// (compute-sanitizer racecheck, scripts/gpu_check.sh).
#pragma once

#include <cstdint>

#include "epilogue.h"

namespace fusedskip {

// Forward: one problem of up to 8 segments (the inputs). Backward: up to 17 one-segment problems
// (a gradient per input, a weight-gradient column block per input, the bias gradient), run by
// one launch.
constexpr int kTileForwardSegments = 8;
constexpr int kTileBackwardProblems = 17;
FS_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Every tile maths below covers kTileEdge x kTileEdge outputs per block.
constexpr int kTileEdge = 64;
// A launch is a 1-D grid of blocks (every problem's tiles and slices in a row): at most the CUDA
// limit of the grid's x dimension (csrc/backend.cpp checks before choosing the kernel).
constexpr int64_t kTileMaxBlocks = (int64_t{1} << 31) - 1;
// Split-K: at most this many slices per weight-gradient block (65536 rows at the 256 per slice
// that csrc/tile_plan.h keeps as a floor).
constexpr int64_t kTileMaxSplits = 256;

// Which operand of a backward segment is the output gradient G (rows, cols), read through the
// ReLU mask (G's element (r, c) counts only where mask bit (r, c) is set), and how it is indexed.
enum class MaskedOperand : int {
  kNone = 0,
  kA,            // A(m, k) = G[m, k]      (input gradients: G W)
  kATransposed,  // A(m, k) = G[k, m]      (weight gradient: G^T X)
  kB,            // B(k, n) = G[k, n]      (bias gradient: 1^T G)
};

// One K block of out = sum over segments of A (m, k) B (k, n), each operand read through its own
// strides (any layout, any alignment: the loads are element-wise and bounds-checked); k is local
// to the segment.
template <typename scalar_t>
struct TileSegment {
  const scalar_t* a;  // A(m, k) = a[m * a_stride_m + k * a_stride_k]; nullptr: A is all ones
  int64_t a_stride_m;
  int64_t a_stride_k;
  const scalar_t* b;  // B(k, n) = b[k * b_stride_k + n * b_stride_n]
  int64_t b_stride_k;
  int64_t b_stride_n;
  int64_t k;
  const uint8_t* mask;  // the ReLU mask (rows, mask_row_bytes), read for mask_on
  int64_t mask_row_bytes;
  MaskedOperand mask_on;
};

template <typename scalar_t, int kSegments>
struct TileProblem {
  static constexpr int kNumSegments = kSegments;
  TileSegment<scalar_t> segment[kSegments];
  int num_segments;
  int splits;            // split-K: slices sharing this problem, each over k_per_split of K
  int64_t k_per_split;   // >= the segments' total k when splits == 1
  int64_t m;
  int64_t n;
  int64_t tiles_m;       // ceil(m / kTileEdge), ceil(n / kTileEdge)
  int64_t tiles_n;
  scalar_t* out;         // (m, n), row stride out_stride_m, unit column stride
  int64_t out_stride_m;
  // With splits > 1: slice s writes its float partial sums to partial + s * partial_stride_split
  // (same row stride as out) and a second pass adds the slices up in order (deterministic).
  at::opmath_type<scalar_t>* partial;
  int64_t partial_stride_split;
};

// kGradient: the backward's launch, whose loaders may read an operand through the ReLU mask or
// stand a row of ones in for A (the forward's instantiations compile without those tests).
template <typename scalar_t, int kSegments, int kProblems, bool kGradient>
struct TileParams {
  static constexpr bool kReadsGradient = kGradient;
  TileProblem<scalar_t, kSegments> problem[kProblems];
  int num_problems;
  // Problem i owns blocks [first_block[i], first_block[i + 1]): tiles_m * tiles_n * splits of
  // them, row tiles fastest (neighbouring blocks share a B column tile, which stays in L2).
  int64_t first_block[kProblems + 1];
  // The forward epilogue's operands (see ForwardEpilogueParams); backward problems store plainly.
  const scalar_t* bias;
  const scalar_t* residual;
  int64_t residual_stride_row;
  uint8_t* mask;
  // Backward only, where the output gradient through the mask is itself wanted (the residual's
  // gradient of add_relu): grad_preact (rows, cols) gets it from the loads of problem
  // preact_problem (the first with tiles), each element once, so that no pass of its own reads
  // G and the mask again.
  scalar_t* grad_preact;
  int64_t grad_preact_stride_row;
  int preact_problem;
};

// Shared memory of one block: the A and B tiles of one K step, then (aliasing them, after a sync)
// the accumulator tile the epilogue reads. Raw bytes: __shared__ variables cannot have
// constructors, and at::Half has one.
template <typename scalar_t, typename acc_t, int kBM, int kBN, int kBK, int kALd, int kBLd,
          int kCLd>
struct TileSmem {
  static constexpr int kABytes = kBM * kALd * static_cast<int>(sizeof(scalar_t));
  static constexpr int kBBytes = kBK * kBLd * static_cast<int>(sizeof(scalar_t));
  static constexpr int kCBytes = kBM * kCLd * static_cast<int>(sizeof(acc_t));
  static constexpr int kBytes = kABytes + kBBytes > kCBytes ? kABytes + kBBytes : kCBytes;
  // 128-byte alignment: tensor-core fragment loads need 32-byte aligned tile addresses.
  alignas(128) unsigned char raw[kBytes];

  FS_HOST_DEVICE scalar_t* a() { return reinterpret_cast<scalar_t*>(raw); }
  FS_HOST_DEVICE scalar_t* b() { return reinterpret_cast<scalar_t*>(raw + kABytes); }
  FS_HOST_DEVICE acc_t* c() { return reinterpret_cast<acc_t*>(raw); }
  FS_HOST_DEVICE const scalar_t* a() const { return reinterpret_cast<const scalar_t*>(raw); }
  FS_HOST_DEVICE const scalar_t* b() const {
    return reinterpret_cast<const scalar_t*>(raw + kABytes);
  }
};

// ---------------------------------------------------------------------------------------------
// SIMT maths (float32 without TF32, float64): 256 threads, a 64x64 tile, each thread a 4x4
// sub-tile strided by 16 so that a warp's shared-memory reads hit distinct banks.

template <typename scalar_t_>
struct SimtMath {
  using scalar_t = scalar_t_;
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kThreads = 256;
  static constexpr int kBM = kTileEdge, kBN = kTileEdge, kBK = 16;
  // kBLd odd: the forward's B (weight) is k-contiguous, so a warp's tile stores walk k; with an
  // even leading dim they would land in a few banks.
  static constexpr int kALd = kBK + 1, kBLd = kBN + 1, kCLd = kBN + 1;
  static constexpr int kWorkers = kThreads;
  static constexpr int kThreadsPerWorker = 1;
  static constexpr int kSub = 4;      // sub-tile rows and columns per thread
  static constexpr int kSpread = 16;  // threads per tile row / column
  using Smem = TileSmem<scalar_t, acc_t, kBM, kBN, kBK, kALd, kBLd, kCLd>;
  static_assert(kSub * kSpread == kBM && kSub * kSpread == kBN && kSpread * kSpread == kThreads);
  struct Acc {
    acc_t v[kSub][kSub];
  };

  FS_HOST_DEVICE static void zero(Acc& acc) {
FS_UNROLL
    for (int i = 0; i < kSub; ++i)
FS_UNROLL
      for (int j = 0; j < kSub; ++j) acc.v[i][j] = acc_t(0);
  }

  FS_HOST_DEVICE static void mma(const Smem& smem, Acc& acc, int thread) {
    const int ty = thread / kSpread, tx = thread % kSpread;
FS_UNROLL
    for (int kk = 0; kk < kBK; ++kk) {
      acc_t a[kSub], b[kSub];
FS_UNROLL
      for (int i = 0; i < kSub; ++i) a[i] = static_cast<acc_t>(smem.a()[(ty + kSpread * i) * kALd + kk]);
FS_UNROLL
      for (int j = 0; j < kSub; ++j) b[j] = static_cast<acc_t>(smem.b()[kk * kBLd + tx + kSpread * j]);
FS_UNROLL
      for (int i = 0; i < kSub; ++i)
FS_UNROLL
        for (int j = 0; j < kSub; ++j) acc.v[i][j] += a[i] * b[j];
    }
  }

  FS_HOST_DEVICE static void store(Smem& smem, const Acc& acc, int thread) {
    const int ty = thread / kSpread, tx = thread % kSpread;
FS_UNROLL
    for (int i = 0; i < kSub; ++i)
FS_UNROLL
      for (int j = 0; j < kSub; ++j) {
        smem.c()[(ty + kSpread * i) * kCLd + tx + kSpread * j] = acc.v[i][j];
      }
  }
};

// Tensor-core tiling (float16 / bfloat16, and float32 as TF32): 4 warps in a 2x2 grid over a
// 64x64 tile, each warp 2x2 fragments of 16x16, K steps of 32. The fragment maths themselves
// differ between the GPU (WMMA, csrc/cuda/tile_kernels.cu) and the host stand-in
// (csrc/cpu/tile_emulation.cpp); this is the part they share.
template <typename scalar_t_>
struct TensorCoreShape {
  using scalar_t = scalar_t_;
  using acc_t = float;
  static constexpr bool kTf32 = sizeof(scalar_t) == 4;
  static constexpr int kThreads = 128;
  static constexpr int kBM = kTileEdge, kBN = kTileEdge, kBK = 32;
  static constexpr int kFragM = 16, kFragN = 16, kFragK = kTf32 ? 8 : 16;
  static constexpr int kWarpM = 32, kWarpN = 32;  // each warp: 2x2 fragments
  static constexpr int kFragsM = kWarpM / kFragM, kFragsN = kWarpN / kFragN;
  // Leading dims: multiples of 16 bytes (a WMMA requirement), padded off a multiple of 128 bytes
  // to spread rows over the shared-memory banks.
  static constexpr int kPad = kTf32 ? 4 : 8;
  static constexpr int kALd = kBK + kPad, kBLd = kBN + kPad, kCLd = kBN + 4;
  static constexpr int kWorkers = 4;
  static constexpr int kThreadsPerWorker = 32;
  using Smem = TileSmem<scalar_t, acc_t, kBM, kBN, kBK, kALd, kBLd, kCLd>;

  // Top-left corner of a warp's 32x32 part of the tile.
  FS_HOST_DEVICE static int warp_row(int warp) { return (warp / 2) * kWarpM; }
  FS_HOST_DEVICE static int warp_col(int warp) { return (warp % 2) * kWarpN; }
};

// ---------------------------------------------------------------------------------------------
// The block body.

// K runs over a problem's segments one after another, as over the columns of their
// concatenation: a K step may straddle two or more narrow inputs (concat4 of widths 3 + 6 + 9 + 12
// is one step of 32, not four). The step's first segment, found once per step, and from it the
// segment of each element's k.
struct SegmentCursor {
  int segment;     // the segment holding k0
  int64_t offset;  // its first column in the concatenation
};

template <class Problem>
FS_HOST_DEVICE SegmentCursor segment_at(const Problem& prob, int64_t k0) {
  SegmentCursor at{0, 0};
  while (at.segment + 1 < prob.num_segments && k0 >= at.offset + prob.segment[at.segment].k) {
    at.offset += prob.segment[at.segment].k;
    ++at.segment;
  }
  return at;
}

// From the step's cursor to the segment holding k (>= the cursor's k0, below the segments' total
// width), with k made local to it.
template <class Problem>
FS_HOST_DEVICE const auto& segment_of(const Problem& prob, SegmentCursor at, int64_t& k) {
  while (k >= at.offset + prob.segment[at.segment].k) {
    at.offset += prob.segment[at.segment].k;
    ++at.segment;
  }
  k -= at.offset;
  return prob.segment[at.segment];
}

// The elements one thread copies of a kRows x kCols tile: (row(i), col(i)) for i below the
// tile's size over kThreads. Consecutive threads take consecutive elements along the operand's
// contiguous dimension, so that they read neighbouring addresses; each thread's own elements
// then step along the other dimension.
struct TileRun {
  int row0, col0, drow, dcol;
  FS_HOST_DEVICE int row(int i) const { return row0 + i * drow; }
  FS_HOST_DEVICE int col(int i) const { return col0 + i * dcol; }
};
template <int kRows, int kCols, int kThreads>
FS_HOST_DEVICE TileRun tile_run(bool rows_fastest, int thread) {
  static_assert(kThreads % kRows == 0 && kThreads % kCols == 0);
  return rows_fastest ? TileRun{thread % kRows, thread / kRows, 0, kThreads / kRows}
                      : TileRun{thread / kCols, thread % kCols, kThreads / kCols, 0};
}

// Whether columns k_first .. k_last of the concatenation lie in one segment, k_last the last of
// k_first, k_first + dk, ... (count of them) or k_end - 1, whichever is less. The whole span is
// tested, not the columns alone: a run that steps over a narrow input goes by element too, which
// costs speed only. `at`, the K step's cursor, is moved on to k_first's segment.
template <class Problem>
FS_HOST_DEVICE bool run_in_one_segment(const Problem& prob, SegmentCursor& at, int64_t k_first,
                                       int dk, int count, int64_t k_end) {
  if constexpr (Problem::kNumSegments == 1) return true;
  const int64_t k_last_wanted = k_first + static_cast<int64_t>(count - 1) * dk;
  const int64_t k_last = k_last_wanted < k_end ? k_last_wanted : k_end - 1;
  const int64_t k = k_first < k_end ? k_first : k_end - 1;  // none below k_end: any will do
  while (k >= at.offset + prob.segment[at.segment].k) {
    at.offset += prob.segment[at.segment].k;
    ++at.segment;
  }
  return k_last < at.offset + prob.segment[at.segment].k;
}

// load_tiles for a forward K step in which a thread's run of elements crosses from one input to
// the next: each element's own segment, loaded and stored one at a time (few registers; this
// takes only unusual layouts, see load_tiles).
template <class Math, class Problem>
FS_HOST_DEVICE void load_tiles_by_element(typename Math::Smem& smem, const Problem& prob,
                                          SegmentCursor at, TileRun ra, TileRun rb, int64_t m0,
                                          int64_t n0, int64_t k0, int64_t k_end) {
  using scalar_t = typename Math::scalar_t;
  constexpr int kPerThread = Math::kBM * Math::kBK / Math::kThreads;
FS_NO_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t m = m0 + ra.row(i);
    int64_t k = k0 + ra.col(i);
    scalar_t value(0);
    if (m < prob.m && k < k_end) {
      const TileSegment<scalar_t>& seg = segment_of(prob, at, k);
      value = seg.a[m * seg.a_stride_m + k * seg.a_stride_k];
    }
    smem.a()[ra.row(i) * Math::kALd + ra.col(i)] = value;
  }
FS_NO_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    int64_t k = k0 + rb.row(i);
    const int64_t n = n0 + rb.col(i);
    scalar_t value(0);
    if (k < k_end && n < prob.n) {
      const TileSegment<scalar_t>& seg = segment_of(prob, at, k);
      value = seg.b[k * seg.b_stride_k + n * seg.b_stride_n];
    }
    smem.b()[rb.row(i) * Math::kBLd + rb.col(i)] = value;
  }
}

// Global -> shared copy of the A tile (kBM x kBK) and the B tile (kBK x kBN) of the K step at k0,
// zeros outside the operands; in the backward, the operand that is the output gradient is read
// through the ReLU mask (its segment's mask_on).
//
// Two passes: every element this thread copies (and, for the masked operand, its mask byte) is
// loaded into registers, then every one is masked and stored. The loads are then in flight
// together. Stored as each arrived, they would take one memory round trip each, one after
// another (a warp issues in order, and the store, or the mask's select, waits for its load): 32
// per K step for the tensor-core tiles. Each operand's elements are read from one segment, at
// a fixed step from the first, so their addresses cost a register pair, not one per element.
// Only a forward whose K step straddles inputs, in a layout where a thread's run of elements
// walks K (a column-major input, or weight), has runs across segments: load_tiles_by_element.
template <class Math, bool kGradient, class Problem>
FS_HOST_DEVICE void load_tiles(typename Math::Smem& smem, const Problem& prob, SegmentCursor at,
                               int64_t m0, int64_t n0, int64_t k0, int64_t k_end, int thread) {
  using scalar_t = typename Math::scalar_t;
  constexpr int kPerThread = Math::kBM * Math::kBK / Math::kThreads;
  static_assert(kPerThread * Math::kThreads == Math::kBM * Math::kBK &&
                Math::kBK * Math::kBN == Math::kBM * Math::kBK,
                "A and B tiles of one size, a whole number of elements per thread");
  // Backward problems have one segment each: the mask's columns are the segment's own.
  static_assert(!kGradient || Problem::kNumSegments == 1);
  const TileSegment<scalar_t>& first = prob.segment[at.segment];
  const TileRun ra = tile_run<Math::kBM, Math::kBK, Math::kThreads>(
      first.a_stride_m == 1 && first.a_stride_k != 1, thread);
  const TileRun rb = tile_run<Math::kBK, Math::kBN, Math::kThreads>(
      !(first.b_stride_n == 1 && first.b_stride_k != 1), thread);
  SegmentCursor at_a = at, at_b = at;
  if (!run_in_one_segment(prob, at_a, k0 + ra.col0, ra.dcol, kPerThread, k_end) ||
      !run_in_one_segment(prob, at_b, k0 + rb.row0, rb.drow, kPerThread, k_end)) {
    if constexpr (Problem::kNumSegments > 1) {
      load_tiles_by_element<Math>(smem, prob, at, ra, rb, m0, n0, k0, k_end);
    }
    return;
  }
  const TileSegment<scalar_t>& sa = prob.segment[at_a.segment];
  const TileSegment<scalar_t>& sb = prob.segment[at_b.segment];
  // Element i of A: (m_first + i drow, k_first + i dcol), at a_first + i a_step in sa.
  const int64_t m_first = m0 + ra.row0, ka_first = k0 + ra.col0;
  const int64_t a_first = m_first * sa.a_stride_m + (ka_first - at_a.offset) * sa.a_stride_k;
  const int64_t a_step = ra.drow * sa.a_stride_m + ra.dcol * sa.a_stride_k;
  const int64_t kb_first = k0 + rb.row0, n_first = n0 + rb.col0;
  const int64_t b_first = (kb_first - at_b.offset) * sb.b_stride_k + n_first * sb.b_stride_n;
  const int64_t b_step = rb.drow * sb.b_stride_k + rb.dcol * sb.b_stride_n;
  auto a_inside = [&](int i) { return m0 + ra.row(i) < prob.m && k0 + ra.col(i) < k_end; };
  auto b_inside = [&](int i) { return k0 + rb.row(i) < k_end && n0 + rb.col(i) < prob.n; };
  const MaskedOperand masked = kGradient ? first.mask_on : MaskedOperand::kNone;
  const bool mask_a = masked == MaskedOperand::kA || masked == MaskedOperand::kATransposed;
  const bool mask_b = masked == MaskedOperand::kB;
  // The mask bit of A(m, k) is (m, k) for kA and (k, m) for kATransposed; of B(k, n), (k, n).
  auto a_mask_row = [&](int i) {
    return masked == MaskedOperand::kA ? m0 + ra.row(i) : k0 + ra.col(i);
  };
  auto a_mask_col = [&](int i) {
    return masked == MaskedOperand::kA ? k0 + ra.col(i) : m0 + ra.row(i);
  };

  scalar_t a[kPerThread];
  scalar_t b[kPerThread];
  uint8_t mask_bytes[kPerThread] = {};  // the masked operand's (at most one of A and B)
FS_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    a[i] = scalar_t(0);
    if (a_inside(i)) {
      if constexpr (kGradient) {
        a[i] = sa.a == nullptr ? scalar_t(1) : sa.a[a_first + i * a_step];
        if (mask_a) {
          mask_bytes[i] = first.mask[a_mask_row(i) * first.mask_row_bytes +
                                     a_mask_col(i) / kMaskBitsPerByte];
        }
      } else {
        a[i] = sa.a[a_first + i * a_step];
      }
    }
  }
FS_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    b[i] = scalar_t(0);
    if (b_inside(i)) {
      b[i] = sb.b[b_first + i * b_step];
      if constexpr (kGradient) {
        if (mask_b) {
          mask_bytes[i] = first.mask[(k0 + rb.row(i)) * first.mask_row_bytes +
                                     (n0 + rb.col(i)) / kMaskBitsPerByte];
        }
      }
    }
  }
  // A select, not a multiply: a NaN or Inf gradient where the ReLU was off gives 0. (Outside the
  // operand the value is 0 either way.) A bit's place in its byte is that of its column's offset
  // in the tile: tiles and K steps start on multiples of 8 (kTileEdge, kBK, and split-K's
  // k_per_split, a multiple of kBK).
  static_assert(kTileEdge % kMaskBitsPerByte == 0 && Math::kBK % kMaskBitsPerByte == 0);
  auto masked_off = [&](int i, int tile_col) {
    return !((mask_bytes[i] >> (tile_col % kMaskBitsPerByte)) & 1);
  };
FS_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    const int mask_col = masked == MaskedOperand::kA ? ra.col(i) : ra.row(i);
    const bool off = kGradient && mask_a && masked_off(i, mask_col);
    smem.a()[ra.row(i) * Math::kALd + ra.col(i)] = off ? scalar_t(0) : a[i];
  }
FS_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    const bool off = kGradient && mask_b && masked_off(i, rb.col(i));
    smem.b()[rb.row(i) * Math::kBLd + rb.col(i)] = off ? scalar_t(0) : b[i];
  }
}

// Backward, where the output gradient through the mask is itself wanted: the masked operand's
// tile of a K step, as load_tiles left it in shared memory, stored to grad_preact (row stride
// `stride`) at G's coordinates. Neighbouring threads take neighbouring columns of G. (Stored from
// shared memory, not from load_tiles' registers: there the stores' addresses pushed the
// tensor-core kernels' registers past their cap, into hundreds of bytes of spills.)
template <class Math, class Problem>
FS_HOST_DEVICE void store_preact(const typename Math::Smem& smem, const Problem& prob,
                                 typename Math::scalar_t* preact, int64_t stride, int64_t m0,
                                 int64_t n0, int64_t k0, int64_t k_end, int thread) {
  constexpr int kPerThread = Math::kBM * Math::kBK / Math::kThreads;
  const MaskedOperand masked = prob.segment[0].mask_on;
  if (masked == MaskedOperand::kB) {  // B(k, n) = G[k, n]
    const TileRun run = tile_run<Math::kBK, Math::kBN, Math::kThreads>(false, thread);
FS_NO_UNROLL
    for (int i = 0; i < kPerThread; ++i) {
      const int64_t k = k0 + run.row(i), n = n0 + run.col(i);
      if (k < k_end && n < prob.n) {
        preact[k * stride + n] = smem.b()[run.row(i) * Math::kBLd + run.col(i)];
      }
    }
    return;
  }
  // A(m, k) = G[m, k] (kA), or G[k, m] (kATransposed), whose tile rows are then G's columns.
  const bool transposed = masked == MaskedOperand::kATransposed;
  const TileRun run = tile_run<Math::kBM, Math::kBK, Math::kThreads>(transposed, thread);
FS_NO_UNROLL
  for (int i = 0; i < kPerThread; ++i) {
    const int64_t m = m0 + run.row(i), k = k0 + run.col(i);
    if (m < prob.m && k < k_end) {
      preact[(transposed ? k * stride + m : m * stride + k)] =
          smem.a()[run.row(i) * Math::kALd + run.col(i)];
    }
  }
}

// The epilogue of one tile, from the accumulator tile in shared memory: the forward's bias,
// residual and ReLU into `out` and the mask; a backward problem's plain store; or a split-K
// slice's float partial sums. Each thread takes one column of the tile and steps down its rows,
// so a warp's 32 threads read and write 32 neighbouring elements of one row at a time: one
// stretch of 64 bytes (half types; 128 for float, 256 for double), 2 or 3 sectors of 32 bytes
// (where 16 columns are all a tile has left, 16 of each of two rows). One thread per mask byte,
// 8 columns each, put a warp's accesses 16 bytes apart over four rows, each sector touched again
// for every one of a unit's 8 columns: up to 8 times the memory transactions, loads and stores
// alike. A thread reads the residual of kBatch rows before it writes any of their outputs, so
// that those loads are in flight together: the compiler cannot tell `out` from `residual`, and
// would keep each read after the write before it, a memory round trip each. (The bias is one
// value per thread, read once.)
//
// The mask: a byte holds 8 columns of a row, which 8 threads computed. Each thread leaves its
// elements' ReLU outcome in the tile in place of the value it has used; after a sync, one thread
// per mask byte reads the 8 outcomes and stores the byte.
template <class Math, bool kRelu, Residual kResidual, bool kBias, class Block, class Params,
          class Problem>
FS_HOST_DEVICE void tile_epilogue(const Params& p, const Problem& prob, int64_t split, int64_t m0,
                                  int64_t n0, typename Math::Smem& smem, Block& block) {
  using scalar_t = typename Math::scalar_t;
  using acc_t = typename Math::acc_t;
  // Threads per tile row: the tile's width, or where fewer columns are left (the seed's layers
  // are 10 and 30 wide) the power of two from 16 up that covers them. A 64-wide span would leave
  // a 10-wide layer's tile 20 threads with columns, walking 32 rows each (tensor cores); with 16,
  // 80 threads walk 8.
  const int64_t cols_left = prob.n - n0;
  const int span = cols_left <= 16 ? 16 : cols_left <= 32 ? 32 : Math::kBN;
  const int row_step = Math::kThreads / span;  // rows the block's threads cover at once
  const int rows = Math::kBM / row_step;       // rows per thread: at least kBM * 16 / kThreads
  // Rows whose residual a thread reads before writing their outputs; with nothing to read from
  // global memory, a row at a time (fewer registers). A thread may have fewer rows (4: SIMT's
  // 256 threads over 16 columns).
  constexpr int kBatch = kResidual == Residual::kNone ? 1 : 8;
  static_assert(Math::kBN == 64 && Math::kThreads % Math::kBN == 0,
                "spans of 16, 32 and 64 columns, each a whole number of rows of threads");
  acc_t* tile = smem.c();
  block.for_each_thread([&](int thread) {
    const int col = thread % span, row0 = thread / span;
    const int64_t n = n0 + col;
    if (n >= prob.n) return;
    if (prob.partial != nullptr) {
      acc_t* dst = prob.partial + split * prob.partial_stride_split + n;
FS_NO_UNROLL
      for (int i = 0; i < rows; ++i) {
        const int r = row0 + i * row_step;
        if (m0 + r < prob.m) dst[(m0 + r) * prob.out_stride_m] = tile[r * Math::kCLd + col];
      }
      return;
    }
    acc_t bias = acc_t(0);
    if constexpr (kBias) bias = static_cast<acc_t>(p.bias[n]);
FS_NO_UNROLL
    for (int first = 0; first < rows; first += kBatch) {
      acc_t residual[kBatch] = {};
      if constexpr (kResidual != Residual::kNone) {
FS_UNROLL
        for (int i = 0; i < kBatch; ++i) {
          const int64_t m = m0 + row0 + (first + i) * row_step;
          if (first + i < rows && m < prob.m) {
            residual[i] = static_cast<acc_t>(p.residual[m * p.residual_stride_row + n]);
          }
        }
      }
FS_UNROLL
      for (int i = 0; i < kBatch; ++i) {
        const int r = row0 + (first + i) * row_step;
        const int64_t m = m0 + r;
        if (first + i < rows && m < prob.m) {
          bool active = false;
          const acc_t value = epilogue_value<kRelu, kResidual, kBias>(tile[r * Math::kCLd + col],
                                                                      bias, residual[i], active);
          prob.out[m * prob.out_stride_m + n] = static_cast<scalar_t>(value);
          if constexpr (kRelu) tile[r * Math::kCLd + col] = active ? acc_t(1) : acc_t(0);
        }
      }
    }
  });
  if constexpr (kRelu) {
    const int bytes_per_row = span / kMaskBitsPerByte;
    const int byte_row_step = Math::kThreads / bytes_per_row;
    const int64_t mask_row_bytes = mask_bytes_per_row(prob.n);
    block.sync();
    block.for_each_thread([&](int thread) {
      const int byte = thread % bytes_per_row;
      const int64_t first_col = n0 + byte * kMaskBitsPerByte;
      if (first_col >= prob.n) return;
      const int count = prob.n - first_col < kMaskBitsPerByte ? static_cast<int>(prob.n - first_col)
                                                              : kMaskBitsPerByte;
FS_NO_UNROLL
      for (int r = thread / bytes_per_row; r < Math::kBM && m0 + r < prob.m; r += byte_row_step) {
        const acc_t* outcome = tile + r * Math::kCLd + byte * kMaskBitsPerByte;
        uint8_t bits = 0;
FS_UNROLL
        for (int bit = 0; bit < kMaskBitsPerByte; ++bit) {
          if (bit < count && outcome[bit] != acc_t(0)) bits |= static_cast<uint8_t>(1u << bit);
        }
        p.mask[(m0 + r) * mask_row_bytes + first_col / kMaskBitsPerByte] = bits;
      }
    });
  }
}

// Block `block_index` of a launch over `p`.
// kStoresPreact (backward only): p.grad_preact is set, and gets G from the loads.
template <class Math, bool kRelu, Residual kResidual, bool kBias, bool kStoresPreact, class Block,
          class Params>
FS_HOST_DEVICE void tile_gemm_block(const Params& p, int64_t block_index,
                                    typename Math::Smem& smem, Block& block) {
  static_assert(Math::kBM == kTileEdge && Math::kBN == kTileEdge);
  int index = 0;
  while (index + 1 < p.num_problems && block_index >= p.first_block[index + 1]) ++index;
  const auto& prob = p.problem[index];
  const int64_t local = block_index - p.first_block[index];
  const int64_t tile_m = local % prob.tiles_m;
  const int64_t tile_n = (local / prob.tiles_m) % prob.tiles_n;
  const int64_t split = local / (prob.tiles_m * prob.tiles_n);
  const int64_t m0 = tile_m * Math::kBM, n0 = tile_n * Math::kBN;
  // The blocks that store G for grad_preact: of the problem chosen, those of the first tile
  // along the dimension over which its masked operand's tiles repeat (a masked A is read again
  // for every column tile, a masked B for every row tile), so that each element is stored once.
  static_assert(!kStoresPreact || Params::kReadsGradient);
  const bool stores_preact =
      kStoresPreact && index == p.preact_problem &&
      (prob.segment[0].mask_on == MaskedOperand::kB ? tile_m : tile_n) == 0;

  block.for_each_worker([&](int, auto& acc) { Math::zero(acc); });
  int64_t k_total = 0;
  for (int s = 0; s < prob.num_segments; ++s) k_total += prob.segment[s].k;
  const int64_t k_begin = split * prob.k_per_split;
  const int64_t k_end =
      k_total < k_begin + prob.k_per_split ? k_total : k_begin + prob.k_per_split;
  for (int64_t k0 = k_begin; k0 < k_end; k0 += Math::kBK) {
    const SegmentCursor at = segment_at(prob, k0);
    block.for_each_thread([&](int thread) {
      load_tiles<Math, Params::kReadsGradient>(smem, prob, at, m0, n0, k0, k_end, thread);
    });
    block.sync();
    if constexpr (kStoresPreact) {
      if (stores_preact) {
        block.for_each_thread([&](int thread) {
          store_preact<Math>(smem, prob, p.grad_preact, p.grad_preact_stride_row, m0, n0, k0,
                             k_end, thread);
        });
      }
    }
    block.for_each_worker([&](int worker, auto& acc) { Math::mma(smem, acc, worker); });
    block.sync();  // the next loads (or the accumulator tile below) overwrite the tiles
  }
  block.for_each_worker([&](int worker, auto& acc) { Math::store(smem, acc, worker); });
  block.sync();

  tile_epilogue<Math, kRelu, kResidual, kBias>(p, prob, split, m0, n0, smem, block);
}

// Second pass of split-K: every element's slices summed in order (deterministic). A slice's
// partial sums lie in one slab of stride_split elements: count_first of them for `first` (the
// weight gradient), then count_second for `second` (the bias gradient).
template <typename scalar_t>
struct SplitSumParams {
  const at::opmath_type<scalar_t>* partial;
  int splits;
  int64_t stride_split;
  scalar_t* first;
  int64_t count_first;
  scalar_t* second;
  int64_t count_second;
};

template <typename scalar_t>
FS_HOST_DEVICE void split_sum_unit(const SplitSumParams<scalar_t>& p, int64_t i) {
  at::opmath_type<scalar_t> sum = 0;
  for (int s = 0; s < p.splits; ++s) sum += p.partial[s * p.stride_split + i];
  if (i < p.count_first) {
    p.first[i] = static_cast<scalar_t>(sum);
  } else {
    p.second[i - p.count_first] = static_cast<scalar_t>(sum);
  }
}

}  // namespace fusedskip
