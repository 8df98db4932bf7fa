// InfoNCE against the queue on the GPU, same semantics as csrc/cpu/infonce.cpp: one pass over the queue
// with an online log-sum-exp; the softmax-weighted sum of keys (which gives dL/dq) is accumulated in the
// same pass, so the N x (K+1) logits never exist. Three launches, no atomics (bitwise deterministic):
//   1. the partial kernel, grid (ceil(N / BM), splits): a CTA takes BM rows of q and a contiguous run of
//      BN-row queue tiles (its split) and writes each row's partial (O[C], m, l, above) to a workspace
//      [splits, N, C + 3]. Splitting the queue axis fills the GPU even for N = 32.
//   2. infonce_combine_kernel, one CTA per row: merges the splits in a fixed order, then the positive
//      (logit pos_i, weight 1, key k_i) -> dL/dq_i, loss_i, above_i.
//   3. infonce_finalize_kernel, one CTA: mean loss and [acc1, acc5], fixed-order sums.
// Two engines for kernel 1, chosen per call by the variant argument (moco_fast/ops/variants.py reads
// MOCO_FAST_CUDA_INFONCE at every call, so one process can time both; an unknown name is an error):
//   v1 (default)  infonce_v1.cuh: WMMA, 4 warps, Q and the scores staged in shared memory, 3 barriers/tile
//   v2            infonce_v2.cuh: mma.sync with Q, S, P and O in registers, 8 warps, 3-stage cp.async
//                 ring, 1 barrier per 64-key tile. Covers C <= 128 on the MMA paths (16-bit, TF32);
//                 every other call (C > 128, fp32 without allow_tf32) runs v1's kernel.
// Both write the same partial layout, so steps 2 and 3 are shared. fp64 inputs are rejected (use the cpu
// or reference backend). Needs sm_80+ (cp.async, bf16/tf32 MMA).
#include <limits>

#include "infonce_v1.cuh"
#include "infonce_v2.cuh"

namespace {

// (m, l, acc) <- merged with (ms, ls, accs), the CPU's formula; exp(0) is skipped so that an empty
// partial (-inf) meets another one safely. acc[u] is column c0 + step * u.
__device__ void merge(float& m, float& l, float* acc, float ms, float ls, const float* accs, int c0, int step, int C) {
  const float nm = fmaxf(m, ms), a = m == nm ? 1.f : expf(m - nm), b = ms == nm ? 1.f : expf(ms - nm);
  l = l * a + ls * b;
  UNROLL for (int u = 0; u < 4; ++u)
    if (c0 + step * u < C) acc[u] = acc[u] * a + accs[c0 + step * u] * b;
  m = nm;
}

// One CTA per row. Group g (tg threads) merges splits [splits*g/groups, splits*(g+1)/groups) in order,
// then group 0 merges the positive and the group results in order. A thread owns columns gi + tg*u.
__global__ void __launch_bounds__(256) infonce_combine_kernel(const Params p, int tg, int groups, float gscale,
                                                              float* grad, float* rowbuf) {
  extern __shared__ float part[];  // [groups][C + 3], then pos
  const int C = p.C, g = threadIdx.x / tg, gi = threadIdx.x % tg;
  const int64_t row = blockIdx.x;
  if (threadIdx.x < 32) {
    const float x = warp_positive(p.q, p.qt, p.k, p.kt, row, C, p.inv_t);
    if (threadIdx.x == 0) part[groups * (C + 3)] = x;
  }
  if (g < groups) {
    float m = kNegInf, l = 0.f, above = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
    const int s1 = static_cast<int>(static_cast<int64_t>(p.splits) * (g + 1) / groups);
    for (int s = static_cast<int>(static_cast<int64_t>(p.splits) * g / groups); s < s1; ++s) {
      const float* w = p.ws + (static_cast<int64_t>(s) * p.N + row) * (C + 3);
      merge(m, l, acc, w[C], w[C + 1], w, gi, tg, C);
      above += w[C + 2];
    }
    float* mine = part + g * (C + 3);
    UNROLL for (int u = 0; u < 4; ++u)
      if (gi + tg * u < C) mine[gi + tg * u] = acc[u];
    if (gi == 0) mine[C] = m, mine[C + 1] = l, mine[C + 2] = above;
  }
  __syncthreads();
  if (g != 0) return;
  const float pos = part[groups * (C + 3)];
  float m = kNegInf, l = 0.f, above = 0.f, acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int h = 0; h < groups; ++h) {  // the negatives alone, in order
    merge(m, l, acc, part[h * (C + 3) + C], part[h * (C + 3) + C + 1], part + h * (C + 3), gi, tg, C);
    above += part[h * (C + 3) + C + 2];
  }
  // dL/dq_i = (sum_j p_ij queue_j - (1 - p_i0) k_i) / (T N), with 1 - p_i0 written as l_neg / l_tot: the
  // positive's share is never subtracted from 1, so the gradient keeps its relative precision as p_i0 -> 1.
  const float mt = fmaxf(m, pos), wn = expf(m - mt), ln = l * wn, lt = expf(pos - mt) + ln;
  const float cq = wn / lt, ck = ln / lt;
  UNROLL for (int u = 0; u < 4; ++u)
    if (gi + tg * u < C) {
      const float kv = load_f(p.k, p.kt, row * C + gi + tg * u);
      grad[row * C + gi + tg * u] = (acc[u] * cq - ck * kv) * gscale;
    }
  if (gi == 0) rowbuf[row] = mt + logf(lt) - pos, rowbuf[p.N + row] = above;
}

__global__ void __launch_bounds__(256) infonce_finalize_kernel(const float* __restrict__ rowbuf, int64_t N,
                                                               float* loss, float* stats) {
  __shared__ float sl[256], s1[256], s5[256];  // counts stay exact in fp32 up to 2^24 rows
  float sum = 0.f, c1 = 0.f, c5 = 0.f;
  for (int64_t i = threadIdx.x; i < N; i += 256)
    sum += rowbuf[i], c1 += rowbuf[N + i] == 0.f, c5 += rowbuf[N + i] < 5.f;
  sl[threadIdx.x] = sum, s1[threadIdx.x] = c1, s5[threadIdx.x] = c5;
  for (int o = 128; o > 0; o /= 2) {
    __syncthreads();
    if (threadIdx.x < o)
      sl[threadIdx.x] += sl[threadIdx.x + o], s1[threadIdx.x] += s1[threadIdx.x + o], s5[threadIdx.x] += s5[threadIdx.x + o];
  }
  const float n = static_cast<float>(N);
  if (threadIdx.x == 0) *loss = sl[0] / n, stats[0] = s1[0] / n, stats[1] = s5[0] / n;
}

// The variant argument (moco_fast/ops/variants.py reads the switch): "v1" or "v2"; anything else is an error,
// never a fallback.
bool use_v2(c10::string_view variant) {
  TORCH_CHECK(variant == "v1" || variant == "v2", "infonce_kernel: unknown CUDA variant '", std::string(variant),
              "'; choose one of ('v1', 'v2')");
  return variant == "v2";
}

int in_type(const at::Tensor& t, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt != at::kDouble, "infonce_kernel: ", name, " is float64, which the CUDA kernel does not support; ",
              "use the cpu or reference backend, or cast to float32");
  TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "infonce_kernel: ", name,
              " must be float32, bfloat16 or float16; got ", dt);
  return dt == at::kBFloat16 ? kInBF16 : dt == at::kHalf ? kInF16 : kInF32;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& queue, double inv_temperature,
                                                            bool allow_tf32, c10::string_view variant) {
  const bool v2_asked = use_v2(variant);
  TORCH_CHECK(q.dim() == 2 && k.sizes() == q.sizes() && queue.dim() == 2 && queue.size(1) == q.size(1),
              "infonce_kernel: expected q [N, C], k [N, C], queue [K, C]; got ", q.sizes(), ", ", k.sizes(), ", ",
              queue.sizes());
  TORCH_CHECK(queue.is_contiguous(), "infonce_kernel: queue must be contiguous");
  TORCH_CHECK(q.is_cuda() && k.device() == q.device() && queue.device() == q.device(),
              "infonce_kernel: q, k and queue must be on one CUDA device; got ", q.device(), ", ", k.device(), ", ",
              queue.device());
  TORCH_CHECK(q.size(1) <= 1024, "infonce_kernel: the CUDA kernel supports C <= 1024; got C = ", q.size(1));
  Params p{};
  p.qt = in_type(q, "q"), p.kt = in_type(k, "k"), p.vt = in_type(queue, "queue");
  c10::cuda::CUDAGuard guard(q.device());
  TORCH_CHECK(moco_fast_cuda::device_attribute(cudaDevAttrComputeCapabilityMajor, q.get_device()) >= 8,
              "infonce_kernel: the CUDA kernel needs compute capability 8.0 or newer");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const auto opts = q.options().dtype(at::kFloat);
  p.N = q.size(0), p.K = queue.size(0), p.C = static_cast<int>(q.size(1));
  at::Tensor loss = at::empty({}, opts), grad = at::empty({p.N, p.C}, opts), stats = at::empty({2}, opts);
  if (p.N == 0) {  // the mean of nothing, as on the CPU
    loss.fill_(std::numeric_limits<float>::quiet_NaN());
    stats.fill_(std::numeric_limits<float>::quiet_NaN());
    return {loss, grad, stats};
  }
  const at::Tensor qc = q.contiguous(), kc = k.contiguous();
  p.q = qc.data_ptr(), p.k = kc.data_ptr(), p.queue = queue.data_ptr();
  p.inv_t = static_cast<float>(inv_temperature);

  at::Tensor ws;  // K = 0: no partials (splits = 0), the combine starts and ends at the positive
  if (p.K > 0) {
    if (v2_asked && v2::handles(p, allow_tf32))
      ws = v2::dispatch(p, queue, allow_tf32, stream);
    else
      ws = p.C <= 128   ? v1::dispatch_engine<128>(p, queue, allow_tf32, stream)
           : p.C <= 256 ? v1::dispatch_engine<256>(p, queue, allow_tf32, stream)
           : p.C <= 512 ? v1::dispatch_engine<512>(p, queue, allow_tf32, stream)
                        : v1::dispatch_engine<1024>(p, queue, allow_tf32, stream);
  }
  const int tg = std::max(32, ((p.C + 3) / 4 + 31) / 32 * 32);  // threads per group: 4 columns each
  const int groups = std::max(1, std::min(256 / tg, p.splits));
  at::Tensor rowbuf = at::empty({2 * p.N}, opts);  // loss_i for every row, then above_i
  const size_t part_bytes = (static_cast<size_t>(groups) * (p.C + 3) + 1) * sizeof(float);
  infonce_combine_kernel<<<static_cast<unsigned>(p.N), 256, part_bytes, stream>>>(
      p, tg, groups, static_cast<float>(inv_temperature / static_cast<double>(p.N)), grad.data_ptr<float>(),
      rowbuf.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  infonce_finalize_kernel<<<1, 256, 0, stream>>>(rowbuf.data_ptr<float>(), p.N, loss.data_ptr<float>(),
                                                 stats.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, grad, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(moco_fast, CUDA, m) { m.impl("infonce_kernel", &infonce_cuda); }