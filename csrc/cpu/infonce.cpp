// InfoNCE against the queue on the CPU, streaming: the queue is split into one range per thread,
// each range is read in chunks of CHUNK rows with an online log-sum-exp, and the softmax-weighted
// sum of keys (which gives dL/dq) is accumulated in the same pass. The N x (K+1) logits never exist;
// extra memory is O(splits * N * (C + CHUNK)). Partials merge in a fixed order (deterministic).
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <cmath>
#include <limits>
#include <vector>

namespace {

constexpr int64_t CHUNK = 1024;

struct Partial {  // running state of one queue range, per row of q
  at::Tensor max;    // [N]     running max of the logits
  at::Tensor sum;    // [N]     sum of exp(logit - max)
  at::Tensor acc;    // [N, C]  sum of exp(logit - max) * key
  at::Tensor above;  // [N]     negatives whose logit exceeds the positive's
};

Partial scan_range(const at::Tensor& qs, const at::Tensor& pos, const at::Tensor& queue,
                   int64_t begin, int64_t end) {
  const int64_t N = qs.size(0), C = qs.size(1);
  const auto opts = qs.options();
  Partial p{at::full({N}, -std::numeric_limits<double>::infinity(), opts), at::zeros({N}, opts),
            at::zeros({N, C}, opts), at::zeros({N}, opts.dtype(at::kLong))};
  const bool cast = queue.scalar_type() != qs.scalar_type();
  at::Tensor keys_buf = cast ? at::empty({std::min(CHUNK, end - begin), C}, opts) : at::Tensor();
  at::Tensor logits_buf = at::empty({N, std::min(CHUNK, end - begin)}, opts);
  const at::Tensor pos_col = pos.unsqueeze(1);
  for (int64_t j = begin; j < end; j += CHUNK) {
    const int64_t B = std::min(CHUNK, end - j);
    at::Tensor keys = queue.narrow(0, j, B);                   // B x C
    if (cast) keys = keys_buf.narrow(0, 0, B).copy_(keys);
    at::Tensor logits = B == logits_buf.size(1) ? logits_buf : at::empty({N, B}, opts);
    at::mm_out(logits, qs, keys.t());                          // N x B, already divided by T
    p.above.add_(logits.gt(pos_col).sum(1));
    at::Tensor new_max = at::maximum(p.max, std::get<0>(logits.max(1)));
    at::Tensor scale = (p.max - new_max).exp_();               // rescale the old partial sums
    logits.sub_(new_max.unsqueeze(1)).exp_();                  // N x B probabilities (unnormalised)
    p.sum.mul_(scale).add_(logits.sum(1));
    p.acc.mul_(scale.unsqueeze(1)).addmm_(logits, keys);       // N x C
    p.max = new_max;
  }
  return p;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> infonce_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& queue, double inv_temperature,
                                                           bool allow_tf32, c10::string_view variant) {
  (void)allow_tf32;  // no TF32 on the CPU
  TORCH_CHECK(variant.empty(), "infonce_kernel: the CPU kernel has no variants; got '", std::string(variant), "'");
  TORCH_CHECK(q.dim() == 2 && k.sizes() == q.sizes() && queue.dim() == 2 && queue.size(1) == q.size(1),
              "infonce_kernel: expected q [N, C], k [N, C], queue [K, C]; got ", q.sizes(), ", ", k.sizes(),
              ", ", queue.sizes());
  TORCH_CHECK(queue.stride(1) == 1 && queue.stride(0) == queue.size(1), "infonce_kernel: queue must be contiguous");
  const bool f64 = q.scalar_type() == at::kDouble || k.scalar_type() == at::kDouble ||
                   queue.scalar_type() == at::kDouble;
  const auto acc_type = f64 ? at::kDouble : at::kFloat;
  const int64_t N = q.size(0), K = queue.size(0);
  at::Tensor qa = q.to(acc_type).contiguous();
  at::Tensor ka = k.to(acc_type).contiguous();
  at::Tensor qs = qa * inv_temperature;                        // N x C: logits = qs . key
  at::Tensor pos = (qs * ka).sum(1);                           // N: positive logits

  const int64_t chunks = (K + CHUNK - 1) / CHUNK;
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), chunks));
  std::vector<Partial> parts(splits);
  at::parallel_for(0, splits, 1, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      // split s reads whole chunks [chunks*s/splits, chunks*(s+1)/splits)
      const int64_t b = std::min(K, chunks * s / splits * CHUNK);
      const int64_t e = std::min(K, chunks * (s + 1) / splits * CHUNK);
      parts[s] = scan_range(qs, pos, queue, b, e);  // casts each chunk when needed
    }
  });

  // Merge the negatives in a fixed order (every range is non-empty, so max is finite after the first).
  at::Tensor max = at::full({N}, -std::numeric_limits<double>::infinity(), qs.options());
  at::Tensor sum = at::zeros({N}, qs.options()), acc = at::zeros({N, qs.size(1)}, qs.options());
  at::Tensor above = at::zeros({N}, qs.options().dtype(at::kLong));
  for (const Partial& p : parts) {
    at::Tensor new_max = at::maximum(max, p.max);
    at::Tensor a = (max - new_max).exp_(), b = (p.max - new_max).exp_();
    sum = sum * a + p.sum * b;
    acc = acc * a.unsqueeze(1) + p.acc * b.unsqueeze(1);
    above.add_(p.above);
    max = new_max;
  }
  // Then the positive (logit pos, weight 1, key k). dL/dq_i = (sum_j p_ij queue_j - (1 - p_i0) k_i) / (T N)
  // with 1 - p_i0 written as l_neg / l_tot: never a difference of p_i0 and 1, so the gradient keeps its
  // relative precision as p_i0 -> 1 (easy positives, late training).
  at::Tensor top = at::maximum(max, pos);
  at::Tensor w_neg = (max - top).exp_();
  at::Tensor l_neg = sum * w_neg;
  at::Tensor l_tot = (pos - top).exp_() + l_neg;
  at::Tensor loss = ((top - pos) + l_tot.log()).mean();  // this order keeps precision when the positive dominates
  at::Tensor grad_q = (acc * (w_neg / l_tot).unsqueeze(1) - ka * (l_neg / l_tot).unsqueeze(1))
                          .mul_(inv_temperature / static_cast<double>(N));
  at::Tensor stats = at::stack({above.eq(0).to(at::kFloat).mean(), above.lt(5).to(at::kFloat).mean()});
  return {loss, grad_q, stats};
}

}  // namespace

TORCH_LIBRARY_IMPL(moco_fast, CPU, m) { m.impl("infonce_kernel", &infonce_cpu); }
