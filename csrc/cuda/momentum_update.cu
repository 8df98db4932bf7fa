// Momentum (EMA) update of the key encoder on the GPU: p_k <- m * p_k + (1 - m) * p_q for every pair
// of tensors in ONE launch. Math in fp32 (fp64 for fp64 tensors) with the CPU's two roundings,
// a = p_k * m; b = p_q * (1 - m); p_k = a + b, spelled with __fmul_rn/__fadd_rn so that nvcc cannot
// contract it into an FMA: fp32 results match the CPU bitwise.
//
// Work is cut into chunks of kChunk elements; a device-side table holds, per non-empty tensor, the
// two pointers, numel, dtype and whether 16-byte vectors may be used, plus the prefix of chunk counts
// (each CTA finds its tensor by binary search). Building the table needs a host-to-device copy, so it
// is built once per list of tensors and cached (key: device, pointers, numels, dtypes; small LRU): a
// repeated call copies nothing, never syncs, and can be captured in a CUDA graph. m comes either as a
// kernel argument or, read on the device, from a one-element fp32/fp64 tensor.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstring>
#include <iterator>
#include <list>
#include <memory>
#include <mutex>
#include <type_traits>
#include <vector>

#include "common.cuh"

namespace {

constexpr int64_t kChunk = 8192;  // elements per chunk (a multiple of every vector width x threads)
constexpr int kThreads = 256;
constexpr int kUnroll = 4;        // 16-byte vectors in flight per thread and array
constexpr int kBlocksPerSm = 4;   // what 256 threads x <= 64 registers allow
constexpr size_t kCacheSize = 8;

enum DType : int32_t { kF32 = 0, kF64 = 1, kBF16 = 2, kF16 = 3 };

struct EmaTensor {  // one row of the device table (32 bytes)
  void* pk;
  const void* pq;
  int64_t numel;
  int32_t dtype;
  int32_t vec_ok;  // both pointers 16-byte aligned
};

__device__ __forceinline__ float ema(float k, float q, float m, float om) {
  return __fadd_rn(__fmul_rn(k, m), __fmul_rn(q, om));
}
__device__ __forceinline__ double ema(double k, double q, double m, double om) {
  return __dadd_rn(__dmul_rn(k, m), __dmul_rn(q, om));
}

// p_k <- ema(p_k, p_q) on one 16-byte vector, kept packed in 32-bit words so that 16-bit elements do
// not each take a register.
template <typename scalar_t>
__device__ __forceinline__ uint32_t ema_word(uint32_t k, uint32_t q, float m, float om) {
  if constexpr (std::is_same<scalar_t, float>::value) {
    return __float_as_uint(ema(__uint_as_float(k), __uint_as_float(q), m, om));
  } else if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {  // two bf16: widen by a shift
    const uint32_t lo = c10::BFloat16(ema(__uint_as_float(k << 16), __uint_as_float(q << 16), m, om)).x;
    const uint32_t hi = c10::BFloat16(ema(__uint_as_float(k & 0xffff0000u), __uint_as_float(q & 0xffff0000u), m, om)).x;
    return lo | (hi << 16);
  } else {  // two fp16
    const auto f = [](uint32_t bits) { return static_cast<float>(c10::Half(static_cast<uint16_t>(bits), c10::Half::from_bits())); };
    const uint32_t lo = c10::Half(ema(f(k & 0xffffu), f(q & 0xffffu), m, om)).x;
    const uint32_t hi = c10::Half(ema(f(k >> 16), f(q >> 16), m, om)).x;
    return lo | (hi << 16);
  }
}

template <typename scalar_t, typename math_t>
__device__ __forceinline__ uint4 ema_vec(uint4 k, uint4 q, math_t m, math_t om) {
  if constexpr (std::is_same<scalar_t, double>::value) {
    const double lo = ema(__hiloint2double(k.y, k.x), __hiloint2double(q.y, q.x), m, om);
    const double hi = ema(__hiloint2double(k.w, k.z), __hiloint2double(q.w, q.z), m, om);
    return make_uint4(__double2loint(lo), __double2hiint(lo), __double2loint(hi), __double2hiint(hi));
  } else {
    return make_uint4(ema_word<scalar_t>(k.x, q.x, m, om), ema_word<scalar_t>(k.y, q.y, m, om),
                      ema_word<scalar_t>(k.z, q.z, m, om), ema_word<scalar_t>(k.w, q.w, m, om));
  }
}

// One chunk [0, n) of one tensor: 16-byte vectors (kUnroll per thread in flight), then a scalar tail.
template <typename scalar_t, typename math_t>
__device__ void ema_chunk(scalar_t* __restrict__ pk, const scalar_t* __restrict__ pq, int64_t n, bool vec_ok,
                          math_t m, math_t om) {
  constexpr int W = 16 / sizeof(scalar_t);
  const int nvec = vec_ok ? static_cast<int>(n / W) : 0;  // n <= kChunk
  uint4* pkv = reinterpret_cast<uint4*>(pk);
  const uint4* pqv = reinterpret_cast<const uint4*>(pq);
  for (int v0 = threadIdx.x; v0 < nvec; v0 += kThreads * kUnroll) {
    uint4 a[kUnroll], b[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)  // all loads first: 2 x kUnroll x 16 bytes in flight
      if (v0 + u * kThreads < nvec) a[u] = pkv[v0 + u * kThreads], b[u] = __ldg(pqv + v0 + u * kThreads);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (v0 + u * kThreads < nvec) pkv[v0 + u * kThreads] = ema_vec<scalar_t>(a[u], b[u], m, om);
  }
  for (int i = nvec * W + threadIdx.x; i < n; i += kThreads)
    pk[i] = static_cast<scalar_t>(ema(static_cast<math_t>(pk[i]), static_cast<math_t>(pq[i]), m, om));
}

// Grid-stride over all chunks of all tensors; chunk_begin[t] is the first chunk of tensor t and
// chunk_begin[num_tensors] the total. m_code: 0 = use m_arg, 1 = read fp32 *m_ptr, 2 = read fp64 *m_ptr.
__global__ void __launch_bounds__(kThreads, kBlocksPerSm)
    momentum_update_kernel(const int64_t* __restrict__ chunk_begin, const EmaTensor* __restrict__ tensors,
                           int num_tensors, double m_arg, const void* m_ptr, int m_code) {
  double m = m_arg;
  if (m_code == 1) m = static_cast<double>(*static_cast<const float*>(m_ptr));
  if (m_code == 2) m = *static_cast<const double*>(m_ptr);
  const double om = 1.0 - m;  // as the CPU: 1 - m in double, then rounded to the math type
  const int64_t total = chunk_begin[num_tensors];
  for (int64_t chunk = blockIdx.x; chunk < total; chunk += gridDim.x) {
    int lo = 0, hi = num_tensors;  // invariant: chunk_begin[lo] <= chunk < chunk_begin[hi]
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (chunk_begin[mid] <= chunk) lo = mid; else hi = mid;
    }
    const EmaTensor t = tensors[lo];
    const int64_t begin = (chunk - chunk_begin[lo]) * kChunk;
    const int64_t n = t.numel - begin < kChunk ? t.numel - begin : kChunk;
    const bool vec = t.vec_ok != 0;
    const float mf = static_cast<float>(m), omf = static_cast<float>(om);
    switch (t.dtype) {
      case kF32:
        ema_chunk<float, float>(static_cast<float*>(t.pk) + begin, static_cast<const float*>(t.pq) + begin, n, vec,
                                mf, omf);
        break;
      case kF64:
        ema_chunk<double, double>(static_cast<double*>(t.pk) + begin, static_cast<const double*>(t.pq) + begin, n,
                                  vec, m, om);
        break;
      case kBF16:
        ema_chunk<c10::BFloat16, float>(static_cast<c10::BFloat16*>(t.pk) + begin,
                                        static_cast<const c10::BFloat16*>(t.pq) + begin, n, vec, mf, omf);
        break;
      default:
        ema_chunk<c10::Half, float>(static_cast<c10::Half*>(t.pk) + begin,
                                    static_cast<const c10::Half*>(t.pq) + begin, n, vec, mf, omf);
        break;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// The cached device table.

struct Table {
  std::vector<int64_t> key;  // device, then (pk, pq, numel, dtype) per tensor
  at::Tensor host;           // pinned source of the copy, kept with the table
  at::Tensor dev;            // [chunk_begin (T + 1) x int64 | EmaTensor x T]
  int num_tensors = 0;
  int64_t total_chunks = 0;
  c10::StreamId stream_id = 0;  // the stream the table was built on
  bool in_graph = false;        // used while capturing a CUDA graph: never evicted (the graph holds its address)
};

int32_t dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: TORCH_CHECK(false, "momentum_update_: unsupported dtype ", t, " (expected float32/float64/bfloat16/float16)");
  }
  return kF32;
}

std::shared_ptr<Table> build_table(std::vector<int64_t> key, at::TensorList params_k, at::TensorList params_q,
                                   const at::Device& device) {
  auto table = std::make_shared<Table>();
  std::vector<int64_t> begins{0};
  std::vector<EmaTensor> rows;
  for (size_t t = 0; t < params_k.size(); ++t) {
    const at::Tensor &pk = params_k[t], &pq = params_q[t];
    if (pk.numel() == 0) continue;
    void* a = pk.data_ptr();
    const void* b = pq.data_ptr();
    const bool vec = reinterpret_cast<uintptr_t>(a) % 16 == 0 && reinterpret_cast<uintptr_t>(b) % 16 == 0;
    rows.push_back({a, b, pk.numel(), dtype_code(pk.scalar_type()), vec ? 1 : 0});
    begins.push_back(begins.back() + (pk.numel() + kChunk - 1) / kChunk);
  }
  const size_t begin_bytes = begins.size() * sizeof(int64_t), bytes = begin_bytes + rows.size() * sizeof(EmaTensor);
  table->key = std::move(key);
  table->num_tensors = static_cast<int>(rows.size());
  table->total_chunks = begins.back();
  table->host = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(table->host.data_ptr(), begins.data(), begin_bytes);
  std::memcpy(static_cast<char*>(table->host.data_ptr()) + begin_bytes, rows.data(), rows.size() * sizeof(EmaTensor));
  table->dev = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
  // An asynchronous copy on the current stream; copy_ records the pinned block's use on that stream.
  table->dev.copy_(table->host, /*non_blocking=*/true);
  table->stream_id = c10::cuda::getCurrentCUDAStream().id();
  return table;
}

std::shared_ptr<Table> cached_table(at::TensorList params_k, at::TensorList params_q, const at::Device& device,
                                    bool capturing) {
  static std::mutex mutex;
  static std::list<std::shared_ptr<Table>> lru;  // most recently used first
  std::vector<int64_t> key{device.index()};
  key.reserve(1 + 4 * params_k.size());
  for (size_t t = 0; t < params_k.size(); ++t) {
    key.push_back(reinterpret_cast<int64_t>(params_k[t].data_ptr()));
    key.push_back(reinterpret_cast<int64_t>(params_q[t].data_ptr()));
    key.push_back(params_k[t].numel());
    key.push_back(static_cast<int64_t>(params_k[t].scalar_type()));
  }
  std::lock_guard<std::mutex> lock(mutex);
  for (auto it = lru.begin(); it != lru.end(); ++it) {
    if ((*it)->key == key) {
      lru.splice(lru.begin(), lru, it);
      lru.front()->in_graph |= capturing;
      return lru.front();
    }
  }
  TORCH_CHECK(!capturing,
              "momentum_update_: the tensor table for this list of parameters is not built yet and the stream is "
              "being captured; call the op once before capturing (warm-up) so the table is built outside the graph");
  lru.push_front(build_table(std::move(key), params_k, params_q, device));
  if (lru.size() > kCacheSize) {  // evict the least recently used table that no graph refers to
    for (auto it = std::prev(lru.end()); it != lru.begin(); --it) {
      if (!(*it)->in_graph) {
        lru.erase(it);
        break;
      }
    }
  }
  return lru.front();
}

void check_pairs(at::TensorList params_k, at::TensorList params_q, const at::Device& device) {
  TORCH_CHECK(params_k.size() == params_q.size(), "momentum_update_: params_k has ", params_k.size(),
              " tensors but params_q has ", params_q.size());
  for (size_t t = 0; t < params_k.size(); ++t) {
    const at::Tensor &pk = params_k[t], &pq = params_q[t];
    TORCH_CHECK(pk.device() == device && pq.device() == device, "momentum_update_: pair ", t, " is on ", pk.device(),
                " and ", pq.device(), " but params_k[0] is on ", device, " (one launch needs one device)");
    TORCH_CHECK(pk.sizes() == pq.sizes() && pk.strides() == pq.strides() && pk.scalar_type() == pq.scalar_type(),
                "momentum_update_: pair ", t, " differs in shape, layout or dtype: params_k ", pk.sizes(), " ",
                pk.scalar_type(), ", params_q ", pq.sizes(), " ", pq.scalar_type());
    TORCH_CHECK(pk.is_non_overlapping_and_dense(), "momentum_update_: tensor ", t, " is not dense");
    dtype_code(pk.scalar_type());
  }
}

void momentum_update_cuda(at::TensorList params_k, at::TensorList params_q, const c10::optional<at::Tensor>& m_tensor,
                          double m) {
  if (params_k.empty()) {
    TORCH_CHECK(params_q.empty(), "momentum_update_: params_k has 0 tensors but params_q has ", params_q.size());
    return;
  }
  const at::Device device = params_k[0].device();
  TORCH_CHECK(device.is_cuda(), "momentum_update_: params_k[0] must be a CUDA tensor; got ", device);
  check_pairs(params_k, params_q, device);
  int m_code = 0;
  const void* m_ptr = nullptr;
  if (m_tensor.has_value()) {
    const at::Tensor& mt = *m_tensor;
    TORCH_CHECK(mt.numel() == 1 && (mt.scalar_type() == at::kFloat || mt.scalar_type() == at::kDouble),
                "momentum_update_: m_tensor must be one float32/float64 element; got ", mt.scalar_type(), " ",
                mt.sizes());
    TORCH_CHECK(mt.device() == device, "momentum_update_: m_tensor is on ", mt.device(), " but the params are on ",
                device);
    m_code = mt.scalar_type() == at::kFloat ? 1 : 2;
    m_ptr = mt.data_ptr();
  }
  c10::cuda::CUDAGuard guard(device);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &capture));
  const std::shared_ptr<Table> table =
      cached_table(params_k, params_q, device, capture != cudaStreamCaptureStatusNone);
  if (table->total_chunks == 0) return;
  if (stream.id() != table->stream_id) table->dev.record_stream(stream);  // keep the table alive for this stream
  const int sms = moco_fast_cuda::sm_count(device.index());
  const int64_t blocks = std::min<int64_t>(table->total_chunks, static_cast<int64_t>(sms) * kBlocksPerSm);
  const auto* begins = static_cast<const int64_t*>(table->dev.data_ptr());
  const auto* rows = reinterpret_cast<const EmaTensor*>(begins + table->num_tensors + 1);
  momentum_update_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream.stream()>>>(
      begins, rows, table->num_tensors, m, m_ptr, m_code);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY_IMPL(moco_fast, CUDA, m) { m.impl("momentum_update_kernel_", &momentum_update_cuda); }
