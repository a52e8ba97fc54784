// One decode step of attention for the `fast` engine, fused: each row's query heads against its group's shared
// prompt keys/values and its own generated keys/values, in one pass that reads every key and value once.
//
// q      (R, Hq, D)          queries of the live rows, already multiplied by the attention scale
// kp     (G, Hkv, P, D)      the prompt's keys, once per group (contiguous)
// vp     (G, Hkv, P, D)      the prompt's values (contiguous)
// bias   (G, P)              0 for a prompt column, -inf for left padding
// kg     (R, Hkv, T, D)      the generated keys of the live rows; rows [0, len) are used; float32, or float16
//                            (kv_cache_dtype: half the bytes to read, widened exactly as they are read)
// vg     (R, Hkv, T, D)      the generated values; rows [0, len) are used; of kg's type
// group  (R,) int64          the group (prompt) of each live row
// slot   (R,) int64 or None  the cache row of each live row, where finished rows stay in the caches (kg and vg
//                            then have more rows than R); None: live row r is cache row r
// out    (R, Hq, D)          softmax([q kp^T + bias, q kg^T]) [vp; vg]
//
// Every key and value row is contiguous (D floats). Where the compiler targets AVX2 with FMA (-march=native on
// x86-64), scores are computed eight keys at a time (eight independent dot products, summed across lanes at once)
// and the weighted sum of values two rows at a time with 4-vector accumulators, so the loops run at the speed of
// reading the caches (float16 ones widened eight at a time by F16C); elsewhere (or D not a multiple of 8) plain
// loops that the compiler vectorises. The exponentials use a vectorisable polynomial. Float32 arithmetic; D up to
// 256.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#endif

#include "fast_exp.h"

namespace {

using tokenmdp::exp_nonpositive;

// a cache element as a float: the generated keys and values are float32, or float16 where the caller stores them
// so (half the bytes to read at every step)
inline float as_float(float x) { return x; }
inline float as_float(at::Half x) { return static_cast<float>(x); }

// scores s[c] = base[c] + q . k_c for n keys k_c = k + c * ks (base may be null: 0)
template <typename T>
inline void scores_plain(const float* __restrict q, const T* k, int64_t ks, int64_t n, int64_t D,
                         const float* base, float* __restrict s) {
  for (int64_t c = 0; c < n; ++c) {
    const T* __restrict kc = k + c * ks;
    float acc = base ? base[c] : 0.f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += q[d] * as_float(kc[d]);
    s[c] = acc;
  }
}

// acc[d] += sum_c w[c] * v_c[d] for n value rows v_c = v + c * vs
template <typename T>
inline void weighted_plain(const float* __restrict w, const T* v, int64_t vs, int64_t n, int64_t D,
                           float* __restrict acc) {
  for (int64_t c = 0; c < n; ++c) {
    const float wc = w[c];
    const T* __restrict vc = v + c * vs;
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) acc[d] += wc * as_float(vc[d]);
  }
}

// s[0..n) = exp(s - max s) in place; returns their sum
inline float softmax_plain(float* __restrict s, int64_t n) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t c = 0; c < n; ++c) m = std::max(m, s[c]);
  float total = 0.f;
#pragma omp simd reduction(+ : total)
  for (int64_t c = 0; c < n; ++c) {
    s[c] = exp_nonpositive(s[c] - m);
    total += s[c];
  }
  return total;
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define TOKENMDP_AVX2 1
// eight cache elements as floats
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }

// the eight lane sums of a[0..7], as one vector (lane j = sum of a[j])
inline __m256 lane_sums8(const __m256* a) {
  const __m256 s01 = _mm256_hadd_ps(a[0], a[1]), s23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 s45 = _mm256_hadd_ps(a[4], a[5]), s67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 lo4 = _mm256_hadd_ps(s01, s23), hi4 = _mm256_hadd_ps(s45, s67);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo4, hi4, 0x20), _mm256_permute2f128_ps(lo4, hi4, 0x31));
}

inline float lane_sum(__m256 a) {
  const __m128 x = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  const __m128 y = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(y, _mm_movehdup_ps(y)));
}

// scores_plain for D a multiple of 8: eight keys at a time
template <typename T>
inline void scores_avx2(const float* q, const T* k, int64_t ks, int64_t n, int64_t D, const float* base, float* s) {
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    __m256 a[8];
    for (int j = 0; j < 8; ++j) a[j] = _mm256_setzero_ps();
    const T* kc = k + c * ks;
    for (int64_t d = 0; d < D; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int j = 0; j < 8; ++j) a[j] = _mm256_fmadd_ps(qv, load8(kc + j * ks + d), a[j]);
    }
    __m256 r = lane_sums8(a);
    if (base) r = _mm256_add_ps(r, _mm256_loadu_ps(base + c));
    _mm256_storeu_ps(s + c, r);
  }
  for (; c < n; ++c) {
    __m256 a = _mm256_setzero_ps();
    const T* kc = k + c * ks;
    for (int64_t d = 0; d < D; d += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), load8(kc + d), a);
    s[c] = lane_sum(a) + (base ? base[c] : 0.f);
  }
}

// exp_nonpositive on eight lanes
inline __m256 exp_nonpositive8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f);
  const __m256 y = _mm256_max_ps(x, lo);
  const __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(y, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  const __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), y));
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_add_ps(_mm256_fmadd_ps(_mm256_mul_ps(p, r), r, r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), e);  // 0 below -87.3 and for -inf
}

// softmax_plain, eight lanes at a time
inline float softmax_avx2(float* s, int64_t n) {
  __m256 mv = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + c));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  float m = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  for (int64_t k = c; k < n; ++k) m = std::max(m, s[k]);
  const __m256 mb = _mm256_set1_ps(m);
  __m256 tv = _mm256_setzero_ps();
  for (c = 0; c + 8 <= n; c += 8) {
    const __m256 e = exp_nonpositive8(_mm256_sub_ps(_mm256_loadu_ps(s + c), mb));
    _mm256_storeu_ps(s + c, e);
    tv = _mm256_add_ps(tv, e);
  }
  float total = lane_sum(tv);
  for (; c < n; ++c) {
    s[c] = exp_nonpositive(s[c] - m);
    total += s[c];
  }
  return total;
}

// weighted_plain for D a multiple of 8: 32 columns at a time, two value rows per iteration (two accumulator sets)
template <typename T>
inline void weighted_avx2(const float* w, const T* v, int64_t vs, int64_t n, int64_t D, float* acc) {
  int64_t d0 = 0;
  for (; d0 + 32 <= D; d0 += 32) {
    __m256 a[4], b[4];
    for (int i = 0; i < 4; ++i) {
      a[i] = _mm256_loadu_ps(acc + d0 + 8 * i);
      b[i] = _mm256_setzero_ps();
    }
    int64_t c = 0;
    for (; c + 2 <= n; c += 2) {
      const __m256 wa = _mm256_broadcast_ss(w + c), wb = _mm256_broadcast_ss(w + c + 1);
      const T* va = v + c * vs + d0;
      const T* vb = va + vs;
      for (int i = 0; i < 4; ++i) {
        a[i] = _mm256_fmadd_ps(wa, load8(va + 8 * i), a[i]);
        b[i] = _mm256_fmadd_ps(wb, load8(vb + 8 * i), b[i]);
      }
    }
    if (c < n) {
      const __m256 wa = _mm256_broadcast_ss(w + c);
      for (int i = 0; i < 4; ++i) a[i] = _mm256_fmadd_ps(wa, load8(v + c * vs + d0 + 8 * i), a[i]);
    }
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc + d0 + 8 * i, _mm256_add_ps(a[i], b[i]));
  }
  for (; d0 < D; d0 += 8) {
    __m256 a = _mm256_loadu_ps(acc + d0);
    for (int64_t c = 0; c < n; ++c) a = _mm256_fmadd_ps(_mm256_broadcast_ss(w + c), load8(v + c * vs + d0), a);
    _mm256_storeu_ps(acc + d0, a);
  }
}
#endif

template <typename T>
inline void scores(const float* q, const T* k, int64_t ks, int64_t n, int64_t D, const float* base, float* s) {
#ifdef TOKENMDP_AVX2
  if (D % 8 == 0) return scores_avx2(q, k, ks, n, D, base, s);
#endif
  scores_plain(q, k, ks, n, D, base, s);
}

// ask for n rows of D floats (row stride rs) to be brought towards the core ahead of use (prefetcht2: a row
// of the next items but one; the short per-row streams give the hardware prefetcher too little to learn from)
template <typename T>
inline void prefetch_rows(const T* p, int64_t rs, int64_t n, int64_t D) {
  constexpr int64_t line = 64 / sizeof(T);
  for (int64_t c = 0; c < n; ++c)
    for (int64_t d = 0; d < D; d += line) __builtin_prefetch(p + c * rs + d, 0, 1);
}

inline float softmax(float* s, int64_t n) {
#ifdef TOKENMDP_AVX2
  return softmax_avx2(s, n);
#else
  return softmax_plain(s, n);
#endif
}

template <typename T>
inline void weighted(const float* w, const T* v, int64_t vs, int64_t n, int64_t D, float* acc) {
#ifdef TOKENMDP_AVX2
  if (D % 8 == 0) return weighted_avx2(w, v, vs, n, D, acc);
#endif
  weighted_plain(w, v, vs, n, D, acc);
}

// The cache row of live row r: slot[r] where the caller keeps its finished rows in place (slot: the live rows'
// cache rows, ascending), else r (the caches hold the live rows only)
inline int64_t cache_row(const int64_t* slot, int64_t r) { return slot ? slot[r] : r; }

const int64_t* cache_rows(const std::optional<torch::Tensor>& slot, int64_t R, int64_t kg_rows, int64_t vg_rows,
                          const char* what) {
  if (!slot || !slot->defined()) {
    TORCH_CHECK(kg_rows == R && vg_rows == R, what, ": the caches hold one row per live row without a slot");
    return nullptr;
  }
  TORCH_CHECK(slot->scalar_type() == torch::kInt64 && slot->is_contiguous() && slot->numel() == R, what,
              ": slot (R,) int64");
  const int64_t* sl = slot->data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r)
    TORCH_CHECK(sl[r] >= 0 && sl[r] < std::min(kg_rows, vg_rows), what, ": slot ", sl[r], " out of the caches' rows");
  return sl;
}

// The attention of decode_attention (below) for caches of element type T (float or at::Half), checked there
template <typename T>
void attend(const torch::Tensor& q, const torch::Tensor& kp, const torch::Tensor& vp, const torch::Tensor& bias,
            const torch::Tensor& kg, const torch::Tensor& vg, const torch::Tensor& group, int64_t len,
            const int64_t* sl, torch::Tensor& out) {
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kp.size(1), P = kp.size(2);
  const int64_t rep = Hq / Hkv;
  const float* qd = q.data_ptr<float>();
  const float* kpd = kp.data_ptr<float>();
  const float* vpd = vp.data_ptr<float>();
  const float* bd = bias.data_ptr<float>();
  const T* kgd = kg.data_ptr<T>();
  const T* vgd = vg.data_ptr<T>();
  const int64_t* gd = group.data_ptr<int64_t>();
  float* od = out.data_ptr<float>();
  const int64_t kg_r = kg.stride(0), kg_h = kg.stride(1), kg_t = kg.stride(2);
  const int64_t vg_r = vg.stride(0), vg_h = vg.stride(1), vg_t = vg.stride(2);
  const int64_t cols = P + len;
  constexpr int64_t kAhead = 2;  // measured: 1-3 alike, 2x faster than none on the tiny model's rollouts
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(cols);
    float* __restrict s = buf.data();
    float acc[256];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / Hkv, h = item % Hkv, g = gd[r];
      if (item + kAhead < end) {  // the generated keys and values of a row and head two items on
        const int64_t r2 = cache_row(sl, (item + kAhead) / Hkv), h2 = (item + kAhead) % Hkv;
        prefetch_rows(kgd + r2 * kg_r + h2 * kg_h, kg_t, len, D);
        prefetch_rows(vgd + r2 * vg_r + h2 * vg_h, vg_t, len, D);
      }
      const float* kp_h = kpd + (g * Hkv + h) * P * D;
      const float* vp_h = vpd + (g * Hkv + h) * P * D;
      const float* b = bd + g * P;
      const T* kg_h0 = kgd + cache_row(sl, r) * kg_r + h * kg_h;
      const T* vg_h0 = vgd + cache_row(sl, r) * vg_r + h * vg_h;
      for (int64_t j = 0; j < rep; ++j) {
        const float* qj = qd + (r * Hq + h * rep + j) * D;
        scores(qj, kp_h, D, P, D, b, s);
        scores(qj, kg_h0, kg_t, len, D, nullptr, s + P);
        const float total = softmax(s, cols);
        const float inv = 1.f / total;
        // out = softmax(s) V, value row by value row
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
        weighted(s, vp_h, D, P, D, acc);
        weighted(s + P, vg_h0, vg_t, len, D, acc);
        float* o = od + (r * Hq + h * rep + j) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
      }
    }
  });
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& kp, const torch::Tensor& vp,
                               const torch::Tensor& bias, const torch::Tensor& kg, const torch::Tensor& vg,
                               const torch::Tensor& group, int64_t len, const std::optional<torch::Tensor>& slot) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && kp.scalar_type() == torch::kFloat32 &&
                  vp.scalar_type() == torch::kFloat32 && bias.scalar_type() == torch::kFloat32,
              "decode_attention: q, kp, vp and bias float32 only");
  TORCH_CHECK(kg.scalar_type() == vg.scalar_type() &&
                  (kg.scalar_type() == torch::kFloat32 || kg.scalar_type() == torch::kHalf),
              "decode_attention: the generated caches kg and vg both float32 or both float16");
  TORCH_CHECK(q.is_contiguous() && kp.is_contiguous() && vp.is_contiguous() && bias.is_contiguous() &&
                  group.is_contiguous(), "decode_attention: q, kp, vp, bias and group must be contiguous");
  TORCH_CHECK(kg.stride(3) == 1 && vg.stride(3) == 1, "decode_attention: the caches' last dim must be contiguous");
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kp.size(1), P = kp.size(2);
  const int64_t rep = Hq / Hkv;
  const int64_t* sl = cache_rows(slot, R, kg.size(0), vg.size(0), "decode_attention");
  TORCH_CHECK(D <= 256 && rep * Hkv == Hq && kg.size(1) == Hkv && kg.size(3) == D && len <= kg.size(2) &&
                  vg.size(2) >= len && vg.size(3) == D, "decode_attention: shapes do not match");
  auto out = torch::empty_like(q);
  if (kg.scalar_type() == torch::kHalf)
    attend<at::Half>(q, kp, vp, bias, kg, vg, group, len, sl, out);
  else
    attend<float>(q, kp, vp, bias, kg, vg, group, len, sl, out);
  return out;
}

// rotary embedding of one head (transformers' rotate_half convention): out = x cos + [-x2, x1] sin, times scale
template <typename T>
inline void rotate_head(const float* __restrict x, const float* __restrict cs, const float* __restrict sn, int64_t D,
                        float scale, T* __restrict out) {
  const int64_t half = D / 2;
#pragma omp simd
  for (int64_t d = 0; d < half; ++d) out[d] = static_cast<T>((x[d] * cs[d] - x[d + half] * sn[d]) * scale);
#pragma omp simd
  for (int64_t d = half; d < D; ++d) out[d] = static_cast<T>((x[d] * cs[d] + x[d - half] * sn[d]) * scale);
}

// the new token's rotated keys and its values into the caches' column (kg_new, vg_new), as the caches' type T
template <typename T>
void write_new(const float* kd, const float* vd, const float* cd, const float* sd, const int64_t* sl, int64_t R,
               int64_t Hkv, int64_t D, int64_t k_r, int64_t k_h, int64_t v_r, int64_t v_h, T* kg_new, T* vg_new,
               int64_t kg_r, int64_t kg_h, int64_t vg_r, int64_t vg_h) {
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t rc = cache_row(sl, r);
      for (int64_t h = 0; h < Hkv; ++h) {
        rotate_head(kd + r * k_r + h * k_h, cd + r * D, sd + r * D, D, 1.f, kg_new + rc * kg_r + h * kg_h);
        const float* __restrict src = vd + r * v_r + h * v_h;
        T* __restrict dst = vg_new + rc * vg_r + h * vg_h;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(src[d]);
      }
    }
  });
}

// One decode step's attention from the unrotated projections of the new token: q (R, Hq, D), k and v (R, Hkv, D)
// (views: any row and head strides, the last dim contiguous), cos and sin (R, D) the rotary rows at each row's
// position, scale the attention scale. The rotated k and the v are written into the caches at column len - 1
// (kg[:, :, len - 1], vg[:, :, len - 1]), then decode_attention of the rotated, scaled q: the rotary, the scaling
// and the two cache writes of the operator path (about a dozen torch operators a layer) in one call.
torch::Tensor rotary_decode_attention(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
                                      const torch::Tensor& cos, const torch::Tensor& sin, double scale,
                                      const torch::Tensor& kp, const torch::Tensor& vp, const torch::Tensor& bias,
                                      const torch::Tensor& kg, const torch::Tensor& vg, const torch::Tensor& group,
                                      int64_t len, const std::optional<torch::Tensor>& slot) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && k.scalar_type() == torch::kFloat32 &&
                  v.scalar_type() == torch::kFloat32 && cos.scalar_type() == torch::kFloat32 &&
                  sin.scalar_type() == torch::kFloat32, "rotary_decode_attention: float32 only");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(2) == 1 && v.stride(2) == 1 && cos.is_contiguous() && sin.is_contiguous(),
              "rotary_decode_attention: q, k, v need a contiguous last dim, cos and sin to be contiguous");
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2), Hkv = k.size(1);
  TORCH_CHECK(D % 2 == 0 && k.size(0) == R && v.size(0) == R && k.size(2) == D && v.sizes() == k.sizes() &&
                  cos.size(0) == R && cos.size(1) == D && sin.sizes() == cos.sizes() && len >= 1 &&
                  kg.size(1) == Hkv && kg.size(3) == D && kg.stride(3) == 1 &&
                  vg.size(1) == Hkv && vg.size(3) == D && vg.stride(3) == 1 &&
                  len <= kg.size(2) && len <= vg.size(2),
              "rotary_decode_attention: shapes do not match");
  TORCH_CHECK(kg.scalar_type() == vg.scalar_type() &&
                  (kg.scalar_type() == torch::kFloat32 || kg.scalar_type() == torch::kHalf),
              "rotary_decode_attention: the generated caches kg and vg both float32 or both float16");
  const int64_t* sl = cache_rows(slot, R, kg.size(0), vg.size(0), "rotary_decode_attention");
  auto qr = torch::empty({R, Hq, D}, q.options());
  const float* qd = q.data_ptr<float>();
  const float* kd = k.data_ptr<float>();
  const float* vd = v.data_ptr<float>();
  const float* cd = cos.data_ptr<float>();
  const float* sd = sin.data_ptr<float>();
  float* qrd = qr.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  // strides read once, outside the loop: the new token's column of each cache, and the projections' row/head steps
  const int64_t q_r = q.stride(0), q_h = q.stride(1), k_r = k.stride(0), k_h = k.stride(1);
  const int64_t v_r = v.stride(0), v_h = v.stride(1);
  const int64_t kg_r = kg.stride(0), kg_h = kg.stride(1), vg_r = vg.stride(0), vg_h = vg.stride(1);
  at::parallel_for(0, R, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t h = 0; h < Hq; ++h)
        rotate_head(qd + r * q_r + h * q_h, cd + r * D, sd + r * D, D, sc, qrd + (r * Hq + h) * D);
  });
  if (kg.scalar_type() == torch::kHalf && vg.scalar_type() == torch::kHalf)
    write_new(kd, vd, cd, sd, sl, R, Hkv, D, k_r, k_h, v_r, v_h, kg.data_ptr<at::Half>() + (len - 1) * kg.stride(2),
              vg.data_ptr<at::Half>() + (len - 1) * vg.stride(2), kg_r, kg_h, vg_r, vg_h);
  else  // float32 (decode_attention checks the types)
    write_new(kd, vd, cd, sd, sl, R, Hkv, D, k_r, k_h, v_r, v_h, kg.data_ptr<float>() + (len - 1) * kg.stride(2),
              vg.data_ptr<float>() + (len - 1) * vg.stride(2), kg_r, kg_h, vg_r, vg_h);
  return decode_attention(qr, kp, vp, bias, kg, vg, group, len, slot);
}

// silu(x) * y with silu(x) = x sigmoid(x), sigmoid from exp(-|x|) (never overflows)
inline float silu_times(float x, float y) {
  const float e = exp_nonpositive(-std::fabs(x));
  return x * (x >= 0.f ? 1.f : e) / (1.f + e) * y;
}

// The SwiGLU of the MLP on the fused gate/up projection: gate_up (N, 2I) -> silu(gate) * up (N, I), one pass over
// the projection instead of three operators (silu, the product, and the split's copies).
torch::Tensor silu_mul(const torch::Tensor& gate_up) {
  TORCH_CHECK(gate_up.scalar_type() == torch::kFloat32 && gate_up.is_contiguous() && gate_up.size(-1) % 2 == 0,
              "silu_mul: a contiguous float32 (..., 2I) tensor");
  const int64_t two_i = gate_up.size(-1), I = two_i / 2, N = gate_up.numel() / std::max<int64_t>(two_i, 1);
  auto shape = gate_up.sizes().vec();
  shape.back() = I;
  auto out = torch::empty(shape, gate_up.options());
  const float* g = gate_up.data_ptr<float>();
  float* o = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* __restrict gn = g + n * two_i;
      const float* __restrict un = gn + I;
      float* __restrict on = o + n * I;
#pragma omp simd
      for (int64_t i = 0; i < I; ++i) on[i] = silu_times(gn[i], un[i]);
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "fused decode attention over a shared prompt and per-row caches",
        py::arg("q"), py::arg("kp"), py::arg("vp"), py::arg("bias"), py::arg("kg"), py::arg("vg"), py::arg("group"),
        py::arg("len"), py::arg("slot") = py::none());
  m.def("rotary_decode_attention", &rotary_decode_attention,
        "rotary, scaling and cache writes of the new token, then decode_attention", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("cos"), py::arg("sin"), py::arg("scale"), py::arg("kp"), py::arg("vp"),
        py::arg("bias"), py::arg("kg"), py::arg("vg"), py::arg("group"), py::arg("len"), py::arg("slot") = py::none());
  m.def("silu_mul", &silu_mul, "silu(gate) * up of a fused gate/up projection");
}
