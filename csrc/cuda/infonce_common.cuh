// Shared by the InfoNCE engines (infonce_v1.cuh, infonce_v2.cuh) and the launcher (infonce.cu); included
// by infonce.cu only, so the anonymous namespace gives one copy.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "common.cuh"

namespace {

#define UNROLL _Pragma("unroll")

constexpr float kLazy = 8.f;  // move the reference max only when a tile's max exceeds it by this
constexpr float kNegInf = -INFINITY;
enum InType : int { kInF32 = 0, kInBF16 = 1, kInF16 = 2 };

__device__ __forceinline__ float load_f(const void* p, int type, int64_t i) {
  if (type == kInBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (type == kInF16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

// q_i.k_i / T as the CPU: qs = q * (1/T) rounded, products rounded, then summed in a fixed order, so
// that the partial and the combine kernels get the same bits. Called by a whole warp; every lane gets the sum.
__device__ float warp_positive(const void* q, int qt, const void* k, int kt, int64_t row, int C, float inv_t) {
  float s = 0.f;
  for (int c = threadIdx.x % 32; c < C; c += 32)
    s = __fadd_rn(s, __fmul_rn(__fmul_rn(load_f(q, qt, row * C + c), inv_t), load_f(k, kt, row * C + c)));
  for (int o = 16; o > 0; o /= 2) s = __fadd_rn(s, __shfl_xor_sync(0xffffffffu, s, o));
  return s;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {  // zero-fills the rest
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }
template <int N>  // all but the N most recent groups of this thread have landed
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// What the partial kernels read and write (set by the launcher and by run_partials / run_partials_v2).
struct Params {
  const void *q, *k, *queue;
  int qt, kt, vt;  // InType of each
  int C, tiles, splits;
  int64_t N, K;
  float inv_t;
  bool raw;   // queue rows are copied as raw 16-byte chunks (the tile's dtype, 16-byte aligned rows)
  float* ws;  // [splits, N, C + 3]: per split and row, O[0:C], m, l, above
};

constexpr int up128(size_t bytes) { return static_cast<int>((bytes + 127) / 128 * 128); }

// The split plan and launch both engines share: as many splits of the queue as fill one wave of CTAs
// over the row blocks, the [splits, N, C+3] fp32 workspace, raw 16-byte copies where the queue allows.
// Sets p.tiles/splits/raw/ws; returns the workspace.
template <class Kernel>
at::Tensor launch_partials(Kernel kernel, Params& p, int bm, int bn, int threads, int bytes, bool raw_ok,
                           size_t elem_bytes, const at::Tensor& queue, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, bytes));
  const int64_t ctas = static_cast<int64_t>(moco_fast_cuda::sm_count(queue.get_device())) * std::max(per_sm, 1);
  const int64_t row_blocks = (p.N + bm - 1) / bm, tiles = (p.K + bn - 1) / bn;
  p.tiles = static_cast<int>(tiles);
  p.splits = static_cast<int>(std::max<int64_t>(1, std::min((ctas + row_blocks - 1) / row_blocks, tiles)));
  p.raw = raw_ok && (p.C * elem_bytes) % 16 == 0 && reinterpret_cast<uintptr_t>(queue.data_ptr()) % 16 == 0;
  at::Tensor ws = at::empty({p.splits, p.N, p.C + 3}, queue.options().dtype(at::kFloat));
  p.ws = ws.data_ptr<float>();
  kernel<<<dim3(static_cast<unsigned>(row_blocks), static_cast<unsigned>(p.splits)), threads, bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return ws;
}

}  // namespace
