// InfoNCE engine "v1" (MOCO_FAST_CUDA_INFONCE=v1, the default): the partial kernel of infonce.cu's step 1.
// Included by infonce.cu only. Per queue tile (4 warps; tiles staged in shared memory with cp.async
// double buffering; three __syncthreads per tile):
//   S = Q . V^T   [BM x BN] fp32 scores -> shared memory
//   softmax       per row: tile max; a lazy reference max m, moved only when the max grows by more than
//                 kLazy (so the O rescale is rare and P <= e^8 fits fp16); P = exp(s - m); l += sum P;
//                 above += #(s > pos)
//   O += P . V    [BM x CP] fp32 accumulators; the second matmul reuses the staged tile.
// Precision (allow_tf32 read as "fp32 operands may be rounded", like torch's flag):
//   MmaEngine<bf16|fp16>  WMMA 16x16x16 when the queue is 16-bit and q has its dtype, or q is fp32 and
//                         allow_tf32 (q is then rounded to the queue's dtype: the fastest path).
//   MmaEngine<tf32>       WMMA 16x16x8 for the other allow_tf32 cases (16-bit values convert exactly).
//   FmaEngine             plain fp32 FMA ("highest"; q pre-scaled by 1/T as on the CPU), and every C > 256
//                         (an MmaEngine keeps O in fragments: C <= 256 there).
// C is padded with zeros to CP in {128, 256, 512, 1024}.
//
// Floors at N=256 C=128 K=65,536 (H200: 132 SMs), MmaEngine<tf32> (fp32 queue; BM=64, BN=32, 86.5 KB of
// shared memory, 2 CTAs per SM, 4 row blocks x 66 splits):
//   DRAM   the queue once, 32 MiB (bf16: 16 MiB; 7 us at 4.8 TB/s), + q, k 0.25 MiB; partials
//          66 x 256 x 131 x 4 B = 8.9 MB written and read back by the combine (L2-resident if they stay there)
//   L2     each of the 4 row blocks streams the whole queue: 128 MiB (bf16: 64 MiB) from L2 to the SMs
//   smem   per 32-key tile and CTA: 16 KiB cp.async in, 32 KiB TF32 rounding, 4 warps x (8 KiB Q + 16 KiB
//          V) for S, 8 KiB S out, 16 KiB softmax, 4 x (2 KiB P + 16 KiB V) for O: 240 KiB per 1.05 MFLOP,
//          2.0 GB in all, ~60 us at 128 B/clk/SM x 132 SMs x 1.98 GHz (33 TB/s); bf16 (BN = 64: 208 KiB
//          per 2.1 MFLOP) 0.87 GB, ~26 us
//   MMA    4 N K C = 8.6 GFLOP: 17 us at H200's dense TF32 peak (494 TFLOP/s, a wgmma figure; the WMMA /
//          mma.sync path used here issues at a fraction of it), 8.7 us at the bf16 peak (989 TFLOP/s)
#pragma once

#include <mma.h>

#include <algorithm>
#include <type_traits>

#include "infonce_common.cuh"

namespace {
namespace v1 {

namespace wmma = nvcuda::wmma;

constexpr int kThreads = 128;  // 4 warps per CTA

// T: the element type in shared memory; Frag, KS: WMMA operand type and k-step; kIn: the input type
// whose rows can be copied raw into a T tile.
struct OpF32 {
  using T = float;
  static constexpr int kIn = kInF32;
  __device__ static float to(float x) { return x; }
  __device__ static float from(float x) { return x; }
};
struct OpTF32 : OpF32 {  // fp32 in shared memory, rounded to tf32 on the way in
  using Frag = wmma::precision::tf32;
  static constexpr int KS = 8;
  __device__ static float to(float x) { return wmma::__float_to_tf32(x); }
};
struct OpBF16 {
  using T = __nv_bfloat16;
  using Frag = T;
  static constexpr int kIn = kInBF16, KS = 16;
  __device__ static T to(float x) { return __float2bfloat16(x); }
  __device__ static float from(T x) { return __bfloat162float(x); }
};
struct OpF16 {
  using T = __half;
  using Frag = T;
  static constexpr int kIn = kInF16, KS = 16;
  __device__ static T to(float x) { return __float2half_rn(x); }
  __device__ static float from(T x) { return __half2float(x); }
};

// An engine: tile sizes, shared-memory strides in elements (rows padded by 16 bytes against bank
// conflicts, which keeps WMMA's 32-byte alignment) and the two matmuls of a tile.
// MmaEngine: warp w owns rows 16w..16w+15 of S, P and O; O lives in WMMA accumulator fragments.
template <class Op_, int CP_>
struct MmaEngine {
  using Op = Op_;
  using T = typename Op::T;
  static constexpr int CP = CP_, BM = 64, BN = CP * sizeof(T) <= 256 ? 64 : 32, KS = Op::KS;
  static constexpr int LD = CP + 16 / sizeof(T), LDS = BN + 4, LDP = BN + 16 / sizeof(T);
  static constexpr bool kPrescale = false, kRoundRaw = std::is_same<Op, OpTF32>::value;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, KS, float>;
  using FragA = wmma::fragment<wmma::matrix_a, 16, 16, KS, typename Op::Frag, wmma::row_major>;
  template <class Layout>
  using FragB = wmma::fragment<wmma::matrix_b, 16, 16, KS, typename Op::Frag, Layout>;
  Acc o[CP / 16];  // this warp's 16 rows x CP columns of O

  __device__ void init() { UNROLL for (int cb = 0; cb < CP / 16; ++cb) wmma::fill_fragment(o[cb], 0.f); }
  // S rows of warp w = Q rows . V^T (the row-major [BN x CP] tile read column-major is V^T).
  __device__ void scores(const T* Q, const T* V, float* S) const {
    const int w = threadIdx.x / 32;
    Acc s[BN / 16];
    UNROLL for (int jb = 0; jb < BN / 16; ++jb) wmma::fill_fragment(s[jb], 0.f);
    UNROLL for (int kk = 0; kk < CP; kk += KS) {
      FragA a;
      wmma::load_matrix_sync(a, Q + 16 * w * LD + kk, LD);
      UNROLL for (int jb = 0; jb < BN / 16; ++jb) {
        FragB<wmma::col_major> b;
        wmma::load_matrix_sync(b, V + 16 * jb * LD + kk, LD);
        wmma::mma_sync(s[jb], a, b, s[jb]);
      }
    }
    UNROLL for (int jb = 0; jb < BN / 16; ++jb)
      wmma::store_matrix_sync(S + 16 * w * LDS + 16 * jb, s[jb], LDS, wmma::mem_row_major);
  }
  // O rows of warp w += P rows . V
  __device__ void accumulate(const T* P, const T* V) {
    const int w = threadIdx.x / 32;
#pragma unroll 1
    for (int kk = 0; kk < BN; kk += KS) {
      FragA a;
      wmma::load_matrix_sync(a, P + 16 * w * LDP + kk, LDP);
      UNROLL for (int cb = 0; cb < CP / 16; ++cb) {
        FragB<wmma::row_major> b;
        wmma::load_matrix_sync(b, V + kk * LD + 16 * cb, LD);
        wmma::mma_sync(o[cb], a, b, o[cb]);
      }
    }
  }
  // f(row, column, value&) on every element of O, through a 16 x 16 per-warp scratch (the fragment
  // layout is opaque); write_back loads the scratch back into the fragment.
  template <class F>
  __device__ void visit(float* scratch, bool write_back, F f) {
    const int w = threadIdx.x / 32;
    float* sc = scratch + 256 * w;
    UNROLL for (int cb = 0; cb < CP / 16; ++cb) {
      wmma::store_matrix_sync(sc, o[cb], 16, wmma::mem_row_major);
      __syncwarp();
      for (int e = threadIdx.x % 32; e < 256; e += 32) f(16 * w + e / 16, 16 * cb + e % 16, sc[e]);
      __syncwarp();
      if (write_back) wmma::load_matrix_sync(o[cb], sc, 16, wmma::mem_row_major);
      __syncwarp();
    }
  }
  __device__ void rescale(const float* alpha, float* scratch) {
    visit(scratch, true, [&](int r, int, float& x) { x *= alpha[r]; });
  }
  __device__ void store(float* out, int ld, int rows, int C, float* scratch) {
    visit(scratch, false, [&](int r, int c, float& x) {
      if (r < rows && c < C) out[static_cast<int64_t>(r) * ld + c] = x;
    });
  }
};

// FmaEngine: thread (ty, tx) of 16 x 8 owns rows ty + 16a, S columns tx + 8b, O columns 32m + 4tx + e
// (float4 shared-memory reads, conflict-free with the +4 padding).
template <int CP_>
struct FmaEngine {
  using Op = OpF32;
  using T = float;
  static constexpr int CP = CP_, BM = CP <= 128 ? 64 : CP <= 256 ? 32 : 16, BN = CP <= 512 ? 32 : 16;
  static constexpr int LD = CP + 4, LDS = BN + 4, LDP = BN + 4;
  static constexpr bool kPrescale = true, kRoundRaw = false;
  static constexpr int RA = BM / 16, CB = BN / 8, OC = CP / 32;
  float o[RA][OC][4];

  __device__ void init() {
    UNROLL for (int a = 0; a < RA; ++a) UNROLL for (int m = 0; m < OC; ++m) UNROLL for (int e = 0; e < 4; ++e)
      o[a][m][e] = 0.f;
  }
  __device__ void scores(const float* Q, const float* V, float* S) const {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    float acc[RA][CB] = {};
#pragma unroll 4
    for (int c = 0; c < CP; c += 4) {
      float4 qa[RA], vb[CB];
      UNROLL for (int a = 0; a < RA; ++a) qa[a] = *reinterpret_cast<const float4*>(Q + (ty + 16 * a) * LD + c);
      UNROLL for (int b = 0; b < CB; ++b) vb[b] = *reinterpret_cast<const float4*>(V + (tx + 8 * b) * LD + c);
      UNROLL for (int a = 0; a < RA; ++a) UNROLL for (int b = 0; b < CB; ++b) {
        acc[a][b] = fmaf(qa[a].x, vb[b].x, acc[a][b]);
        acc[a][b] = fmaf(qa[a].y, vb[b].y, acc[a][b]);
        acc[a][b] = fmaf(qa[a].z, vb[b].z, acc[a][b]);
        acc[a][b] = fmaf(qa[a].w, vb[b].w, acc[a][b]);
      }
    }
    UNROLL for (int a = 0; a < RA; ++a) UNROLL for (int b = 0; b < CB; ++b)
      S[(ty + 16 * a) * LDS + tx + 8 * b] = acc[a][b];
  }
  __device__ void accumulate(const float* P, const float* V) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
#pragma unroll 2
    for (int j = 0; j < BN; ++j) {
      float pa[RA];
      UNROLL for (int a = 0; a < RA; ++a) pa[a] = P[(ty + 16 * a) * LDP + j];
      UNROLL for (int m = 0; m < OC; ++m) {
        const float4 v = *reinterpret_cast<const float4*>(V + j * LD + 32 * m + 4 * tx);
        UNROLL for (int a = 0; a < RA; ++a) {
          o[a][m][0] = fmaf(pa[a], v.x, o[a][m][0]);
          o[a][m][1] = fmaf(pa[a], v.y, o[a][m][1]);
          o[a][m][2] = fmaf(pa[a], v.z, o[a][m][2]);
          o[a][m][3] = fmaf(pa[a], v.w, o[a][m][3]);
        }
      }
    }
  }
  __device__ void rescale(const float* alpha, float*) {
    UNROLL for (int a = 0; a < RA; ++a) UNROLL for (int m = 0; m < OC; ++m) UNROLL for (int e = 0; e < 4; ++e)
      o[a][m][e] *= alpha[threadIdx.x / 8 + 16 * a];
  }
  __device__ void store(float* out, int ld, int rows, int C, float*) {
    const int ty = threadIdx.x / 8, tx = threadIdx.x % 8;
    UNROLL for (int a = 0; a < RA; ++a) UNROLL for (int m = 0; m < OC; ++m) UNROLL for (int e = 0; e < 4; ++e) {
      const int r = ty + 16 * a, c = 32 * m + 4 * tx + e;
      if (r < rows && c < C) out[static_cast<int64_t>(r) * ld + c] = o[a][m][e];
    }
  }
};

template <class E>
struct Smem {  // byte sizes of the shared-memory regions, each a multiple of 128
  using T = typename E::T;
  static constexpr int q = up128(E::BM * E::LD * sizeof(T)), v = up128(E::BN * E::LD * sizeof(T));
  static constexpr int s = up128(E::BM * E::LDS * sizeof(float)), p = up128(E::BM * E::LDP * sizeof(T));
  static constexpr int bytes = q + 2 * v + s + p + 2 * E::BM * 4 + 16;
};

// Stage queue tile t (rows t*BN ...) into V: raw cp.async chunks, zero-filled past K, or converted.
template <class E>
__device__ void load_tile(const Params& p, typename E::T* V, int t) {
  const int64_t j0 = static_cast<int64_t>(t) * E::BN;
  const int valid = static_cast<int>(p.K - j0 < E::BN ? p.K - j0 : E::BN);
  if (p.raw) {
    const int chunks = p.C * static_cast<int>(sizeof(typename E::T)) / 16;
    const char* src = static_cast<const char*>(p.queue);
    for (int e = threadIdx.x; e < E::BN * chunks; e += kThreads) {
      const int r = e / chunks, ch = e % chunks;
      const char* g = r < valid ? src + ((j0 + r) * p.C * sizeof(typename E::T) + ch * 16) : src;
      cp_async16(reinterpret_cast<char*>(V + r * E::LD) + ch * 16, g, r < valid ? 16 : 0);
    }
  } else {
    for (int e = threadIdx.x; e < E::BN * E::CP; e += kThreads) {
      const int r = e / E::CP, c = e % E::CP;
      V[r * E::LD + c] = E::Op::to(r < valid && c < p.C ? load_f(p.queue, p.vt, (j0 + r) * p.C + c) : 0.f);
    }
  }
}

// TF32 with raw copies: round the chunks this thread copied (visible to it after its wait).
template <class E>
__device__ void round_tile(typename E::T* V, int C) {
  if constexpr (E::kRoundRaw) {
    for (int e = threadIdx.x; e < E::BN * (C / 4); e += kThreads) {
      float4* v = reinterpret_cast<float4*>(V + (e / (C / 4)) * E::LD) + e % (C / 4);
      const float4 x = *v;
      *v = make_float4(E::Op::to(x.x), E::Op::to(x.y), E::Op::to(x.z), E::Op::to(x.w));
    }
  }
}

struct RowState {     // per softmax lane; kThreads / BM consecutive lanes share a row
  float m = kNegInf;  // reference max, the same in all lanes of the row
  float l = 0.f;      // this lane's sum of exp(s - m)
  int above = 0;      // this lane's count of s > pos
};

template <class E>
__device__ void softmax_tile(const float* S, typename E::T* P, const float* pos, float* alpha, int* flag,
                             RowState& st, int valid, float scale) {
  constexpr int LPR = kThreads / E::BM, CPL = E::BN / LPR;
  const int r = threadIdx.x / LPR, part = threadIdx.x % LPR;
  float s[CPL], tmax = kNegInf;
  UNROLL for (int u = 0; u < CPL; ++u) {
    const int j = part + LPR * u;
    s[u] = j < valid ? __fmul_rn(S[r * E::LDS + j], scale) : kNegInf;
    tmax = fmaxf(tmax, s[u]);
    st.above += s[u] > pos[r];
  }
  UNROLL for (int o = LPR / 2; o > 0; o /= 2) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
  float a = 1.f;
  if (tmax > st.m + kLazy) {  // the first tile (m = -inf: a = 0 and O is still 0), or the max grew a lot
    a = __expf(st.m - tmax);
    if (st.m != kNegInf && part == 0) *flag = 1;
    st.m = tmax;
    st.l *= a;
  }
  if (part == 0) alpha[r] = a;
  UNROLL for (int u = 0; u < CPL; ++u) {
    const auto w = E::Op::to(__expf(s[u] - st.m));
    P[r * E::LDP + part + LPR * u] = w;
    st.l += E::Op::from(w);  // the rounded weight, so that numerator and denominator agree
  }
}

template <class E>
__global__ void __launch_bounds__(kThreads) infonce_fwd_kernel(const Params p) {
  using T = typename E::T;
  using L = Smem<E>;
  constexpr int BM = E::BM, CP = E::CP, LD = E::LD, LPR = kThreads / BM;
  extern __shared__ __align__(128) unsigned char smem[];
  T* Q = reinterpret_cast<T*>(smem);                                          // [BM][LD] rows of q
  const auto Vb = [&](int b) { return reinterpret_cast<T*>(smem + L::q + b * L::v); };  // 2 x [BN][LD]
  float* S = reinterpret_cast<float*>(smem + L::q + 2 * L::v);                // [BM][LDS] scaled scores
  T* P = reinterpret_cast<T*>(smem + L::q + 2 * L::v + L::s);                 // [BM][LDP] weights
  float* alpha = reinterpret_cast<float*>(smem + L::q + 2 * L::v + L::s + L::p);  // [BM] O rescale
  float* pos = alpha + BM;                                                    // [BM] positive logits
  int* flag = reinterpret_cast<int*>(pos + BM);                               // some row moved its m
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = static_cast<int>(p.N - row0 < BM ? p.N - row0 : BM);
  const int t0 = static_cast<int>(static_cast<int64_t>(p.tiles) * blockIdx.y / p.splits);
  const int t1 = static_cast<int>(static_cast<int64_t>(p.tiles) * (blockIdx.y + 1) / p.splits);

  for (int e = threadIdx.x; e < BM * CP; e += kThreads) {  // Q, zero past N and C
    const int r = e / CP, c = e % CP;
    const float x = r < rows && c < p.C ? load_f(p.q, p.qt, (row0 + r) * p.C + c) : 0.f;
    Q[r * LD + c] = E::Op::to(E::kPrescale ? __fmul_rn(x, p.inv_t) : x);
  }
  if (p.raw)  // raw copies never write the padding columns: zero them once
    for (int e = threadIdx.x; e < 2 * E::BN * CP; e += kThreads)
      if (e % CP >= p.C) Vb(e / (E::BN * CP))[(e / CP) % E::BN * LD + e % CP] = E::Op::to(0.f);
  for (int r = threadIdx.x / 32; r < BM; r += kThreads / 32) {  // positives, one warp per row
    const float x = r < rows ? warp_positive(p.q, p.qt, p.k, p.kt, row0 + r, p.C, p.inv_t) : 0.f;
    if (threadIdx.x % 32 == 0) pos[r] = x;
  }

  E eng;
  eng.init();
  RowState st;
  if (t0 < t1) load_tile<E>(p, Vb(0), t0);
  cp_async_commit();
  for (int t = t0; t < t1; ++t) {
    T* V = Vb((t - t0) & 1);
    cp_async_wait_all();
    if (p.raw) round_tile<E>(V, p.C);
    __syncthreads();  // tile t is visible, and every thread is done with tile t - 1, whose buffer is free
    if (t + 1 < t1) load_tile<E>(p, Vb((t + 1 - t0) & 1), t + 1);
    cp_async_commit();
    if (threadIdx.x == 0) *flag = 0;
    eng.scores(Q, V, S);
    __syncthreads();
    const int64_t left = p.K - static_cast<int64_t>(t) * E::BN;
    softmax_tile<E>(S, P, pos, alpha, flag, st, left < E::BN ? static_cast<int>(left) : E::BN,
                    E::kPrescale ? 1.f : p.inv_t);
    __syncthreads();
    if (*flag) eng.rescale(alpha, S);  // S serves as scratch until the next tile's scores
    eng.accumulate(P, V);
  }
  cp_async_wait_all();

  // This split's partials: ws[split][row][0:C] = O, [C] = m, [C + 1] = l, [C + 2] = above.
  float* out = p.ws + (static_cast<int64_t>(blockIdx.y) * p.N + row0) * (p.C + 3);
  UNROLL for (int o = LPR / 2; o > 0; o /= 2) {
    st.l += __shfl_xor_sync(0xffffffffu, st.l, o);
    st.above += __shfl_xor_sync(0xffffffffu, st.above, o);
  }
  const int r = threadIdx.x / LPR;
  if (threadIdx.x % LPR == 0 && r < rows) {
    float* o = out + static_cast<int64_t>(r) * (p.C + 3) + p.C;
    o[0] = st.m, o[1] = st.l, o[2] = static_cast<float>(st.above);
  }
  eng.store(out, p.C + 3, rows, p.C, S);
}


// Launch kernel 1 with engine E (one wave of CTAs); returns the workspace, sets p.tiles/splits/raw/ws.
template <class E>
at::Tensor run_partials(Params& p, const at::Tensor& queue, cudaStream_t stream) {
  constexpr int bytes = Smem<E>::bytes;
  return launch_partials(infonce_fwd_kernel<E>, p, E::BM, E::BN, kThreads, bytes, p.vt == E::Op::kIn,
                         sizeof(typename E::T), queue, stream);
}

template <int CP>
at::Tensor dispatch_engine(Params& p, const at::Tensor& queue, bool allow_tf32, cudaStream_t stream) {
  if constexpr (CP <= 256) {
    if (p.vt != kInF32 && (p.qt == p.vt || (p.qt == kInF32 && allow_tf32)))
      return p.vt == kInBF16 ? run_partials<MmaEngine<OpBF16, CP>>(p, queue, stream)
                             : run_partials<MmaEngine<OpF16, CP>>(p, queue, stream);
    if (allow_tf32) return run_partials<MmaEngine<OpTF32, CP>>(p, queue, stream);
  }
  return run_partials<FmaEngine<CP>>(p, queue, stream);
}

}  // namespace v1
}  // namespace
