// InfoNCE engine "v2" (MOCO_FAST_CUDA_INFONCE=v2): the partial kernel of infonce.cu's step 1, same outputs
// and numerics as v1's MmaEngine (fp32 accumulation, TF32 operands rounded to nearest, 16-bit operands as
// they are, weights P rounded to the operand type and l summing the rounded weights, kLazy reference max).
// Included by infonce.cu only.
//
// Warp w of 8 owns rows 16w..16w+15 of the CTA's BM = 128 and keeps, in registers across every key tile:
// its Q operand fragments (loaded once from global memory, rounded and zero-padded), its O accumulators
// [16 x 128], m, l and the rank counts. Per 64-key tile (raw mma.sync, fragment layouts of the PTX ISA):
//   S = Q . V^T   the tile's B operand by ldmatrix.x4 (also for fp32 data: an 8x8 b16 matrix is 8 x 4 fp32)
//   softmax       in the S accumulators: the row max over the 4 lanes of a quad by two shuffles
//   O += P . V    P's A operand is S's accumulator layout (16-bit: two S blocks pack into one A; TF32:
//                 the 8 keys of a block are taken in the order 0,2,4,6,1,3,5,7 so that c0..c3 are a0..a3)
// so a warp never writes shared memory and never waits for another warp between the products. The key
// tiles come through a 3-stage cp.async ring: ONE __syncthreads per tile (it publishes tile t and frees
// tile t-1's stage, which the next load then refills).
// Shared-memory reads are conflict-free: rows of 272 (16-bit) or 528 (fp32) bytes put the 8 rows of an
// ldmatrix phase in distinct banks; TF32's P.V reads 128-bit vectors whose O columns are permuted
// (n-tile 4q+j, column n <-> channel 32q + 4n + j), undone when O is stored.
//
// Covers C <= 128 (CP = 128) on the MMA paths, the engine choice of v1: bf16/fp16 MMA m16n8k16 when the
// queue is 16-bit and q has its dtype (or q is fp32 and allow_tf32: q rounded to the queue's dtype), TF32
// MMA m16n8k8 for the other allow_tf32 cases. Everything else (C > 128, whose O would not fit in
// registers; fp32 without allow_tf32, v1's FMA engine) runs v1: see handles(). Warps whose 16 rows lie
// past N skip the math (N = 32 keeps 2 of 8 warps busy; the split count fills the GPU instead).
//
// Floors at N=256 C=128 K=65,536 (H200: 132 SMs, 1 CTA of 8 warps per SM, 2 row blocks x 66 splits):
//   DRAM   the queue once, 32 MiB (bf16: 16 MiB; 7 us at 4.8 TB/s), + q, k 0.25 MiB; partials
//          66 x 256 x 131 x 4 B = 8.9 MB written and read back by the combine (as v1)
//   L2     each of the 2 row blocks streams the queue: 64 MiB (bf16: 32 MiB) from L2 to the SMs (v1: 128)
//   smem   per 64-key tile and CTA (4.19 MFLOP): 32 KiB cp.async in, 64 KiB TF32 rounding, 8 warps x 2 x
//          32 KiB reads = 608 KiB, 145 KiB/MFLOP (v1: 229), 1.3 GB in all: ~38 us at 128 B/clk/SM x 132
//          x 1.98 GHz (33 TB/s), the bound of this design in TF32; bf16: 16 + 8 x 2 x 16 KiB = 272 KiB,
//          65 KiB/MFLOP, 0.57 GB, ~17 us. (32 rows per warp would halve the reads, but O alone would then
//          take 128 registers; wgmma reads B once per 64-row warpgroup.)
//   MMA    4 N K C = 8.6 GFLOP: 17 us at H200's dense TF32 peak (494 TFLOP/s, a wgmma figure; mma.sync
//          issues at a fraction of it on sm_90), 8.7 us at the bf16 peak (989 TFLOP/s)
// Shared memory: 3 x 64 x 132 x 4 = 99 KB (TF32) or 3 x 64 x 136 x 2 = 51 KB (16-bit), opted in above 48 KB.
// ptxas (nvcc 13.0, sm_90, -O3): TF32 251 registers, bf16 231, fp16 225; no spills; 1 barrier. Per tile and
// warp: TF32 256 mma + 64 ldmatrix + 64 128-bit loads; 16-bit 128 mma + 64 ldmatrix. Hence 1 CTA per SM.
#pragma once

#include <algorithm>
#include <cstring>

#include "infonce_common.cuh"

namespace {
namespace v2 {

constexpr int kWarps = 8, kThreads = 32 * kWarps;
constexpr int BM = 16 * kWarps;  // rows per CTA
constexpr int BN = 64;           // keys per tile
constexpr int CP = 128;          // C padded with zeros to this
constexpr int kStages = 3;       // cp.async ring depth

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ uint32_t bits(float x) { return __float_as_uint(x); }

// Per operand type: T in shared memory, LD its row stride in elements, to()/from() the rounding of
// operands and weights, mma() one m16n8 step, q_frag() Q's A operand for k-step kc, accumulate() O += P.V
// on one tile, store() O's columns. Lane = 4 g + t (PTX's groupID g, threadID_in_group t); a thread's S
// and O accumulators hold rows g (elements 0, 1) and g + 8 (elements 2, 3).
struct TF32 {
  using T = float;
  static constexpr int kIn = kInF32, KS = 8, LD = CP + 4;
  static constexpr bool kRoundRaw = true;  // raw fp32 copies are rounded in shared memory, as v1
  __device__ static float to(float x) {
    uint32_t r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return __uint_as_float(r);
  }
  __device__ static float from(float x) { return x; }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  template <class F>  // a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4) of columns 8 kc..
  __device__ static void q_frag(uint32_t (&a)[4], F q, int kc, int g, int t) {
    a[0] = bits(to(q(g, 8 * kc + t))), a[1] = bits(to(q(g + 8, 8 * kc + t)));
    a[2] = bits(to(q(g, 8 * kc + t + 4))), a[3] = bits(to(q(g + 8, 8 * kc + t + 4)));
  }
  // Key block nb: logical k = t <-> key 2t, k = t + 4 <-> key 2t + 1, so that A = (c0, c2, c1, c3) of S's
  // block and B = rows 2t, 2t + 1 of V. O's n-tile 4q + j, column n holds channel 32q + 4n + j, so that
  // one 128-bit read of row key at channel 32q + 4g gives the B elements of 4 n-tiles.
  __device__ static void accumulate(float (&o)[CP / 8][4], const float (&s)[BN / 8][4], const float* V, int g,
                                    int t) {
    UNROLL for (int nb = 0; nb < BN / 8; ++nb) {
      const uint32_t a[4] = {bits(s[nb][0]), bits(s[nb][2]), bits(s[nb][1]), bits(s[nb][3])};
      const float* v0 = V + (8 * nb + 2 * t) * LD + 4 * g;
      UNROLL for (int q = 0; q < CP / 32; ++q) {
        const float4 b0 = *reinterpret_cast<const float4*>(v0 + 32 * q);
        const float4 b1 = *reinterpret_cast<const float4*>(v0 + LD + 32 * q);
        mma(o[4 * q + 0], a, bits(b0.x), bits(b1.x));
        mma(o[4 * q + 1], a, bits(b0.y), bits(b1.y));
        mma(o[4 * q + 2], a, bits(b0.z), bits(b1.z));
        mma(o[4 * q + 3], a, bits(b0.w), bits(b1.w));
      }
    }
  }
  // element e of n-tile nt: row g + 8 (e / 2), channel 32 (nt / 4) + 8 t + 4 (e % 2) + nt % 4
  __device__ static int channel(int nt, int e, int t) { return 32 * (nt / 4) + 8 * t + 4 * (e % 2) + nt % 4; }
};

template <class T_, int kIn_>
struct Half16 {  // bf16 or fp16
  using T = T_;
  static constexpr int kIn = kIn_, KS = 16, LD = CP + 8;
  static constexpr bool kRoundRaw = false;
  __device__ static T to(float x) {
    if constexpr (kIn == kInBF16) return __float2bfloat16(x);
    else return __float2half_rn(x);
  }
  __device__ static float from(T x) {
    if constexpr (kIn == kInBF16) return __bfloat162float(x);
    else return __half2float(x);
  }
  __device__ static uint32_t pack(float lo, float hi) {  // lo in the low half: the lower k index
    T h[2] = {to(lo), to(hi)};
    uint32_t u;
    memcpy(&u, h, 4);
    return u;
  }
  __device__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    if constexpr (kIn == kInBF16)
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                   "{%8, %9}, {%0, %1, %2, %3};\n"
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
      asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                   "{%8, %9}, {%0, %1, %2, %3};\n"
                   : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  template <class F>  // a0 (g, 2t..2t+1), a1 (g + 8, 2t..), a2 (g, 2t+8..2t+9), a3 (g + 8, 2t+8..) of 16 kc..
  __device__ static void q_frag(uint32_t (&a)[4], F q, int kc, int g, int t) {
    const int c = 16 * kc + 2 * t;
    a[0] = pack(q(g, c), q(g, c + 1)), a[1] = pack(q(g + 8, c), q(g + 8, c + 1));
    a[2] = pack(q(g, c + 8), q(g, c + 9)), a[3] = pack(q(g + 8, c + 8), q(g + 8, c + 9));
  }
  // Key chunk kc (16 keys) = S blocks 2kc, 2kc + 1; B of n-tiles 2u, 2u + 1 by one ldmatrix.x4.trans:
  // lane i gives row 16 kc + 8 ((i / 8) % 2) + i % 8, channel 8 (2u + i / 16).
  __device__ static void accumulate(float (&o)[CP / 8][4], const float (&s)[BN / 8][4], const T* V, int g,
                                    int t) {
    const int lane = 4 * g + t;
    const unsigned base = smem_addr(V + (8 * ((lane / 8) % 2) + lane % 8) * LD + 8 * (lane / 16));
    UNROLL for (int kc = 0; kc < BN / 16; ++kc) {
      const uint32_t a[4] = {pack(s[2 * kc][0], s[2 * kc][1]), pack(s[2 * kc][2], s[2 * kc][3]),
                             pack(s[2 * kc + 1][0], s[2 * kc + 1][1]), pack(s[2 * kc + 1][2], s[2 * kc + 1][3])};
      UNROLL for (int u = 0; u < CP / 16; ++u) {
        uint32_t b[4];
        ldsm_x4_trans(b, base + static_cast<unsigned>((16 * kc * LD + 16 * u) * sizeof(T)));
        mma(o[2 * u], a, b[0], b[1]);
        mma(o[2 * u + 1], a, b[2], b[3]);
      }
    }
  }
  __device__ static int channel(int nt, int e, int t) { return 8 * nt + 2 * t + e % 2; }
};
using BF16 = Half16<__nv_bfloat16, kInBF16>;
using F16 = Half16<__half, kInF16>;

// Stage queue tile t (rows t*BN ...) into V: raw cp.async chunks, zero-filled past K, or converted.
template <class Op>
__device__ void load_tile(const Params& p, typename Op::T* V, int t) {
  using T = typename Op::T;
  const int64_t j0 = static_cast<int64_t>(t) * BN;
  const int valid = static_cast<int>(p.K - j0 < BN ? p.K - j0 : BN);
  if (p.raw) {
    const int chunks = p.C * static_cast<int>(sizeof(T)) / 16;
    const char* src = static_cast<const char*>(p.queue);
    for (int e = threadIdx.x; e < BN * chunks; e += kThreads) {
      const int r = e / chunks, ch = e % chunks;
      const char* gp = r < valid ? src + ((j0 + r) * p.C * sizeof(T) + ch * 16) : src;
      cp_async16(reinterpret_cast<char*>(V + r * Op::LD) + ch * 16, gp, r < valid ? 16 : 0);
    }
  } else {
    for (int e = threadIdx.x; e < BN * CP; e += kThreads) {
      const int r = e / CP, c = e % CP;
      V[r * Op::LD + c] = Op::to(r < valid && c < p.C ? load_f(p.queue, p.vt, (j0 + r) * p.C + c) : 0.f);
    }
  }
}

// TF32 with raw copies: round the chunks this thread copied (the same e as load_tile; visible to it
// after its own wait, to the others after the barrier).
template <class Op>
__device__ void round_tile(typename Op::T* V, int C) {
  if constexpr (Op::kRoundRaw) {
    for (int e = threadIdx.x; e < BN * (C / 4); e += kThreads) {
      float4* v = reinterpret_cast<float4*>(V + (e / (C / 4)) * Op::LD) + e % (C / 4);
      const float4 x = *v;
      *v = make_float4(Op::to(x.x), Op::to(x.y), Op::to(x.z), Op::to(x.w));
    }
  }
}

template <class Op>
__global__ void __launch_bounds__(kThreads, 1) infonce_fwd_v2_kernel(const Params p) {
  using T = typename Op::T;
  constexpr int LD = Op::LD, KP = CP / (2 * Op::KS);  // KP: pairs of k-steps, one ldmatrix.x4 each
  constexpr int kStage = BN * LD * static_cast<int>(sizeof(T));  // bytes, a multiple of 128
  static_assert(kStage % 128 == 0 && (LD * sizeof(T)) % 128 == 16, "rows must shift the banks by 16 bytes");
  extern __shared__ __align__(128) unsigned char smem[];
  const auto stage = [&](int s) { return reinterpret_cast<T*>(smem + s * kStage); };
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * BM;
  const int rows = static_cast<int>(p.N - row0 < BM ? p.N - row0 : BM);
  const int t0 = static_cast<int>(static_cast<int64_t>(p.tiles) * blockIdx.y / p.splits);
  const int t1 = static_cast<int>(static_cast<int64_t>(p.tiles) * (blockIdx.y + 1) / p.splits);
  const int wrow = 16 * warp;           // this warp's first row in the CTA
  const bool active = wrow < rows;      // warp-uniform: a warp past N only helps with the loads

  if (p.raw)  // raw copies never write the padding channels: zero them once in every stage
    for (int e = threadIdx.x; e < kStages * BN * CP; e += kThreads)
      if (e % CP >= p.C) stage(e / (BN * CP))[(e / CP) % BN * LD + e % CP] = Op::to(0.f);
  for (int s = 0; s < kStages - 1; ++s) {
    if (t0 + s < t1) load_tile<Op>(p, stage(s), t0 + s);
    cp_async_commit();
  }

  // Registers for the whole split: Q's A fragments, O, and per row (g, g + 8) m, l, above, pos.
  uint32_t qf[CP / Op::KS][4];
  const auto qv = [&](int r, int c) {  // q of CTA row wrow + r, zero past N and C
    const int64_t row = row0 + wrow + r;
    return wrow + r < rows && c < p.C ? load_f(p.q, p.qt, row * p.C + c) : 0.f;
  };
  UNROLL for (int kc = 0; kc < CP / Op::KS; ++kc) Op::q_frag(qf[kc], qv, kc, g, t);
  float pos[2] = {0.f, 0.f}, m[2] = {kNegInf, kNegInf}, l[2] = {0.f, 0.f};
  int above[2] = {0, 0};
  if (active)
    for (int r = 0; r < 16; ++r) {  // the positives of this warp's rows, one row at a time
      const float x = wrow + r < rows ? warp_positive(p.q, p.qt, p.k, p.kt, row0 + wrow + r, p.C, p.inv_t) : 0.f;
      if (r == g) pos[0] = x;
      if (r == g + 8) pos[1] = x;
    }
  float o[CP / 8][4];
  UNROLL for (int nt = 0; nt < CP / 8; ++nt) o[nt][0] = o[nt][1] = o[nt][2] = o[nt][3] = 0.f;
  // ldmatrix.x4 for S: lane i gives row 8 nb + i % 8, bytes 64 kp + 16 (i / 8) of the row (B of k-steps
  // 2kp and 2kp + 1: the 4 matrices are b0, b1 of each)
  const unsigned lane_off = static_cast<unsigned>((lane % 8) * LD * sizeof(T) + 16 * (lane / 8));

  for (int tile = t0; tile < t1; ++tile) {
    const int i = tile - t0;
    T* V = stage(i % kStages);
    cp_async_wait<kStages - 2>();  // this thread's copies of tile i have landed
    if (p.raw) round_tile<Op>(V, p.C);
    __syncthreads();  // tile i is visible, and every warp is done with tile i - 1, whose stage is refilled next
    if (tile + kStages - 1 < t1) load_tile<Op>(p, stage((i + kStages - 1) % kStages), tile + kStages - 1);
    cp_async_commit();  // always, so that the group count stays one per tile
    if (!active) continue;

    float s[BN / 8][4];  // S, then P: element e of block nb is row g + 8 (e / 2), key 8 nb + 2t + e % 2
    UNROLL for (int nb = 0; nb < BN / 8; ++nb) s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
    const unsigned vbase = smem_addr(V) + lane_off;
    UNROLL for (int kp = 0; kp < KP; ++kp) UNROLL for (int nb = 0; nb < BN / 8; ++nb) {
      uint32_t b[4];
      ldsm_x4(b, vbase + static_cast<unsigned>(8 * nb * LD * sizeof(T) + 64 * kp));
      Op::mma(s[nb], qf[2 * kp], b[0], b[1]);
      Op::mma(s[nb], qf[2 * kp + 1], b[2], b[3]);
    }

    const int64_t left = p.K - static_cast<int64_t>(tile) * BN;
    const int valid = left < BN ? static_cast<int>(left) : BN;
    float tmax[2] = {kNegInf, kNegInf};
    UNROLL for (int nb = 0; nb < BN / 8; ++nb) UNROLL for (int e = 0; e < 4; ++e) {
      const float x = 8 * nb + 2 * t + e % 2 < valid ? __fmul_rn(s[nb][e], p.inv_t) : kNegInf;
      s[nb][e] = x;
      tmax[e / 2] = fmaxf(tmax[e / 2], x);
      above[e / 2] += x > pos[e / 2];
    }
    float a[2] = {1.f, 1.f};
    UNROLL for (int h = 0; h < 2; ++h) {  // the quad's 4 lanes hold the row's 64 keys
      tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 1));
      tmax[h] = fmaxf(tmax[h], __shfl_xor_sync(0xffffffffu, tmax[h], 2));
      if (tmax[h] > m[h] + kLazy) {  // the first tile (m = -inf: a = 0 and O is still 0), or the max grew a lot
        a[h] = __expf(m[h] - tmax[h]);
        m[h] = tmax[h];
        l[h] *= a[h];
      }
    }
    if (__any_sync(0xffffffffu, a[0] != 1.f || a[1] != 1.f)) {  // rare after the first tile: kLazy
      UNROLL for (int nt = 0; nt < CP / 8; ++nt) o[nt][0] *= a[0], o[nt][1] *= a[0], o[nt][2] *= a[1], o[nt][3] *= a[1];
    }
    UNROLL for (int nb = 0; nb < BN / 8; ++nb) UNROLL for (int e = 0; e < 4; ++e) {
      const float w = Op::from(Op::to(__expf(s[nb][e] - m[e / 2])));  // the rounded weight, in l as in O
      s[nb][e] = w;
      l[e / 2] += w;
    }
    Op::accumulate(o, s, V, g, t);
  }
  cp_async_wait_all();

  // This split's partials: ws[split][row][0:C] = O, [C] = m, [C + 1] = l, [C + 2] = above.
  if (!active) return;
  UNROLL for (int h = 0; h < 2; ++h) UNROLL for (int x = 1; x <= 2; x *= 2) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], x);
    above[h] += __shfl_xor_sync(0xffffffffu, above[h], x);
  }
  float* out = p.ws + (static_cast<int64_t>(blockIdx.y) * p.N + row0 + wrow) * (p.C + 3);
  UNROLL for (int h = 0; h < 2; ++h) {
    const int r = g + 8 * h;
    if (wrow + r >= rows) continue;
    float* orow = out + static_cast<int64_t>(r) * (p.C + 3);
    UNROLL for (int nt = 0; nt < CP / 8; ++nt) UNROLL for (int e = 2 * h; e < 2 * h + 2; ++e) {
      const int c = Op::channel(nt, e, t);
      if (c < p.C) orow[c] = o[nt][e];
    }
    if (t == 0) orow[p.C] = m[h], orow[p.C + 1] = l[h], orow[p.C + 2] = static_cast<float>(above[h]);
  }
}

// v2 runs the call (else v1 does): C <= 128 and one of the MMA engines' cases.
inline bool handles(const Params& p, bool allow_tf32) {
  return p.C <= CP && (allow_tf32 || (p.vt != kInF32 && p.qt == p.vt));
}

// Launch the v2 kernel (one wave of CTAs); returns the workspace, sets p.tiles/splits/raw/ws, as v1.
template <class Op>
at::Tensor run_partials(Params& p, const at::Tensor& queue, cudaStream_t stream) {
  constexpr int bytes = kStages * BN * Op::LD * static_cast<int>(sizeof(typename Op::T));
  return launch_partials(infonce_fwd_v2_kernel<Op>, p, BM, BN, kThreads, bytes, p.vt == Op::kIn,
                         sizeof(typename Op::T), queue, stream);
}

// The engine choice of v1's dispatch_engine for C <= 128; call only where handles() holds.
inline at::Tensor dispatch(Params& p, const at::Tensor& queue, bool allow_tf32, cudaStream_t stream) {
  if (p.vt != kInF32 && (p.qt == p.vt || (p.qt == kInF32 && allow_tf32)))
    return p.vt == kInBF16 ? run_partials<BF16>(p, queue, stream) : run_partials<F16>(p, queue, stream);
  return run_partials<TF32>(p, queue, stream);
}

}  // namespace v2
}  // namespace
