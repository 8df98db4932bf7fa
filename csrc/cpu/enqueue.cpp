// Ring-buffer enqueue on the CPU: at most two contiguous copies (the wrap-around splits the write),
// keys cast to the queue's dtype; when B > K only the last K keys are kept.
#include <torch/extension.h>

namespace {

void enqueue_cpu(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  TORCH_CHECK(queue.dim() == 2 && keys.dim() == 2 && keys.size(1) == queue.size(1),
              "enqueue_: expected queue [K, C] and keys [B, C]; got ", queue.sizes(), " and ", keys.sizes());
  TORCH_CHECK(ptr.numel() == 1 && ptr.scalar_type() == at::kLong, "enqueue_: ptr must be one int64");
  const int64_t K = queue.size(0), B = keys.size(0);
  if (K == 0) return;
  int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t start = ((*p % K) + K) % K;
  const int64_t n = std::min(B, K);                  // keys that survive
  const int64_t first = (start + B - n) % K;          // where the first surviving key lands
  const at::Tensor src = keys.narrow(0, B - n, n);
  const int64_t head = std::min(n, K - first);        // rows before the wrap
  queue.narrow(0, first, head).copy_(src.narrow(0, 0, head));
  if (n > head) queue.narrow(0, 0, n - head).copy_(src.narrow(0, head, n - head));
  *p = (start + B) % K;
}

}  // namespace

TORCH_LIBRARY_IMPL(moco_fast, CPU, m) { m.impl("enqueue_kernel_", &enqueue_cpu); }
