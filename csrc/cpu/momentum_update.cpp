// Momentum (EMA) update of the key encoder on the CPU: every pair of tensors in one call, the elements
// of all of them split evenly over the threads; math in fp32 (fp64 for fp64 tensors),
// p_k = m * p_k + (1 - m) * p_q with the same two roundings as the reference.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t BLOCK = 1 << 16;

template <typename scalar_t, typename math_t>
void ema_span(scalar_t* __restrict__ pk, const scalar_t* __restrict__ pq, int64_t n, math_t m, math_t om) {
  for (int64_t i = 0; i < n; ++i) {
    const math_t a = static_cast<math_t>(pk[i]) * m;
    const math_t b = static_cast<math_t>(pq[i]) * om;
    pk[i] = static_cast<scalar_t>(a + b);
  }
}

// fp32, the common case, compiled for AVX2 and baseline x86-64 and picked at load time
// (no FMA: -ffp-contract=off keeps the two roundings of the reference).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
void ema_span_f32(float* __restrict__ pk, const float* __restrict__ pq, int64_t n, float m, float om) {
  for (int64_t i = 0; i < n; ++i) pk[i] = pk[i] * m + pq[i] * om;
}

void ema_block(const at::Tensor& pk, const at::Tensor& pq, int64_t begin, int64_t n, double m) {
  switch (pk.scalar_type()) {
    case at::kFloat:
      return ema_span_f32(pk.data_ptr<float>() + begin, pq.data_ptr<float>() + begin, n, static_cast<float>(m),
                          static_cast<float>(1.0 - m));
    case at::kDouble:
      return ema_span<double, double>(pk.data_ptr<double>() + begin, pq.data_ptr<double>() + begin, n, m, 1.0 - m);
    case at::kBFloat16:
      return ema_span<c10::BFloat16, float>(pk.data_ptr<c10::BFloat16>() + begin,
                                            pq.data_ptr<c10::BFloat16>() + begin, n, static_cast<float>(m),
                                            static_cast<float>(1.0 - m));
    case at::kHalf:
      return ema_span<c10::Half, float>(pk.data_ptr<c10::Half>() + begin, pq.data_ptr<c10::Half>() + begin, n,
                                        static_cast<float>(m), static_cast<float>(1.0 - m));
    default:
      TORCH_CHECK(false, "momentum_update_: unsupported dtype ", pk.scalar_type());
  }
}

void momentum_update_cpu(at::TensorList params_k, at::TensorList params_q, const c10::optional<at::Tensor>& m_tensor,
                         double m) {
  TORCH_CHECK(params_k.size() == params_q.size(), "momentum_update_: params_k has ", params_k.size(),
              " tensors but params_q has ", params_q.size());
  if (m_tensor.has_value()) m = m_tensor->item<double>();
  // All tensors as one range of elements, split evenly over the threads (by elements, not by tensor,
  // so a few large tensors among many small ones still keep every thread equally busy).
  std::vector<int64_t> starts{0};
  for (size_t t = 0; t < params_k.size(); ++t) {
    const at::Tensor &pk = params_k[t], &pq = params_q[t];
    TORCH_CHECK(pk.sizes() == pq.sizes() && pk.strides() == pq.strides() && pk.scalar_type() == pq.scalar_type(),
                "momentum_update_: pair ", t, " differs in shape, layout or dtype");
    TORCH_CHECK(pk.is_non_overlapping_and_dense(), "momentum_update_: tensor ", t, " is not dense");
    starts.push_back(starts.back() + pk.numel());
  }
  at::parallel_for(0, starts.back(), BLOCK, [&](int64_t begin, int64_t end) {
    // the first tensor that ends after `begin`, then walk on
    size_t t = std::upper_bound(starts.begin(), starts.end(), begin) - starts.begin() - 1;
    for (; t < params_k.size() && starts[t] < end; ++t) {
      const int64_t lo = std::max(begin, starts[t]), hi = std::min(end, starts[t + 1]);
      if (hi > lo) ema_block(params_k[t], params_q[t], lo - starts[t], hi - lo, m);
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(moco_fast, CPU, m) { m.impl("momentum_update_kernel_", &momentum_update_cpu); }
