// CPU kernel of the fused K-pass loss: the same algorithm as the Triton kernels (reference.py is the
// specification it is tested against).
//
// One token per task (at::parallel_for over rows). Its K rows are read a chunk of CHUNK classes
// at a time (in place where they are contiguous float32, else converted into a float buffer padded
// to LANES), so every inner loop runs over contiguous floats. The hot loops are written on
// GCC/Clang vectors of the target's SIMD width (vfloat) with per-lane accumulators: vectorised
// without -ffast-math, bitwise reproducible, IEEE inf/NaN semantics kept. exp is a branch-free
// polynomial (fast_exp) on the same vectors; exp is what bounds this loss on a CPU.
//
// Addressing: element (k, n, v) is at data + row_off[n] + k * stride_k + v * stride_v, so any
// strided [K, *B, V] view is read in place. Every index and stride is int64: a pass stride times K
// passes beyond 2^31 elements is an ordinary LLM shape ([3, 8373, 128256]). target[n] < 0 marks an
// inactive row.
//
// Precision: a common offset c of the logits leaves every result unchanged, and the kernels keep it
// so by cancelling c in differences of two nearby floats, which are exact (Sterbenz): z − m_k for
// the softmax, z − max_k z per class for z − z̄, m_k − z_k[y] and z − z_k[y] for cross-entropy,
// (z − m_k) − log S_k for log p_k. Forming z̄ or lse_k first rounds at c's magnitude (c = 1e4: 1e-3
// absolute, 5e-4 relative in X and CE). The saved lse_k is one float, so the backward's
// p_k = exp(z − lse_k) carries its rounding, a relative error of at most 2^-24·|lse_k|.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <fstream>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <type_traits>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#if defined(__linux__)
#include <sys/mman.h>
#include <unistd.h>
#endif

namespace {

constexpr int64_t CHUNK = 512;
constexpr int LANES = 16;
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// The hot loops are written on GCC/Clang vectors of VW floats, one register of the target's widest
// float SIMD (wider vectors would be split lane by lane), so they are vectorised whatever the
// auto-vectoriser decides, and stay IEEE (no -ffast-math). VW divides LANES, the padding unit.
#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;  // SSE2, NEON
#endif
static_assert(LANES % VW == 0, "a vector must divide the padding unit");
typedef float vfloat __attribute__((vector_size(VW * sizeof(float))));
typedef int32_t vint __attribute__((vector_size(VW * sizeof(int32_t))));

inline vfloat vload(const float* p) {
  vfloat v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vfloat v) { std::memcpy(p, &v, sizeof(v)); }
inline float vsum(vfloat v) {
  float s = 0.0f;
  for (int j = 0; j < VW; ++j) s += v[j];
  return s;
}
inline int32_t to_int(float x) { return static_cast<int32_t>(x); }
inline vint to_int(vfloat x) { return __builtin_convertvector(x, vint); }
// c in every lane of F (float or vfloat).
template <typename F>
inline F splat(float c) {
  return F{} + c;
}

// exp(x) with ~1 ulp error on a float or on a vfloat: 2^n * p(r) with Cody-Waite reduction
// (Cephes coefficients); n is rounded by adding and removing 1.5·2^23, which needs no floor and
// vectorises everywhere. Below -87 the result is 0 (no subnormals): nothing may decide that a class
// is at -inf from exp(z - m) == 0, which a finite class 88 below its pass's max also gives; the X
// form decides it on the logits themselves (deviations). NaN stays NaN.
template <typename F>
inline F fast_exp(F x) {
  const F lo = splat<F>(-87.0f), big = splat<F>(12582912.0f);
  const F xc = x < lo ? lo : x;
  const F n = (xc * 1.44269504088896341f + big) - big;
  F r = xc - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  F p = splat<F>(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const F y = p * r * r + r + 1.0f;
  const auto bits = (to_int(n) + 127) << 23;
  F scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  F out = y * scale;
  out = x < lo ? splat<F>(0.0f) : out;
  return x != x ? x : out;
}

// The logit transform of the LLM options, t = softcap·tanh(logit_scale·z / softcap) (t = logit_scale·z
// without softcap), applied as the rows are loaded so that every statistic sees t. A logit at -inf
// stays -inf: masked vocabulary padding must stay masked, where tanh would make it -softcap.
struct Transform {
  float scale = 1.0f, cap = 0.0f, inv_cap = 0.0f;
  bool scaled = false, capped = false;

  // tanh(u) = sign(u)·(1 − e)/(1 + e) with e = exp(−2|u|) ≤ 1: no overflow at any |u|, and fast_exp
  // keeps it vectorisable (std::tanh is a libm call per element).
  float apply(float z) const {
    const float x = scaled ? z * scale : z;
    if (!capped) return x;
    const float u = x * inv_cap;
    const float e = fast_exp(-2.0f * std::fabs(u));
    const float out = cap * std::copysign((1.0f - e) / (1.0f + e), u);
    return z == NEG_INF ? NEG_INF : out;
  }
  void apply(float* t, int64_t n) const {
    if (capped) {
      for (int64_t i = 0; i < n; ++i) t[i] = apply(t[i]);
    } else if (scaled) {
      for (int64_t i = 0; i < n; ++i) t[i] *= scale;
    }
  }
  // dt/dz from t itself: logit_scale·(1 − (t/softcap)²); 0 where t = -inf (where the softcap form
  // would give -inf, and torch's where() routes no gradient).
  void chain(const float* t, float* g, int64_t n) const {
    if (capped) {
      for (int64_t i = 0; i < n; ++i) {
        const float r = t[i] * inv_cap;
        g[i] = t[i] == NEG_INF ? 0.0f : g[i] * (scale * (1.0f - r * r));
      }
    } else if (scaled) {
      for (int64_t i = 0; i < n; ++i) g[i] *= scale;
    }
  }
};

template <typename T>
struct Rows {
  const T* data;
  int64_t stride_k, stride_v;
  Transform tf;
  // Loads classes [v0, v0 + len) of pass k of the row at `row` into dst[0, padded) as transformed
  // logits t, padding with -inf.
  void load(const T* row, int64_t k, int64_t v0, int64_t len, int64_t padded, float* dst) const {
    const T* src = row + k * stride_k + v0 * stride_v;
    if (stride_v == 1) {
      prefetch_ahead(src, len);
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i]);
    } else {
      for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<float>(src[i * stride_v]);
    }
    tf.apply(dst, len);
    for (int64_t i = len; i < padded; ++i) dst[i] = NEG_INF;
  }
  // The same classes where they are read in place: the logits themselves when they already are
  // what load() would write (contiguous float32, no transform, a whole number of lane blocks),
  // else load()'s copy in buf.
  const float* view(const T* row, int64_t k, int64_t v0, int64_t len, int64_t padded, float* buf) const {
    if constexpr (std::is_same_v<T, float>) {
      if (stride_v == 1 && !tf.scaled && !tf.capped && len == padded) {
        const float* src = row + k * stride_k + v0;
        prefetch_ahead(src, len);
        return src;
      }
    }
    load(row, k, v0, len, padded, buf);
    return buf;
  }
  // A chunk's sweep is short enough that the hardware prefetcher, which stops at every 4 KiB page,
  // leaves it waiting on memory: ask for the chunk after next while this one is worked on.
  static void prefetch_ahead(const T* src, int64_t len) {
    for (int64_t i = 0; i < len; i += 64 / sizeof(T)) __builtin_prefetch(src + 2 * CHUNK + i);
  }
  float at(const T* row, int64_t k, int64_t v) const {
    return tf.apply(static_cast<float>(row[k * stride_k + v * stride_v]));
  }
};

inline int64_t round_up(int64_t x) { return (x + LANES - 1) / LANES * LANES; }

inline float lane_max(const float* x, int64_t n) {
  vfloat acc = splat<vfloat>(NEG_INF);
  for (int64_t i = 0; i < n; i += VW) {
    const vfloat v = vload(x + i);
    acc = v > acc ? v : acc;
  }
  float m = NEG_INF;
  for (int j = 0; j < VW; ++j) m = acc[j] > m ? acc[j] : m;
  return m;
}

// z − z̄ of the n classes (n a multiple of LANES) of a chunk of K rows (z[k]: pass k's row)
// is formed as (z − ref) − tbar with ref = max_k z and tbar = mean_k (z − ref): exact where the K
// logits of a class are close, however large they are (z̄ itself would round at their size). ref
// is 0 at a class at -inf in every pass, and tbar is -inf exactly where some pass is at -inf (d is
// NaN or ±inf there: callers mask it).
inline void deviation_refs(const float* const* z, int64_t K, int64_t n, float* ref, float* tbar) {
  const float inv_k = 1.0f / static_cast<float>(K);
  for (int64_t i = 0; i < n; i += VW) {
    vfloat r = vload(z[0] + i);
    for (int64_t k = 1; k < K; ++k) {
      const vfloat zk = vload(z[k] + i);
      r = r < zk ? zk : r;
    }
    r = r == NEG_INF ? splat<vfloat>(0.0f) : r;
    vfloat t = vload(z[0] + i) - r;
    for (int64_t k = 1; k < K; ++k) t += vload(z[k] + i) - r;
    vstore(ref + i, r);
    vstore(tbar + i, t * inv_k);
  }
}

// log(x) with ~1 ulp error for x > 0, vectorisable: x = 2^e * m with m in [sqrt(1/2), sqrt(2)),
// log(m) by the Cephes polynomial. log(0) = -inf, log(inf) = inf, NaN stays NaN. Subnormal
// inputs are not handled (the one caller passes values in [1/K, 1] or 0).
inline float fast_log(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
  float m;
  std::memcpy(&m, &bits, sizeof(m));
  const bool low = m < 0.707106781186547524f;
  e -= low ? 1 : 0;
  m = low ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  const float fe = static_cast<float>(e);
  y += fe * -2.12194440e-4f;
  y += -0.5f * z;
  float out = m + y + fe * 0.693359375f;
  out = x == 0.0f ? NEG_INF : out;
  out = x == std::numeric_limits<float>::infinity() ? x : out;
  return x != x ? x : out;
}

// log p̄ per class from the K log-probability rows (classes at -inf in every pass give -inf).
// Loops run over classes innermost so that they vectorise; mx is CHUNK floats of scratch.
inline void log_mean_prob(const float* logp, int64_t K, int64_t n, float* mx, float* out) {
  for (int64_t i = 0; i < n; ++i) mx[i] = logp[i];
  for (int64_t k = 1; k < K; ++k)
    for (int64_t i = 0; i < n; ++i) mx[i] = std::max(mx[i], logp[k * CHUNK + i]);
  for (int64_t i = 0; i < n; ++i) {
    mx[i] = mx[i] == NEG_INF ? 0.0f : mx[i];
    out[i] = 0.0f;
  }
  for (int64_t k = 0; k < K; ++k)
    for (int64_t i = 0; i < n; ++i) out[i] += fast_exp(logp[k * CHUNK + i] - mx[i]);
  const float inv_k = 1.0f / static_cast<float>(K);
  for (int64_t i = 0; i < n; ++i) out[i] = mx[i] + fast_log(out[i] * inv_k);
}

struct Config {
  int64_t K, V;
  bool js, has_ce;
  float eps;
};

// The weight of each row's terms in the quantity differentiated (RowWeights of ops/backend.py):
// mean cross-entropy, divergence and, where z is not null, (1/K) Σ_k lse_k².
struct Weights {
  const float* ce;
  const float* div;
  const float* z;
};

// Where a gradient goes: element (k, n, v) at data + row_off[n] + k * stride_k + v * stride_v;
// stream: written with streaming stores (streams_well).
template <typename T>
struct GradOut {
  T* data;
  const int64_t* row_off;
  int64_t stride_k, stride_v;
  bool stream;
};

// The one-pass forward keeps a token's exponentials from its statistics sweep to its gradient
// sweep, so each logit's exponential is computed once: e = exp(t − σ) with σ the pass's running
// max when its chunk was read, and later p = e · exp(σ − m_k) / S_k with the row's final max m_k
// (σ − m_k is a difference of two logits, exact at any offset). The X form also keeps u = e·d_k,
// so that its gradient sweep reads neither the logits nor an exponential (row_gradient_cached);
// JS keeps log p̄. What is kept must still be in cache when the gradient sweep reads it back:
// from main memory, writing and re-reading 2·K·V floats costs more than re-reading the K·V logits
// and recomputing exp(t − lse), which is what rows beyond the budget do.
//
// The budget is this thread's share of the last-level cache: half the L3 (the other half holds
// the logits streaming through) divided among the threads that share it, never less than the L2,
// and 1 MiB where the cache sizes are unknown. The sizes come from Linux sysfs, as lscpu reads
// them: glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) reports the host's 256 MiB inside the 2-vCPU VM of
// the committed benchmarks, whose L3 slice is 32 MiB. There, a 1 MiB budget put K = 4,
// V = 50257 at 1.46x two exp passes and K = 3, V = 128256 at 1.38x; 8 MiB (this rule's value)
// put them at 1.05x and 0.89x. Cached or recomputed, the gradient is the same bit for bit, so the
// budget changes speed, never results.
struct CacheLevel {
  int64_t bytes = 0, cpus = 1;  // size, and how many logical CPUs share it
};

CacheLevel sysfs_cache(int level) {
  CacheLevel found;
#if defined(__linux__)
  for (int i = 0; i < 16; ++i) {
    const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(i) + "/";
    std::ifstream level_file(dir + "level");
    int l = 0;
    if (!(level_file >> l)) break;
    std::ifstream type_file(dir + "type");
    std::string type;
    type_file >> type;
    if (l != level || type == "Instruction") continue;
    std::ifstream size_file(dir + "size");  // "512K", "32768K"
    int64_t n = 0;
    char unit = 0;
    if (!(size_file >> n)) continue;
    size_file >> unit;
    found.bytes = n * (unit == 'K' ? int64_t(1) << 10 : unit == 'M' ? int64_t(1) << 20 : unit == 'G' ? int64_t(1) << 30 : 1);
    std::ifstream list_file(dir + "shared_cpu_list");  // "0-1", "0-7,64-71"
    std::string list, item;
    list_file >> list;
    int64_t cpus = 0;
    for (size_t pos = 0; pos <= list.size();) {
      const size_t comma = std::min(list.find(',', pos), list.size());
      item = list.substr(pos, comma - pos);
      const size_t dash = item.find('-');
      try {
        if (!item.empty())
          cpus += dash == std::string::npos ? 1 : std::stoll(item.substr(dash + 1)) - std::stoll(item.substr(0, dash)) + 1;
      } catch (const std::exception&) {  // an unreadable list: count this CPU alone
      }
      pos = comma + 1;
    }
    found.cpus = std::max<int64_t>(1, cpus);
    break;
  }
#endif
  return found;
}

int64_t one_pass_cache_bytes() {
  static const CacheLevel l2 = sysfs_cache(2), l3 = sysfs_cache(3);
  if (l2.bytes == 0 && l3.bytes == 0) return int64_t(1) << 20;
  const int64_t sharing = std::min<int64_t>(l3.cpus, std::max(1, at::get_num_threads()));
  return std::max(l2.bytes, l3.bytes / (2 * sharing));
}

inline int64_t chunks_of(int64_t V) { return (V + CHUNK - 1) / CHUNK; }

inline bool row_fits_cache(int64_t K, int64_t V, bool js) {
  return (js ? K + 1 : 2 * K) * chunks_of(V) * CHUNK * int64_t(sizeof(float)) <= one_pass_cache_bytes();
}

// Per-thread buffers of the row kernels.
struct Scratch {
  std::vector<float> z, p, lp, zref, tbar, pbar, lpbar, g, scratch;
  std::vector<float> m, S, log_s, stat, lse, A, zsum, zy, ref_y, coef_e, coef_u, coef_p;
  // One-pass cache (empty when the rows do not fit): e per [chunk][k][CHUNK], σ per [chunk][k],
  // and for JS log p̄ per [chunk][CHUNK] from the statistics' second sweep.
  std::vector<float> e, u, shift, lpbar_row;
  std::vector<const float*> zp;  // pass k's chunk: in the logits or in z
  bool cached = false;

  Scratch(int64_t K, int64_t V, bool js, bool cache)
      : z(K * CHUNK), p(K * CHUNK), lp(K * CHUNK), zref(CHUNK), tbar(CHUNK), pbar(CHUNK), lpbar(CHUNK),
        g(CHUNK), scratch(CHUNK), m(K), S(K), log_s(K), stat(K), lse(K), A(K), zsum(K), zy(K), ref_y(K), coef_e(K), coef_u(K), coef_p(K), zp(K),
        cached(cache) {
    if (cache) {
      e.resize(chunks_of(V) * K * CHUNK);
      shift.resize(chunks_of(V) * K);
      if (js) lpbar_row.resize(chunks_of(V) * CHUNK);
      else u.resize(chunks_of(V) * K * CHUNK);
    }
  }
};

// Statistics of one active row: fills sc.m, S, log_s, lse, stat and returns (ce, div) of the row.
// With sc.cached, also keeps the row's exponentials (and log p̄ for JS) for row_gradient.
template <typename T>
std::pair<float, float> row_statistics(const Rows<T>& rows, const T* row, int64_t y, const Config& c, Scratch& sc) {
  const int64_t K = c.K, V = c.V;
  const bool smooth = c.has_ce && c.eps > 0.0f;
  float* z = sc.z.data();
  if (c.has_ce) {
    // Cross-entropy is taken relative to the target logit (any finite reference would do).
    for (int64_t k = 0; k < K; ++k) {
      sc.zy[k] = rows.at(row, k, y);
      sc.ref_y[k] = sc.zy[k] == NEG_INF ? 0.0f : sc.zy[k];
    }
  }
  std::fill(sc.m.begin(), sc.m.end(), NEG_INF);
  std::fill(sc.S.begin(), sc.S.end(), 0.0f);
  std::fill(sc.A.begin(), sc.A.end(), 0.0f);
  std::fill(sc.zsum.begin(), sc.zsum.end(), 0.0f);
  // Where some passes of a class are at -inf and others not, KL(p̄ ‖ p_k) = +inf exactly; that is
  // decided on the logits, because the finite passes' exponentials may underflow to 0.
  vint partly = vint{};
  for (int64_t v0 = 0, chunk = 0; v0 < V; v0 += CHUNK, ++chunk) {
    const int64_t len = std::min(CHUNK, V - v0), padded = round_up(len);
    for (int64_t k = 0; k < K; ++k) sc.zp[k] = rows.view(row, k, v0, len, padded, &z[k * CHUNK]);
    if (!c.js) deviation_refs(sc.zp.data(), K, padded, sc.zref.data(), sc.tbar.data());
    for (int64_t k = 0; k < K; ++k) {
      const float* zk = sc.zp[k];
      const float m_new = std::max(sc.m[k], lane_max(zk, padded));
      // A row at -inf so far keeps m = -inf; shifting by 0 avoids (-inf) - (-inf).
      const float shift = m_new == NEG_INF ? 0.0f : m_new;
      const float scale = fast_exp(sc.m[k] - shift);
      if (sc.cached) sc.shift[chunk * K + k] = shift;
      vfloat s_acc = vfloat{}, a_acc = vfloat{};
      if (c.js) {
        float* ek = sc.cached ? &sc.e[(chunk * K + k) * CHUNK] : nullptr;
        for (int64_t i = 0; i < padded; i += VW) {
          const vfloat e = fast_exp(vload(zk + i) - shift);
          if (ek) vstore(ek + i, e);
          s_acc += e;
        }
      } else {
        // d_k = (z_k − ref) − tbar, 0 at classes at -inf in any pass: their term is 0 where every
        // pass is at -inf, and +inf (partly) where only some are. The gradient sweep of the
        // one-pass forward needs e and u = e·d_k only, so they are what the cache keeps.
        float* ek = sc.cached ? &sc.e[(chunk * K + k) * CHUNK] : nullptr;
        float* uk = sc.cached ? &sc.u[(chunk * K + k) * CHUNK] : nullptr;
        const float *ref = sc.zref.data(), *tbar = sc.tbar.data();
        for (int64_t i = 0; i < padded; i += VW) {
          const vfloat zv = vload(zk + i), tb = vload(tbar + i);
          const vint some_inf = tb == NEG_INF;
          partly |= some_inf & (zv != NEG_INF);
          const vfloat d = some_inf ? vfloat{} : (zv - vload(ref + i)) - tb;
          const vfloat e = fast_exp(zv - shift), u = e * d;  // a NaN logit gives e = NaN: it reaches the result
          if (ek) {
            vstore(ek + i, e);
            vstore(uk + i, u);
          }
          s_acc += e;
          a_acc += u;
        }
      }
      sc.S[k] = sc.S[k] * scale + vsum(s_acc);
      if (!c.js) sc.A[k] = sc.A[k] * scale + vsum(a_acc);
      if (smooth) {
        // Per-lane partial sums over whole lane blocks, then the tail (the padding is -inf).
        const float ref = sc.ref_y[k];
        const int64_t whole = len / LANES * LANES;
        vfloat z_acc = vfloat{};
        for (int64_t i = 0; i < whole; i += VW) z_acc += vload(zk + i) - ref;
        float acc = vsum(z_acc);
        for (int64_t i = whole; i < len; ++i) acc += zk[i] - ref;
        sc.zsum[k] += acc;
      }
      sc.m[k] = m_new;
    }
  }
  for (int64_t k = 0; k < K; ++k) sc.log_s[k] = std::log(sc.S[k]);
  if (c.js) {
    // Second sweep: KL_k = Σ p_k (log p_k − log p̄); log p̄ needs every lse_k first.
    std::fill(sc.stat.begin(), sc.stat.end(), 0.0f);
    for (int64_t v0 = 0, chunk = 0; v0 < V; v0 += CHUNK, ++chunk) {
      const int64_t len = std::min(CHUNK, V - v0);
      for (int64_t k = 0; k < K; ++k) {
        rows.load(row, k, v0, len, len, &z[k * CHUNK]);
        // log p_k = (t − m_k) − log S_k: two small differences whatever the logits' offset.
        for (int64_t i = 0; i < len; ++i) z[k * CHUNK + i] = (z[k * CHUNK + i] - sc.m[k]) - sc.log_s[k];
      }
      float* lpbar = sc.cached ? &sc.lpbar_row[chunk * CHUNK] : sc.lpbar.data();
      log_mean_prob(z, K, len, sc.scratch.data(), lpbar);
      for (int64_t k = 0; k < K; ++k) {
        float acc = 0.0f;
        for (int64_t i = 0; i < len; ++i) {
          const float lp = z[k * CHUNK + i], p = fast_exp(lp);
          acc += p == 0.0f ? 0.0f : p * (lp - lpbar[i]);
        }
        sc.stat[k] += acc;
      }
    }
  } else {
    bool partly_inf = false;
    for (int j = 0; j < VW; ++j) partly_inf |= partly[j] != 0;
    const float inf_term = partly_inf ? std::numeric_limits<float>::infinity() : 0.0f;
    for (int64_t k = 0; k < K; ++k) sc.stat[k] = sc.A[k] / sc.S[k] + inf_term;
  }
  float div = 0.0f, ce = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    div += sc.stat[k];
    sc.lse[k] = sc.m[k] + sc.log_s[k];
    if (c.has_ce) {
      // CE_k = lse_k − (1−ε)·t_y − ε·mean_v t, every term relative to ref_y.
      const float ce_k = (sc.m[k] - sc.ref_y[k]) + sc.log_s[k];
      ce += smooth ? ce_k - (1.0f - c.eps) * (sc.zy[k] - sc.ref_y[k]) - (c.eps / static_cast<float>(V)) * sc.zsum[k]
                   : ce_k - (sc.zy[k] - sc.ref_y[k]);
    }
  }
  return {c.has_ce ? ce / static_cast<float>(K) : 0.0f, div / static_cast<float>(K)};
}

template <typename T>
void zero_row(T* grow, int64_t K, int64_t V, int64_t stride_k, int64_t stride_v) {
  for (int64_t k = 0; k < K; ++k)
    for (int64_t v = 0; v < V; ++v) grow[k * stride_k + v * stride_v] = T(0);
}

// Streaming stores (x86 with AVX, float32) write a line without reading it first; the caller
// decides where they pay (streams_well).
template <typename T>
inline bool stream_row(const float* g, int64_t len, T* dst) {
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    if (reinterpret_cast<uintptr_t>(dst) % 32 == 0 && len % 8 == 0) {
      for (int64_t i = 0; i < len; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(g + i));
      return true;
    }
  }
#endif
  return false;
}

// Orders the streaming stores of this thread before the kernel returns.
inline void stream_fence() {
#if defined(__AVX__)
  _mm_sfence();
#endif
}

template <typename T>
inline void store_row(const float* g, int64_t len, T* dst, int64_t stride, bool stream) {
  if (stream && stride == 1 && stream_row(g, len, dst)) return;
  if (stride == 1) {
    for (int64_t i = 0; i < len; ++i) dst[i] = static_cast<T>(g[i]);
  } else {
    for (int64_t i = 0; i < len; ++i) dst[i * stride] = static_cast<T>(g[i]);
  }
}

// The gradient sweep of the one-pass forward in the X form, right after row_statistics kept
// e = exp(t − σ) and u = e·d_k per class: with c_k = exp(σ − m_k) / S_k, p_k = c_k·e and
// p_k·d_k = c_k·u, so (every weight divided by K)
//   g_k = c_k·[w_div·u + (w_div·(1 − s_k) + w_ce + 2·w_z·lse_k)·e] − w_div·p̄ − w_ce·(ε/V + (1 − ε)·onehot(y))
// needs neither an exponential nor the logits, which are read again only for softcap's chain rule.
// The logits may be overwritten: this sweep reads none of them before writing.
template <typename T>
void row_gradient_cached(const Rows<T>& rows, const T* row, int64_t y, const Config& c, float w_ce, float w_div,
                         float w_z, T* grow, int64_t gstride_k, int64_t gstride_v, bool stream, Scratch& sc) {
  const int64_t K = c.K, V = c.V;
  const float inv_k = 1.0f / static_cast<float>(K);
  const float g_div = w_div * inv_k;
  const float g_ce = c.has_ce ? w_ce * inv_k : 0.0f;
  const float g_z = w_z * inv_k;
  const float offset = c.has_ce ? g_ce * c.eps / static_cast<float>(V) : 0.0f;
  float *z = sc.z.data(), *g = sc.g.data(), *pbar = sc.pbar.data();
  for (int64_t v0 = 0, chunk = 0; v0 < V; v0 += CHUNK, ++chunk) {
    const int64_t len = std::min(CHUNK, V - v0), padded = round_up(len);
    for (int64_t k = 0; k < K; ++k) {
      const float ck = fast_exp(sc.shift[chunk * K + k] - sc.m[k]) / sc.S[k];
      const float z_term = g_z != 0.0f ? 2.0f * g_z * sc.lse[k] : 0.0f;
      sc.coef_e[k] = ck * (g_div * (1.0f - sc.stat[k]) + g_ce + z_term);
      sc.coef_u[k] = ck * g_div;
      sc.coef_p[k] = ck * g_div * inv_k;
    }
    const float* e = &sc.e[chunk * K * CHUNK];
    const float* u = &sc.u[chunk * K * CHUNK];
    for (int64_t i = 0; i < padded; i += VW) {
      vfloat pb = sc.coef_p[0] * vload(e + i);
      for (int64_t k = 1; k < K; ++k) pb += sc.coef_p[k] * vload(e + k * CHUNK + i);
      vstore(pbar + i, pb + offset);
    }
    for (int64_t k = 0; k < K; ++k) {
      const float cu = sc.coef_u[k], ce = sc.coef_e[k];
      const float *ek = e + k * CHUNK, *uk = u + k * CHUNK;
      for (int64_t i = 0; i < padded; i += VW)
        vstore(g + i, cu * vload(uk + i) + ce * vload(ek + i) - vload(pbar + i));
      if (c.has_ce && y >= v0 && y < v0 + len) g[y - v0] -= g_ce * (1.0f - c.eps);
      float* zk = &z[k * CHUNK];
      if (rows.tf.capped) rows.load(row, k, v0, len, padded, zk);
      rows.tf.chain(zk, g, len);
      store_row(g, len, grow + k * gstride_k + v0 * gstride_v, gstride_v, stream);
    }
  }
}

// The gradient of one active row (kernel_spec §2), from its lse_k and stat_k. With sc.cached (the
// one-pass forward, right after row_statistics) p_k comes from the kept exponentials; otherwise
// it is recomputed as exp(t − lse_k). Every read of a chunk happens before any write to it, so the
// gradient may overwrite the logits.
template <typename T>
void row_gradient(const Rows<T>& rows, const T* row, int64_t y, const Config& c, const float* lse,
                  const float* stat, float w_ce, float w_div, float w_z, T* grow, int64_t gstride_k,
                  int64_t gstride_v, bool stream, Scratch& sc) {
  const int64_t K = c.K, V = c.V;
  const float inv_k = 1.0f / static_cast<float>(K);
  const float smooth_term = c.has_ce ? c.eps / static_cast<float>(V) : 0.0f;
  const float g_div = w_div * inv_k;
  const float g_ce = c.has_ce ? w_ce * inv_k : 0.0f;
  const float g_z = w_z * inv_k;
  float *z = sc.z.data(), *p = sc.p.data(), *lp = sc.lp.data(), *g = sc.g.data();
  for (int64_t v0 = 0, chunk = 0; v0 < V; v0 += CHUNK, ++chunk) {
    const int64_t len = std::min(CHUNK, V - v0), padded = round_up(len);
    for (int64_t k = 0; k < K; ++k) {
      float* zk = &z[k * CHUNK];
      float* pk = &p[k * CHUNK];
      rows.load(row, k, v0, len, padded, zk);
      if (sc.cached) {
        const float* ek = &sc.e[(chunk * K + k) * CHUNK];
        const float to_p = fast_exp(sc.shift[chunk * K + k] - sc.m[k]) / sc.S[k];
        for (int64_t i = 0; i < padded; ++i) pk[i] = ek[i] * to_p;
      } else {
        const float l = lse[k];
        for (int64_t i = 0; i < padded; i += VW) vstore(pk + i, fast_exp(vload(zk + i) - l));
      }
    }
    const float* lpbar = sc.lpbar.data();
    if (c.js) {
      // log p_k as the forward forms it where its m_k and S_k are at hand.
      for (int64_t k = 0; k < K; ++k) {
        const float* zk = &z[k * CHUNK];
        float* lpk = &lp[k * CHUNK];
        if (sc.cached) {
          for (int64_t i = 0; i < len; ++i) lpk[i] = (zk[i] - sc.m[k]) - sc.log_s[k];
        } else {
          for (int64_t i = 0; i < len; ++i) lpk[i] = zk[i] - lse[k];
        }
      }
      if (sc.cached) {
        lpbar = &sc.lpbar_row[chunk * CHUNK];
      } else {
        log_mean_prob(lp, K, len, sc.scratch.data(), sc.lpbar.data());
      }
    } else {
      for (int64_t k = 0; k < K; ++k) sc.zp[k] = &z[k * CHUNK];
      deviation_refs(sc.zp.data(), K, padded, sc.zref.data(), sc.tbar.data());
      for (int64_t i = 0; i < padded; ++i) sc.pbar[i] = 0.0f;
      for (int64_t k = 0; k < K; ++k)
        for (int64_t i = 0; i < padded; ++i) sc.pbar[i] += p[k * CHUNK + i];
      for (int64_t i = 0; i < padded; ++i) sc.pbar[i] *= inv_k;
    }
    for (int64_t k = 0; k < K; ++k) {
      const float* zk = &z[k * CHUNK];
      const float* pk = &p[k * CHUNK];
      const float s = stat[k];
      if (c.js) {
        // ∂JS/∂t_j = (1/K) p_j ⊙ (r_j − KL_j)
        const float* lpk = &lp[k * CHUNK];
        for (int64_t i = 0; i < len; ++i) g[i] = g_div * (pk[i] == 0.0f ? 0.0f : pk[i] * (lpk[i] - lpbar[i] - s));
      } else {
        // ∂X/∂t_j = (1/K) [p_j ⊙ (d_j − s_j + 1) − p̄]
        const float* zref = sc.zref.data();
        const float* tbar = sc.tbar.data();
        const float* pbar = sc.pbar.data();
        for (int64_t i = 0; i < len; ++i)
          g[i] = g_div * ((pk[i] == 0.0f ? 0.0f : pk[i] * ((zk[i] - zref[i]) - tbar[i] - s + 1.0f)) - pbar[i]);
      }
      // ∂CE_k/∂t_k = p_k − (1−ε)·onehot(y) − ε/V and ∂lse_k²/∂t_k = 2·lse_k·p_k share the p_k term.
      const float p_coef = g_ce + 2.0f * g_z * (g_z != 0.0f ? lse[k] : 0.0f);
      const float offset = g_ce * smooth_term;
      if (c.has_ce || g_z != 0.0f)
        for (int64_t i = 0; i < len; ++i) g[i] += p_coef * pk[i] - offset;
      if (c.has_ce && y >= v0 && y < v0 + len) g[y - v0] -= g_ce * (1.0f - c.eps);
      rows.tf.chain(zk, g, len);
      store_row(g, len, grow + k * gstride_k + v0 * gstride_v, gstride_v, stream);
    }
  }
}

// Statistics of every row; with `out` (the one-pass forward), also each row's gradient, written
// in the same task while the row is in cache.
template <typename T>
void forward_rows(const Rows<T>& rows, const int64_t* row_off, const int64_t* target, const Config& c,
                  float* ce_row, float* div_row, float* lse_out, float* stat_out, int64_t N,
                  const Weights* w, const GradOut<T>* out) {
  const int64_t K = c.K, V = c.V;
  const bool cache = out != nullptr && row_fits_cache(K, V, c.js);
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(K, V, c.js, cache);
    for (int64_t n = begin; n < end; ++n) {
      const int64_t y = target[n];
      if (y < 0) {
        ce_row[n] = div_row[n] = 0.0f;
        for (int64_t k = 0; k < K; ++k) lse_out[k * N + n] = stat_out[k * N + n] = 0.0f;
        if (out) zero_row(out->data + out->row_off[n], K, V, out->stride_k, out->stride_v);
        continue;
      }
      const T* row = rows.data + row_off[n];
      const auto [ce, div] = row_statistics(rows, row, y, c, sc);
      ce_row[n] = ce;
      div_row[n] = div;
      for (int64_t k = 0; k < K; ++k) {
        lse_out[k * N + n] = sc.lse[k];
        stat_out[k * N + n] = sc.stat[k];
      }
      if (!out) continue;
      T* grow = out->data + out->row_off[n];
      const float w_z = w->z ? w->z[n] : 0.0f;
      if (cache && !c.js)
        row_gradient_cached(rows, row, y, c, w->ce[n], w->div[n], w_z, grow, out->stride_k, out->stride_v,
                            out->stream, sc);
      else
        row_gradient(rows, row, y, c, sc.lse.data(), sc.stat.data(), w->ce[n], w->div[n], w_z, grow, out->stride_k,
                     out->stride_v, out->stream, sc);
    }
    stream_fence();
  });
}

template <typename T>
void backward_rows(const Rows<T>& rows, const int64_t* row_off, const int64_t* target, const Config& c,
                   const float* lse, const float* stat, const Weights& w, const GradOut<T>& out, int64_t N) {
  const int64_t K = c.K, V = c.V;
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(K, V, c.js, false);
    std::vector<float> lse_n(K), stat_n(K);
    for (int64_t n = begin; n < end; ++n) {
      T* grow = out.data + out.row_off[n];
      const int64_t y = target[n];
      if (y < 0) {
        zero_row(grow, K, V, out.stride_k, out.stride_v);
        continue;
      }
      for (int64_t k = 0; k < K; ++k) {
        lse_n[k] = lse[k * N + n];
        stat_n[k] = stat[k * N + n];
      }
      row_gradient(rows, rows.data + row_off[n], y, c, lse_n.data(), stat_n.data(), w.ce[n], w.div[n],
                   w.z ? w.z[n] : 0.0f, grow, out.stride_k, out.stride_v, out.stream, sc);
    }
    stream_fence();
  });
}

void check_inputs(const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target) {
  TORCH_CHECK(logits.device().is_cpu(), "intradistill cpu kernel: logits must be a CPU tensor");
  TORCH_CHECK(logits.dim() >= 2, "intradistill cpu kernel: logits must be [K, *B, V]");
  TORCH_CHECK(row_off.scalar_type() == at::kLong && row_off.is_contiguous(), "row_off must be contiguous int64");
  TORCH_CHECK(target.scalar_type() == at::kLong && target.is_contiguous(), "target must be contiguous int64");
  TORCH_CHECK(row_off.numel() == target.numel(), "row_off and target must have N elements");
}

void check_row_vector(const at::Tensor& t, int64_t N, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == N,
              name, " must be a contiguous float32 tensor of N elements");
}

void check_grad(const at::Tensor& grad, const at::Tensor& grad_row_off, const at::Tensor& logits, int64_t N) {
  TORCH_CHECK(grad.scalar_type() == logits.scalar_type() && grad.sizes() == logits.sizes(),
              "grad must match logits in shape and dtype");
  TORCH_CHECK(grad_row_off.scalar_type() == at::kLong && grad_row_off.is_contiguous() && grad_row_off.numel() == N,
              "grad_row_off must be contiguous int64 of N elements");
}

Transform make_transform(double logit_scale, double softcap) {
  TORCH_CHECK(std::isfinite(logit_scale) && logit_scale > 0.0, "logit_scale must be finite and > 0");
  TORCH_CHECK(std::isfinite(softcap) && softcap >= 0.0, "softcap must be finite and >= 0 (0: off)");
  Transform tf;
  tf.scale = static_cast<float>(logit_scale);
  tf.scaled = logit_scale != 1.0;
  tf.capped = softcap > 0.0;
  tf.cap = static_cast<float>(softcap);
  tf.inv_cap = tf.capped ? static_cast<float>(1.0 / softcap) : 0.0f;
  return tf;
}

// Whether streaming stores pay for this gradient buffer: only where its lines are in memory but
// not in cache, i.e. a buffer used before. A streaming store to a line that is in cache evicts it
// first, and two cases have their lines in cache: in place, the logits were just read; and in a
// fresh buffer, the kernel zeroes each page at its first write, which leaves the page in cache. A
// fresh buffer is told apart by a page the allocator has not touched: the middle one, not yet
// resident (mincore), where an allocator's own header may have faulted in the first.
//
// A fresh buffer is deliberately not advised to use transparent huge pages: in a VM whose guest
// reports free memory to the hypervisor (virtio-balloon free page reporting, in 2 MiB blocks),
// a huge page is exactly such a block, and its first touch after the host took it back costs
// 512 host faults instead of one zeroing (per 2 MiB: 3-5 ms instead of 0.3 ms on the 2-vCPU
// Xeon VM of the benchmarks), which made whole calls 7x slower, at random.
bool streams_well(const at::Tensor& grad, const at::Tensor& logits) {
  if (grad.storage().data() == logits.storage().data()) return false;
#if defined(__linux__)
  const auto page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const auto middle = reinterpret_cast<uintptr_t>(grad.storage().data()) + grad.storage().nbytes() / 2;
  unsigned char resident = 0;
  if (page > 0 && mincore(reinterpret_cast<void*>(middle & ~(page - 1)), 1, &resident) == 0) return resident & 1;
#endif
  return false;
}

Weights weights_of(const at::Tensor& w_ce, const at::Tensor& w_div, const std::optional<at::Tensor>& w_z, int64_t N) {
  check_row_vector(w_ce, N, "w_ce");
  check_row_vector(w_div, N, "w_div");
  if (w_z) check_row_vector(*w_z, N, "w_z");
  return {w_ce.const_data_ptr<float>(), w_div.const_data_ptr<float>(), w_z ? w_z->const_data_ptr<float>() : nullptr};
}

// With grad (and w_ce, w_div, optionally w_z): the one-pass forward, which also writes each row's
// gradient with these weights.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target, bool js, double eps, bool has_ce,
    double logit_scale, double softcap, const std::optional<at::Tensor>& w_ce, const std::optional<at::Tensor>& w_div,
    const std::optional<at::Tensor>& w_z, const std::optional<at::Tensor>& grad,
    const std::optional<at::Tensor>& grad_row_off) {
  check_inputs(logits, row_off, target);
  const int64_t K = logits.size(0), V = logits.size(-1), N = row_off.numel();
  auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor ce = at::empty({N}, f32), div = at::empty({N}, f32), lse = at::empty({K, N}, f32),
             stat = at::empty({K, N}, f32);
  const Config c{K, V, js, has_ce, static_cast<float>(eps)};
  const Transform tf = make_transform(logit_scale, softcap);
  Weights w{};
  if (grad) {
    TORCH_CHECK(w_ce && w_div && grad_row_off, "the one-pass forward needs w_ce, w_div and grad_row_off with grad");
    check_grad(*grad, *grad_row_off, logits, N);
    w = weights_of(*w_ce, *w_div, w_z, N);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "intradistill_forward", [&] {
    Rows<scalar_t> rows{logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(-1), tf};
    std::optional<GradOut<scalar_t>> out;
    if (grad)
      out = GradOut<scalar_t>{grad->data_ptr<scalar_t>(), grad_row_off->const_data_ptr<int64_t>(), grad->stride(0),
                              grad->stride(-1), streams_well(*grad, logits)};
    forward_rows<scalar_t>(rows, row_off.const_data_ptr<int64_t>(), target.const_data_ptr<int64_t>(), c,
                           ce.data_ptr<float>(), div.data_ptr<float>(), lse.data_ptr<float>(),
                           stat.data_ptr<float>(), N, grad ? &w : nullptr, out ? &*out : nullptr);
  });
  return {ce, div, lse, stat};
}

void backward(const at::Tensor& logits, const at::Tensor& row_off, const at::Tensor& target,
              const at::Tensor& lse, const at::Tensor& stat, const at::Tensor& w_ce, const at::Tensor& w_div,
              const std::optional<at::Tensor>& w_z, bool js, double eps, bool has_ce, double logit_scale,
              double softcap, at::Tensor grad, const at::Tensor& grad_row_off) {
  check_inputs(logits, row_off, target);
  const int64_t K = logits.size(0), V = logits.size(-1), N = row_off.numel();
  check_grad(grad, grad_row_off, logits, N);
  for (const at::Tensor* t : {&lse, &stat})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == K * N,
                "saved statistics must be contiguous float32 [K, N]");
  const Weights w = weights_of(w_ce, w_div, w_z, N);
  const Config c{K, V, js, has_ce, static_cast<float>(eps)};
  const Transform tf = make_transform(logit_scale, softcap);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, logits.scalar_type(), "intradistill_backward", [&] {
    Rows<scalar_t> rows{logits.const_data_ptr<scalar_t>(), logits.stride(0), logits.stride(-1), tf};
    const GradOut<scalar_t> out{grad.data_ptr<scalar_t>(), grad_row_off.const_data_ptr<int64_t>(), grad.stride(0),
                                grad.stride(-1), streams_well(grad, logits)};
    backward_rows<scalar_t>(rows, row_off.const_data_ptr<int64_t>(), target.const_data_ptr<int64_t>(), c,
                            lse.const_data_ptr<float>(), stat.const_data_ptr<float>(), w, out, N);
  });
}

// Any K: a token's K rows are staged in heap buffers sized at run time.
int64_t max_passes(const at::Tensor&) { return std::numeric_limits<int64_t>::max(); }

// Bytes of kept exponentials per thread below which the one-pass forward computes each exponential
// once (tests size their rows beyond it to reach the recomputing path on any machine).
int64_t cache_budget(const at::Tensor&) { return one_pass_cache_bytes(); }

}  // namespace

TORCH_LIBRARY(intradistill_cpp, m) {
  m.def("forward(Tensor logits, Tensor row_off, Tensor target, bool js, float label_smoothing, bool has_ce, "
        "float logit_scale, float softcap, Tensor? w_ce, Tensor? w_div, Tensor? w_z, Tensor(a!)? grad, "
        "Tensor? grad_row_off) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("backward(Tensor logits, Tensor row_off, Tensor target, Tensor lse, Tensor stat, Tensor w_ce, Tensor w_div, "
        "Tensor? w_z, bool js, float label_smoothing, bool has_ce, float logit_scale, float softcap, "
        "Tensor(a!) grad, Tensor grad_row_off) -> ()");
  // The largest K the kernels of probe's device accept (int64 max: any); Python reads the limit
  // from here instead of keeping a copy of a constant that lives in C++.
  m.def("max_passes(Tensor probe) -> int");
  m.def("one_pass_cache_bytes(Tensor probe) -> int");
}

TORCH_LIBRARY_IMPL(intradistill_cpp, CPU, m) {
  m.impl("forward", &forward);
  m.impl("backward", &backward);
  m.impl("max_passes", &max_passes);
  m.impl("one_pass_cache_bytes", &cache_budget);
}
