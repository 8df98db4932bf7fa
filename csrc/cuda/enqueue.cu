// Ring-buffer enqueue on the GPU: queue[(ptr + i) % K] = keys[i] (cast to the queue's dtype), then
// ptr <- (ptr + B) % K; when B > K only the last K keys are kept, as on the CPU. The pointer lives on
// the device and is only read there, so the op never synchronises with the host and can be captured
// in a CUDA graph: kernel 1 copies the surviving rows (each thread reads *ptr), kernel 2 (one thread)
// advances the pointer once kernel 1 is done (stream order).
#include <ATen/Dispatch.h>

#include <algorithm>
#include <type_traits>

#include "common.cuh"

namespace {

// Same conversion as at::Tensor::copy_ on the CPU: to float first unless the queue is fp64.
template <typename dst_t, typename src_t>
__device__ __forceinline__ dst_t cast_key(src_t v) {
  if constexpr (std::is_same<dst_t, double>::value) {
    return static_cast<double>(v);
  } else {
    return static_cast<dst_t>(static_cast<float>(v));
  }
}

__device__ __forceinline__ int64_t wrap(int64_t p, int64_t K) { return ((p % K) + K) % K; }

// Grid-stride over the n surviving key rows x C columns; n = min(B, K).
template <typename dst_t, typename src_t>
__global__ void enqueue_rows_kernel(dst_t* __restrict__ queue, int64_t qs0, int64_t qs1,
                                    const src_t* __restrict__ keys, int64_t ks0, int64_t ks1,
                                    const int64_t* __restrict__ ptr, int64_t K, int64_t B, int64_t C, int64_t n) {
  const int64_t start = wrap(*ptr, K);
  const int64_t first = (start + (B - n) % K) % K;  // where the first surviving key lands
  const int64_t total = n * C;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = e / C, c = e % C;
    const int64_t dst_row = (first + r) % K, src_row = B - n + r;
    queue[dst_row * qs0 + c * qs1] = cast_key<dst_t>(keys[src_row * ks0 + c * ks1]);
  }
}

__global__ void enqueue_advance_kernel(int64_t* ptr, int64_t K, int64_t B) {
  *ptr = (wrap(*ptr, K) + B % K) % K;
}

void enqueue_cuda(at::Tensor& queue, at::Tensor& ptr, const at::Tensor& keys) {
  TORCH_CHECK(queue.dim() == 2 && keys.dim() == 2 && keys.size(1) == queue.size(1),
              "enqueue_: expected queue [K, C] and keys [B, C]; got ", queue.sizes(), " and ", keys.sizes());
  TORCH_CHECK(ptr.numel() == 1 && ptr.scalar_type() == at::kLong,
              "enqueue_: ptr must be one int64; got ", ptr.scalar_type(), " with shape ", ptr.sizes());
  TORCH_CHECK(queue.is_cuda() && ptr.device() == queue.device() && keys.device() == queue.device(),
              "enqueue_: queue, ptr and keys must be on the same CUDA device; got ", queue.device(), ", ",
              ptr.device(), " and ", keys.device());
  const auto check_dtype = [](const at::Tensor& t, const char* name) {
    const auto dt = t.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kBFloat16 || dt == at::kHalf, "enqueue_: ", name,
                " must be float32/float64/bfloat16/float16; got ", dt);
  };
  check_dtype(queue, "queue");
  check_dtype(keys, "keys");
  const int64_t K = queue.size(0), B = keys.size(0), C = queue.size(1);
  if (K == 0) return;
  c10::cuda::CUDAGuard guard(queue.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t n = std::min(B, K);
  if (n * C > 0) {
    const int threads = 256;
    const int64_t blocks = std::min<int64_t>((n * C + threads - 1) / threads, 4096);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, queue.scalar_type(), "enqueue_", [&] {
      using dst_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, keys.scalar_type(), "enqueue_", [&] {
        using src_t = scalar_t;
        enqueue_rows_kernel<dst_t, src_t><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
            queue.data_ptr<dst_t>(), queue.stride(0), queue.stride(1), keys.data_ptr<src_t>(), keys.stride(0),
            keys.stride(1), p, K, B, C, n);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  }
  enqueue_advance_kernel<<<1, 1, 0, stream>>>(p, K, B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(moco_fast, CUDA, m) { m.impl("enqueue_kernel_", &enqueue_cuda); }
