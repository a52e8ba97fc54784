// One decode step of attention for the `fast` engine, fused: each row's query heads against its group's shared
// prompt keys/values and its own generated keys/values, in one pass that reads every key and value once.
//
// q      (R, Hq, D)          queries of the live rows, already multiplied by the attention scale
// kp    (G, Hkv, D, P)      the prompt's keys, transposed, once per group (contiguous)
// vp     (G, Hkv, P, D)      the prompt's values (contiguous)
// bias   (G, P)              0 for a prompt column, -inf for left padding
// kg    (R, Hkv, D, T)      the generated keys of the live rows, transposed; columns [0, len) are used
// vg     (R, Hkv, T, D)      the generated values; rows [0, len) are used
// group  (R,) int64          the group (prompt) of each live row
// out    (R, Hq, D)          softmax([q kp^T + bias, q kg^T]) [vp; vg]
//
// Keys are stored transposed so that a query's scores are sums of contiguous rows (q[d] * K^T[d, :]), which the
// compiler vectorises over the keys with no horizontal reductions; the exponentials go through the vector math
// library (-fno-math-errno). Float32 only; D up to 256.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp(x) for x <= 0 (a max-shifted score), written so that the compiler vectorises it: the Cephes expf
// polynomial (about 1 ulp), 2^n by building the float's exponent bits; exactly 0 below -87.3 (and for -inf)
#pragma omp declare simd notinbranch
inline float exp_nonpositive(float x) {
  const float y = std::max(x, -87.3f);
  const float n = std::floor(y * 1.44269504088896341f + 0.5f);
  const float r = y - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return x < -87.3f ? 0.f : p * scale;
}

}  // namespace

torch::Tensor decode_attention(const torch::Tensor& q, const torch::Tensor& kp, const torch::Tensor& vp,
                               const torch::Tensor& bias, const torch::Tensor& kg, const torch::Tensor& vg,
                               const torch::Tensor& group, int64_t len) {
  TORCH_CHECK(q.scalar_type() == torch::kFloat32, "decode_attention: float32 only");
  TORCH_CHECK(q.is_contiguous() && kp.is_contiguous() && vp.is_contiguous() && bias.is_contiguous() &&
                  group.is_contiguous(), "decode_attention: q, kp, vp, bias and group must be contiguous");
  TORCH_CHECK(kg.stride(3) == 1 && vg.stride(3) == 1, "decode_attention: the caches' last dim must be contiguous");
  const int64_t R = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = kp.size(1), P = kp.size(2);
  const int64_t rep = Hq / Hkv;
  TORCH_CHECK(D <= 256 && rep * Hkv == Hq && kg.size(0) == R && kg.size(1) == Hkv && kg.size(3) == D &&
                  len <= kg.size(2) && vg.size(2) >= len && vg.size(3) == D, "decode_attention: shapes do not match");
  auto out = torch::empty_like(q);
  const float* qd = q.data_ptr<float>();
  const float* kpd = kp.data_ptr<float>();
  const float* vpd = vp.data_ptr<float>();
  const float* bd = bias.data_ptr<float>();
  const float* kgd = kg.data_ptr<float>();
  const float* vgd = vg.data_ptr<float>();
  const int64_t* gd = group.data_ptr<int64_t>();
  float* od = out.data_ptr<float>();
  const int64_t kg_r = kg.stride(0), kg_h = kg.stride(1), kg_t = kg.stride(2);
  const int64_t vg_r = vg.stride(0), vg_h = vg.stride(1), vg_t = vg.stride(2);
  const int64_t cols = P + len;
  at::parallel_for(0, R * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(cols);
    float* __restrict s = buf.data();
    float acc[256];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / Hkv, h = item % Hkv, g = gd[r];
      const float* kp_h = kpd + (g * Hkv + h) * P * D;
      const float* vp_h = vpd + (g * Hkv + h) * P * D;
      const float* b = bd + g * P;
      const float* kg_h0 = kgd + r * kg_r + h * kg_h;
      const float* vg_h0 = vgd + r * vg_r + h * vg_h;
      for (int64_t j = 0; j < rep; ++j) {
        const float* qj = qd + (r * Hq + h * rep + j) * D;
        // scores: s = q K^T, key by key
        for (int64_t c = 0; c < P; ++c) {
          const float* __restrict k = kp_h + c * D;
          float acc_s = b[c];
#pragma omp simd reduction(+ : acc_s)
          for (int64_t d = 0; d < D; ++d) acc_s += qj[d] * k[d];
          s[c] = acc_s;
        }
        for (int64_t c = 0; c < len; ++c) {
          const float* __restrict k = kg_h0 + c * kg_t;
          float acc_s = 0.f;
#pragma omp simd reduction(+ : acc_s)
          for (int64_t d = 0; d < D; ++d) acc_s += qj[d] * k[d];
          s[P + c] = acc_s;
        }
        float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
        for (int64_t c = 0; c < cols; ++c) m = std::max(m, s[c]);
        float total = 0.f;
#pragma omp simd reduction(+ : total)
        for (int64_t c = 0; c < cols; ++c) {
          s[c] = exp_nonpositive(s[c] - m);
          total += s[c];
        }
        const float inv = 1.f / total;
        // out = softmax(s) V, value row by value row
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) acc[d] = 0.f;
        for (int64_t c = 0; c < P; ++c) {
          const float w = s[c];
          const float* __restrict v = vp_h + c * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += w * v[d];
        }
        for (int64_t c = 0; c < len; ++c) {
          const float w = s[P + c];
          const float* __restrict v = vg_h0 + c * vg_t;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) acc[d] += w * v[d];
        }
        float* o = od + (r * Hq + h * rep + j) * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv;
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &decode_attention, "fused decode attention over a shared prompt and per-row caches");
}
