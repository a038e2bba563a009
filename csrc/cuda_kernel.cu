// CUDA kernels of the fused K-pass loss (docs/design.md §1.9, §1.11), the same algorithm as the
// Triton and CPU kernels. One thread block per token; each thread owns groups of 16 bytes of
// consecutive classes and reads the K passes of its group together (z̄ and p̄ need them), keeping a
// thread-local online max / sum-exp / Σe·d per pass. The block then combines the per-thread states:
// a max reduction, a rescale, a sum reduction (warp shuffles, then one value per warp through shared
// memory), always in the same order, so results are bitwise reproducible. No atomics.
//
// Every statistic is taken on the transformed logits t = softcap·tanh(logit_scale·z / softcap)
// (logit_scale·z without softcap; −inf stays −inf); load_passes applies the transform, so the
// rest of the algorithm only ever sees t. The gradient is formed with respect to t and multiplied
// by dt/dz at the end (chain_factor).
//
// The one-pass forward (EARLY): once the block knows lse_k and stat_k it sweeps the token's rows
// once more and writes their gradient (write_grad_row, the exact backward's own loop), while the
// rows are still in L2. Thread t reads and writes only classes [t·W + i·kThreads·W, +W) in every
// sweep, and the one element all threads read (the target logit) is read before the first block
// barrier, so the gradient may overwrite the logits.
//
// Addressing: element (k, n, v) is at base + row_off[n] + k * stride_k + v * stride_v, every index
// and stride int64 (a [3, N, 128256] tensor passes 2^31 elements from N = 8373 tokens).
//
// Precision: a common offset c of the logits (all classes, all passes) leaves every result unchanged,
// and the kernels keep it so in fp32 by never rounding a value of c's magnitude before the
// difference that cancels it (§1.9 "Precision"): t − m_k for the softmax and for
// log p_k = (t − M_k) − log S_k, t − max_k t per class for t − t̄, M_k − t_k[y] and t − t_k[y] for
// cross-entropy.
//
// Raw pointers only: this file compiles with plain nvcc; cuda_binding.cpp connects it to torch.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>

#include <type_traits>

#include "cuda_kernel.h"

namespace intradistill {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Blocks per SM the register allocation must allow: 1 gives each thread up to 255 registers. Left
// unsaid, ptxas (CUDA 13) aims at 2 (128 registers) and spills the K = 8 kernels' per-pass arrays;
// one block of 256 threads with K rows of 16 bytes in flight per thread already covers the
// bandwidth-latency product of an H100/H200 SM for K >= 4.
constexpr int kMinBlocks = 1;
// Macro-free infinities usable in constant expressions on host and device.
constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kInf = __builtin_huge_valf();

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A shift that is −inf (a row or class at −inf everywhere) is replaced by 0, so that subtracting it
// never forms (−inf) − (−inf).
__device__ __forceinline__ float finite_or_zero(float x) { return x == kNegInf ? 0.0f : x; }

// The run-time options the sweeps branch on, read once per block: uniform branches.
struct Options {
  int K;
  bool js, has_ce, smooth, softcap, has_z;
  float inv_softcap;  // 1 / softcap where softcap > 0: a multiply per element, not a division
};

__device__ __forceinline__ Options read_options(const RowsArgs& a, const float* z_weights) {
#ifdef INTRADISTILL_FIXED_OPTIONS
  // benchmarks/gpu_model.py compiles the kernels of one configuration with its options as
  // constants, so that each sweep's machine code is the one path this configuration runs.
  (void)z_weights;
  return {INTRADISTILL_FIXED_K, INTRADISTILL_FIXED_JS != 0, true, INTRADISTILL_FIXED_SMOOTH != 0,
          INTRADISTILL_FIXED_TRANSFORM != 0, INTRADISTILL_FIXED_HAS_Z != 0, 1.0f / a.softcap};
#else
  return {static_cast<int>(a.K), a.js, a.has_ce, a.has_ce && a.eps > 0.0f, a.softcap > 0.0f,
          z_weights != nullptr,   a.softcap > 0.0f ? 1.0f / a.softcap : 0.0f};
#endif
}

// tanh in fp32 to about an ulp of t: expm1 keeps the relative precision of small arguments that
// (1 − e^{−2|x|}) / (1 + e^{−2|x|}) loses, and fast-math builds may turn tanhf into the approximate
// hardware instruction (relative error 2^-11).
__device__ __forceinline__ float tanh_fp32(float x) {
  const float em = expm1f(-2.0f * fabsf(x));  // in (−1, 0]
  return copysignf(-em / (2.0f + em), x);
}

// t = logit_scale·z, then softcap·tanh(t / softcap) with softcap > 0; −inf stays −inf (masked
// vocabulary padding stays masked; tanh would map it to −softcap).
__device__ __forceinline__ float transform(float z, const RowsArgs& a, const Options& o) {
  const float t = a.logit_scale * z;
  if (o.softcap) {
    // Formed for every element (tanh_fp32(−inf) is −1, no NaN) and then selected: nvcc made a
    // branch of a conditional evaluation, one per element in every sweep.
    const float capped = a.softcap * tanh_fp32(t * o.inv_softcap);
    return z == kNegInf ? kNegInf : capped;
  }
  return t;
}

// dt/dz from the transformed t: logit_scale·(1 − (t / softcap)²) with softcap, 0 at t = −inf.
__device__ __forceinline__ float chain_factor(float t, const RowsArgs& a, const Options& o) {
  if (o.softcap) {
    const float u = t * o.inv_softcap;

    return t == kNegInf ? 0.0f : a.logit_scale * (1.0f - u * u);
  }
  return a.logit_scale;
}

// Classes per thread group: one 16-byte load.
template <typename T>
struct Group {
  static constexpr int W = 16 / sizeof(T);
};

// Classes [v, v + W) of one pass row into out. FULL: all W are below V (no test; one 16-byte load
// where VEC); otherwise out-of-range classes read -inf.
template <typename T, bool VEC, bool FULL>
__device__ __forceinline__ void load_group(const T* row, int64_t v, int64_t V, int64_t stride_v, float* out) {
  constexpr int W = Group<T>::W;
  if (VEC && FULL) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + v));
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < W; ++j) out[j] = to_float(vals[j]);
  } else {
    // One pointer stepped by stride_v rather than W 64-bit products kept live at once: with K = 8
    // passes of 16-bit logits those addresses alone would take 128 registers.
    const T* at = row + v * stride_v;
#pragma unroll
    for (int j = 0; j < W; ++j, at += stride_v) out[j] = FULL || v + j < V ? to_float(*at) : kNegInf;
  }
}

// Transformed logits t of classes [v, v + W) of all passes; passes K..KT-1 (compile-time padding)
// and classes beyond V read as -inf.
template <typename T, int KT, bool VEC, bool FULL>
__device__ __forceinline__ void load_passes(const T* row, const RowsArgs& a, const Options& o, int64_t v,
                                            float (&z)[KT][Group<T>::W]) {
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    if (k < o.K) {
      load_group<T, VEC, FULL>(row + k * a.stride_k, v, a.V, a.stride_v, z[k]);
#pragma unroll
      for (int j = 0; j < Group<T>::W; ++j) z[k][j] = transform(z[k][j], a, o);
    } else {
#pragma unroll
      for (int j = 0; j < Group<T>::W; ++j) z[k][j] = kNegInf;
    }
  }
}

// 16 bytes of T from 16 / sizeof(T) floats, as four 32-bit words.
__device__ __forceinline__ unsigned word(__half2 h) { return *reinterpret_cast<const unsigned*>(&h); }
__device__ __forceinline__ unsigned word(__nv_bfloat162 h) { return *reinterpret_cast<const unsigned*>(&h); }

template <typename T>
__device__ __forceinline__ uint4 pack16(const float* in) {
  if constexpr (std::is_same_v<T, float>) {
    return make_uint4(__float_as_uint(in[0]), __float_as_uint(in[1]), __float_as_uint(in[2]), __float_as_uint(in[3]));
  } else {
    unsigned w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if constexpr (std::is_same_v<T, __half>) w[i] = word(__floats2half2_rn(in[2 * i], in[2 * i + 1]));
      else w[i] = word(__floats2bfloat162_rn(in[2 * i], in[2 * i + 1]));
    }
    return make_uint4(w[0], w[1], w[2], w[3]);
  }
}

template <typename T, bool VEC, bool FULL>
__device__ __forceinline__ void store_group(T* row, int64_t v, int64_t V, int64_t stride_v, const float* in) {
  constexpr int W = Group<T>::W;
  if (VEC && FULL) {
    const uint4 raw = pack16<T>(in);
    // One 16-byte store, spelled out: from a uint4 assignment nvcc emitted four 4-byte stores for
    // every pass but the first (sm_90), and __stwb's cache-qualified store is a strong one.
    asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(row + v), "r"(raw.x), "r"(raw.y), "r"(raw.z),
                 "r"(raw.w)
                 : "memory");
  } else {
    T* at = row + v * stride_v;
#pragma unroll
    for (int j = 0; j < W; ++j, at += stride_v)
      if (FULL || v + j < V) *at = from_float<T>(in[j]);
  }
}

// Calls body(v, full) for each group of W classes this thread owns in a row of V: the full groups
// in a loop without bounds tests, then the row's one partial group, if any (one thread has it).
// full is std::true_type or std::false_type, so that the body can pass it on as a template flag.
template <typename T, typename Body>
__device__ __forceinline__ void for_each_group(int64_t V, Body&& body) {
  constexpr int W = Group<T>::W;
  int64_t v = static_cast<int64_t>(threadIdx.x) * W;
  for (; v + W <= V; v += static_cast<int64_t>(kThreads) * W) body(v, std::true_type{});
  if (v < V) body(v, std::false_type{});
}

// Block-wide reductions of KT values at once; every thread gets the results.
template <int KT, bool MAX>
__device__ __forceinline__ void block_reduce(float (&x)[KT], float* smem) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
  for (int k = 0; k < KT; ++k) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float other = __shfl_xor_sync(0xffffffffu, x[k], o);
      x[k] = MAX ? fmaxf(x[k], other) : x[k] + other;
    }
    if (lane == 0) smem[k * kWarps + warp] = x[k];
  }
  __syncthreads();
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    float r = smem[k * kWarps];
#pragma unroll
    for (int w = 1; w < kWarps; ++w) r = MAX ? fmaxf(r, smem[k * kWarps + w]) : r + smem[k * kWarps + w];
    x[k] = r;
  }
  __syncthreads();
}

// Per class of the group, the references of d = t − t̄ (§1.9 "Precision"): top = max_k t (−inf at a
// class at −inf in every pass) and t_bar = mean_k (t − top), so that d_k = (t_k − top) − t_bar is
// exact where the K logits of a class are close, however large they are. t_bar is −inf exactly
// where some pass is at −inf (padded passes are left out).
template <int KT, int W>
__device__ __forceinline__ void deviation_refs(const float (&z)[KT][W], int K, float* top, float* t_bar) {
#pragma unroll
  for (int j = 0; j < W; ++j) {
    float mx = kNegInf;
#pragma unroll
    for (int k = 0; k < KT; ++k) mx = fmaxf(mx, z[k][j]);
    const float ref = finite_or_zero(mx);
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < KT; ++k) s += k < K ? z[k][j] - ref : 0.0f;
    top[j] = mx;
    t_bar[j] = s / K;
  }
}

// log p̄ of each class of the group as log Σ_k p_k − ln K, with p_k = exp((t_k − shift_k) − log_s_k)
// (the forward passes (M, log S), the backward (lse, 0)). p_k <= 1 needs no shift, and Σ_k p_k is
// at least its largest term, so it is not flushed where some p_k is not 0; a class whose p_k are
// all 0 gets −inf, which those p_k = 0 mask.
template <int KT, int W>
__device__ __forceinline__ void log_mean_prob(const float (&z)[KT][W], const float (&shift)[KT],
                                              const float (&log_s)[KT], int K, float ln_k, float* out) {
#pragma unroll
  for (int j = 0; j < W; ++j) {
    float s = 0.0f;
#pragma unroll
    for (int k = 0; k < KT; ++k)
      if (k < K) s += __expf((z[k][j] - shift[k]) - log_s[k]);
    out[j] = __logf(s) - ln_k;
  }
}

// The per-row weights of the gradient, each divided by K (the row's values are means over passes).
struct RowGrad {
  float g_ce, g_div, g_z;  // g_z = 2·w_z / K: ∂(lse²)/∂t = 2·lse·p
};

__device__ __forceinline__ RowGrad row_grad(const Options& o, const RowWeights& w, int64_t n) {
  const int K = o.K;
  RowGrad r;
  r.g_div = w.div[n] / K;
  r.g_ce = o.has_ce ? w.ce[n] / K : 0.0f;
  r.g_z = o.has_z ? 2.0f * w.z[n] / K : 0.0f;
  return r;
}

template <typename T, bool VEC>
__device__ __forceinline__ void zero_grad_row(const RowsArgs& a, const GradArgs& g, T* grow) {
  constexpr int W = Group<T>::W;
  float zero[W];
#pragma unroll
  for (int j = 0; j < W; ++j) zero[j] = 0.0f;
  for_each_group<T>(a.V, [&](int64_t v, auto full) {
    for (int k = 0; k < a.K; ++k)
      store_group<T, VEC, decltype(full)::value>(grow + k * g.stride_k, v, a.V, g.stride_v, zero);
  });
}

// The gradient of one active row (kernel spec §2), the loop of the exact backward and of the
// one-pass forward alike, so that both write the same values:
//   g_t = g_ce·(p_k − (1−ε)·onehot(y) − ε/V)      (has_ce)
//       + g_div·[p_k ⊙ (d_k − s_k + 1) − p̄]         (X, §1.3) or g_div·p_k ⊙ (r_k − KL_k) (JS, §1.4)
//       + g_z·lse_k·p_k                              (z term)
// times dt/dz, computed with its per-pass terms folded into c_k and its per-class ones into q:
//   g_t = p_k ⊙ (g_div·u_k + c_k) − q,   u_k = d_k (X) or r_k = log p_k − log p̄ (JS),
//   c_k = g_div·(1 − s_k) (X) or −g_div·KL_k (JS), + g_ce + g_z·lse_k,
//   q = g_div·p̄ (X only) + g_ce·((1−ε)·onehot(y) + ε/V),
// the p_k-proportional part 0 where p_k = 0 (a class at −inf, whose u_k is not finite).
// VEC: 16-byte loads of the logits and stores of the gradient.
template <typename T, int KT, bool VEC>
__device__ __forceinline__ void write_grad_row(const RowsArgs& a, const Options& o, const T* row, T* grow,
                                               const GradArgs& g, int64_t y, const float (&lse)[KT],
                                               const float (&stat)[KT], const RowGrad& rg) {
  constexpr int W = Group<T>::W;
  const int64_t V = a.V;
  const int K = o.K;
  const float q_flat = o.has_ce ? rg.g_ce * a.eps / V : 0.0f, q_hot = rg.g_ce * (1.0f - a.eps);
  const float ln_k = __logf(static_cast<float>(K));
  float zero[KT], c[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    zero[k] = 0.0f;
    c[k] = (o.js ? -rg.g_div * stat[k] : rg.g_div * (1.0f - stat[k])) + rg.g_ce + rg.g_z * lse[k];
  }
  for_each_group<T>(V, [&](int64_t v, auto full) {
    constexpr bool FULL = decltype(full)::value;
    float z[KT][W];
    // All K passes of the group are read before any is written: safe when grad aliases logits.
    load_passes<T, KT, VEC, FULL>(row, a, o, v, z);
    // The target's place in the group (-1: elsewhere), so that the class compare is in 32 bits.
    const int hot = y >= v && y < v + W ? static_cast<int>(y - v) : -1;
    float aux[W], top[W], q[W];
    if (o.js) {
      log_mean_prob<KT, W>(z, lse, zero, K, ln_k, aux);  // aux = log p̄
#pragma unroll
      for (int j = 0; j < W; ++j) q[j] = q_flat + (j == hot ? q_hot : 0.0f);
    } else {
      deviation_refs<KT, W>(z, K, top, aux);  // aux = mean_k (t_k − top)
      // p_k is recomputed below rather than kept: a [KT][W] array more would not fit the
      // registers at K = 8 with 16-bit logits, and the exponential is cheap next to the row's bytes.
#pragma unroll
      for (int j = 0; j < W; ++j) {
        float ps = 0.0f;
#pragma unroll
        for (int k = 0; k < KT; ++k)
          if (k < K) ps += __expf(z[k][j] - lse[k]);
        q[j] = ps * (rg.g_div / K) + q_flat + (j == hot ? q_hot : 0.0f);
      }
    }
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k >= K) break;
      float out[W];
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float pk = __expf(z[k][j] - lse[k]);
        const float u = o.js ? (z[k][j] - lse[k]) - aux[j] : (z[k][j] - finite_or_zero(top[j])) - aux[j];
        out[j] = ((pk == 0.0f ? 0.0f : pk * fmaf(rg.g_div, u, c[k])) - q[j]) * chain_factor(z[k][j], a, o);
      }
      store_group<T, VEC, FULL>(grow + k * g.stride_k, v, V, g.stride_v, out);
    }
  });
}

// KT is a compile-time bound on the number of passes; passes K..KT-1 are padding read as -inf.
// EARLY: also write the gradient with the weights known before the forward (VEC then covers the
// gradient's stores as well as the logits' loads).
template <typename T, int KT, bool VEC, bool EARLY>
__global__ void __launch_bounds__(kThreads, kMinBlocks) forward_kernel(RowsArgs a, float* ce_row, float* div_row,
                                                           float* lse_out, float* stat_out, RowWeights w,
                                                           GradArgs g) {
  constexpr int W = Group<T>::W;
  __shared__ float smem[KT * kWarps];
  const int64_t n = blockIdx.x, N = a.N, V = a.V;
  const Options o = read_options(a, w.z);
  const int K = o.K;
  const int64_t y = a.target[n];
  if (y < 0) {
    if (threadIdx.x == 0) {
      ce_row[n] = div_row[n] = 0.0f;
      for (int k = 0; k < K; ++k) lse_out[k * N + n] = stat_out[k * N + n] = 0.0f;
    }
    if constexpr (EARLY) zero_grad_row<T, VEC>(a, g, static_cast<T*>(g.data) + g.row_off[n]);
    return;
  }
  const T* row = static_cast<const T*>(a.logits) + a.row_off[n];
  const bool smooth = o.smooth;
  // Cross-entropy is taken relative to the target logit (any finite reference would do). Read by
  // every thread before the first barrier: the one-pass forward may overwrite it afterwards.
  float zy[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) zy[k] = o.has_ce && k < K ? transform(to_float(row[k * a.stride_k + y * a.stride_v]), a, o) : 0.0f;

  // One online pass: running max m, S = Σ e^(t−m), A = Σ e^(t−m)·(t − t̄), zs = Σ (t − ref_y).
  float m[KT], S[KT], A[KT], zs[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) m[k] = kNegInf, S[k] = A[k] = zs[k] = 0.0f;
  for_each_group<T>(V, [&](int64_t v, auto full) {
    constexpr bool FULL = decltype(full)::value;
    float z[KT][W];
    load_passes<T, KT, VEC, FULL>(row, a, o, v, z);
    float top[W], t_bar[W];
    if (!o.js) deviation_refs<KT, W>(z, K, top, t_bar);
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k >= K) break;
      float bm = kNegInf;
#pragma unroll
      for (int j = 0; j < W; ++j) bm = fmaxf(bm, z[k][j]);
      const float m_new = fmaxf(m[k], bm);
      const float shift = finite_or_zero(m_new);
      const float ref_y = finite_or_zero(zy[k]);
      float s = 0.0f, acc = 0.0f, zsum = 0.0f;
#pragma unroll
      for (int j = 0; j < W; ++j) {
        const float e = __expf(z[k][j] - shift);
        s += e;
        if (!o.js) {
          // A class at -inf in every pass adds 0. One at -inf in some passes but not all makes
          // KL(p̄ ‖ p_k) = +inf exactly; deciding that on the logits, not on e > 0, keeps it +inf
          // where the finite passes' e underflows in fp32. A NaN logit gives e·d = NaN.
          acc += t_bar[j] == kNegInf ? (top[j] == kNegInf ? 0.0f : kInf)
                                     : e * ((z[k][j] - finite_or_zero(top[j])) - t_bar[j]);
        }
        if (smooth) zsum += FULL || v + j < V ? z[k][j] - ref_y : 0.0f;
      }
      const float scale = __expf(m[k] - shift);
      S[k] = S[k] * scale + s;
      // +inf stays +inf: rescaling it by a scale that underflowed to 0 would make it NaN.
      if (!o.js) A[k] = A[k] == kInf ? A[k] : A[k] * scale + acc;
      zs[k] += zsum;
      m[k] = m_new;
    }
  });

  float M[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) M[k] = m[k];
  block_reduce<KT, true>(M, smem);
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    const float f = __expf(m[k] - finite_or_zero(M[k]));
    S[k] *= f;
    A[k] = A[k] == kInf ? A[k] : A[k] * f;
  }
  block_reduce<KT, false>(S, smem);
  if (!o.js) block_reduce<KT, false>(A, smem);
  if (smooth) block_reduce<KT, false>(zs, smem);
  float log_s[KT], lse[KT], stat[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    log_s[k] = k < K ? __logf(S[k]) : 0.0f;
    lse[k] = k < K ? M[k] + log_s[k] : 0.0f;
    stat[k] = k < K ? A[k] / S[k] : 0.0f;
  }

  if (o.js) {
    // Second pass: KL_k = Σ p_k (log p_k − log p̄); log p̄ needs every lse_k first.
    // log p_k = (t − M_k) − log S_k, both differences small whatever the logits' offset.
    const float ln_k = __logf(static_cast<float>(K));
    float kl[KT];
#pragma unroll
    for (int k = 0; k < KT; ++k) kl[k] = 0.0f;
    for_each_group<T>(V, [&](int64_t v, auto full) {
      float z[KT][W];
      load_passes<T, KT, VEC, decltype(full)::value>(row, a, o, v, z);
      float lpbar[W];
      log_mean_prob<KT, W>(z, M, log_s, K, ln_k, lpbar);
#pragma unroll
      for (int k = 0; k < KT; ++k) {
        if (k >= K) break;
#pragma unroll
        for (int j = 0; j < W; ++j) {
          const float lp = (z[k][j] - M[k]) - log_s[k];
          const float p = __expf(lp);
          kl[k] += p == 0.0f ? 0.0f : p * (lp - lpbar[j]);
        }
      }
    });

    block_reduce<KT, false>(kl, smem);
#pragma unroll
    for (int k = 0; k < KT; ++k) stat[k] = kl[k];
  }

  if (threadIdx.x == 0) {
    float div = 0.0f, ce = 0.0f;
    // Unrolled over KT with a guard, not looped to K: a runtime index would put the per-pass arrays
    // in local memory.
#pragma unroll
    for (int k = 0; k < KT; ++k) {
      if (k >= K) break;
      div += stat[k];
      lse_out[k * N + n] = lse[k];
      stat_out[k * N + n] = stat[k];
      if (o.has_ce) {
        // CE_k = lse_k − (1−ε)·t_y − ε·mean_v t, every term relative to ref_y.
        const float ref_y = finite_or_zero(zy[k]);
        const float ce_k = (M[k] - ref_y) + log_s[k];
        ce += smooth ? ce_k - (1.0f - a.eps) * (zy[k] - ref_y) - (a.eps / V) * zs[k] : ce_k - (zy[k] - ref_y);
      }
    }
    div_row[n] = div / K;
    ce_row[n] = o.has_ce ? ce / K : 0.0f;
  }

  if constexpr (EARLY) {
    // Every thread holds the same lse and stat (the block reductions broadcast them), the values
    // just stored for the exact backward.
    write_grad_row<T, KT, VEC>(a, o, row, static_cast<T*>(g.data) + g.row_off[n], g, y, lse, stat, row_grad(o, w, n));
  }
}

template <typename T, int KT, bool VEC>
__global__ void __launch_bounds__(kThreads, kMinBlocks) backward_kernel(RowsArgs a, const float* lse_in, const float* stat_in,
                                                            RowWeights w, GradArgs g) {
  const int64_t n = blockIdx.x, N = a.N;
  const Options o = read_options(a, w.z);
  const int K = o.K;
  const int64_t y = a.target[n];
  T* grow = static_cast<T*>(g.data) + g.row_off[n];
  if (y < 0) {
    zero_grad_row<T, VEC>(a, g, grow);
    return;
  }
  const T* row = static_cast<const T*>(a.logits) + a.row_off[n];
  float lse[KT], stat[KT];
#pragma unroll
  for (int k = 0; k < KT; ++k) {
    lse[k] = k < K ? lse_in[k * N + n] : 0.0f;
    stat[k] = k < K ? stat_in[k * N + n] : 0.0f;
  }
  write_grad_row<T, KT, VEC>(a, o, row, grow, g, y, lse, stat, row_grad(o, w, n));
}

template <typename T, int KT>
cudaError_t forward_for(const RowsArgs& a, float* ce, float* div, float* lse, float* stat, const EarlyGrad* early,
                        cudaStream_t s) {
  if (early != nullptr) {
    if (a.vectorized && early->grad.vectorized)
      forward_kernel<T, KT, true, true><<<a.N, kThreads, 0, s>>>(a, ce, div, lse, stat, early->weights, early->grad);
    else
      forward_kernel<T, KT, false, true><<<a.N, kThreads, 0, s>>>(a, ce, div, lse, stat, early->weights, early->grad);
  } else {
    const RowWeights none_w{nullptr, nullptr, nullptr};
    const GradArgs none_g{nullptr, nullptr, 0, 0, false};
    if (a.vectorized)
      forward_kernel<T, KT, true, false><<<a.N, kThreads, 0, s>>>(a, ce, div, lse, stat, none_w, none_g);
    else
      forward_kernel<T, KT, false, false><<<a.N, kThreads, 0, s>>>(a, ce, div, lse, stat, none_w, none_g);
  }
  return cudaGetLastError();
}

template <typename T, int KT>
cudaError_t backward_for(const RowsArgs& a, const float* lse, const float* stat, const RowWeights& w,
                         const GradArgs& g, cudaStream_t s) {
  if (a.vectorized && g.vectorized)
    backward_kernel<T, KT, true><<<a.N, kThreads, 0, s>>>(a, lse, stat, w, g);
  else
    backward_kernel<T, KT, false><<<a.N, kThreads, 0, s>>>(a, lse, stat, w, g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_dtype(const RowsArgs& a, float* ce, float* div, float* lse, float* stat, const EarlyGrad* early,
                          cudaStream_t s) {
  if (a.K <= 2) return forward_for<T, 2>(a, ce, div, lse, stat, early, s);
  if (a.K <= 4) return forward_for<T, 4>(a, ce, div, lse, stat, early, s);
  return forward_for<T, 8>(a, ce, div, lse, stat, early, s);
}

template <typename T>
cudaError_t backward_dtype(const RowsArgs& a, const float* lse, const float* stat, const RowWeights& w,
                           const GradArgs& g, cudaStream_t s) {
  if (a.K <= 2) return backward_for<T, 2>(a, lse, stat, w, g, s);
  if (a.K <= 4) return backward_for<T, 4>(a, lse, stat, w, g, s);
  return backward_for<T, 8>(a, lse, stat, w, g, s);
}

// The grid has one block per row: N may not exceed the grid's x limit.
constexpr int64_t kMaxBlocks = 2147483647;

}  // namespace

#ifndef INTRADISTILL_FIXED_OPTIONS  // benchmarks/gpu_model.py instantiates the kernels it counts itself

cudaError_t launch_forward(const RowsArgs& a, float* ce_row, float* div_row, float* lse, float* stat,
                           const EarlyGrad* early, cudaStream_t stream) {
  if (a.K < 2 || a.K > kMaxPasses || a.N > kMaxBlocks) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::Float32: return forward_dtype<float>(a, ce_row, div_row, lse, stat, early, stream);
    case DType::Float16: return forward_dtype<__half>(a, ce_row, div_row, lse, stat, early, stream);
    case DType::BFloat16: return forward_dtype<__nv_bfloat16>(a, ce_row, div_row, lse, stat, early, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_backward(const RowsArgs& a, const float* lse, const float* stat, const RowWeights& weights,
                            const GradArgs& grad, cudaStream_t stream) {
  if (a.K < 2 || a.K > kMaxPasses || a.N > kMaxBlocks) return cudaErrorInvalidValue;
  if (a.N == 0) return cudaSuccess;
  switch (a.dtype) {
    case DType::Float32: return backward_dtype<float>(a, lse, stat, weights, grad, stream);
    case DType::Float16: return backward_dtype<__half>(a, lse, stat, weights, grad, stream);
    case DType::BFloat16: return backward_dtype<__nv_bfloat16>(a, lse, stat, weights, grad, stream);
  }
  return cudaErrorInvalidValue;
}

#endif  // INTRADISTILL_FIXED_OPTIONS

}  // namespace intradistill
