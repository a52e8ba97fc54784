// Fused forward and backward kernels of a Llama-family decoder layer's elementwise parts, for the update's
// teacher-forced passes (tokenmdp.policy.fused_layers): RMSNorm, the rotary embedding and the SwiGLU product.
// Each replaces a chain of torch operators and their autograd nodes by one pass over the tensor. Float32,
// contiguous; rows are split over at::parallel_for's threads, sums over rows (the norm weight's gradient) go
// through per-chunk buffers added in chunk order, so a result depends on the thread count only, not on timing.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "fast_exp.h"

namespace {

using tokenmdp::sigmoid;

void check(const torch::Tensor& t, const char* what) {
  TORCH_CHECK(t.scalar_type() == torch::kFloat32 && t.is_contiguous(), what, ": a contiguous float32 tensor");
}

// Row chunks for a deterministic reduction: at most `threads` chunks of whole rows.
std::vector<int64_t> chunk_bounds(int64_t n) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (n + 63) / 64));
  std::vector<int64_t> b(parts + 1);
  for (int64_t i = 0; i <= parts; ++i) b[i] = n * i / parts;
  return b;
}

}  // namespace

// y = w * (x * r) with r = 1 / sqrt(mean(x^2) + eps) over the last dimension; returns (y, r (N,))
std::vector<torch::Tensor> rms_norm_forward(const torch::Tensor& x, const torch::Tensor& w, double eps) {
  check(x, "rms_norm_forward x");
  check(w, "rms_norm_forward w");
  const int64_t H = x.size(-1), N = x.numel() / std::max<int64_t>(H, 1);
  TORCH_CHECK(w.numel() == H, "rms_norm_forward: weight of ", w.numel(), " for rows of ", H);
  auto y = torch::empty_like(x);
  auto r = torch::empty({N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  float* rp = r.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, N, 32, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const float* __restrict xn = xp + n * H;
      float* __restrict yn = yp + n * H;
      float s = 0.f;
#pragma omp simd reduction(+ : s)
      for (int64_t j = 0; j < H; ++j) s += xn[j] * xn[j];
      const float rn = 1.f / std::sqrt(s / static_cast<float>(H) + e);
      rp[n] = rn;
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) yn[j] = wp[j] * (xn[j] * rn);
    }
  });
  return {y, r};
}

// Gradients of rms_norm_forward: dx = r (g w) - x r^3 mean(g w x), dw = sum over rows of g x r
std::vector<torch::Tensor> rms_norm_backward(const torch::Tensor& g, const torch::Tensor& x, const torch::Tensor& w,
                                             const torch::Tensor& r) {
  check(g, "rms_norm_backward g");
  check(x, "rms_norm_backward x");
  const int64_t H = x.size(-1), N = x.numel() / std::max<int64_t>(H, 1);
  auto dx = torch::empty_like(x);
  const auto bounds = chunk_bounds(N);
  const int64_t parts = static_cast<int64_t>(bounds.size()) - 1;
  auto partial = torch::zeros({parts, H}, x.options());
  const float* gp = g.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* rp = r.data_ptr<float>();
  float* dxp = dx.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t pb, int64_t pe) {
    for (int64_t c = pb; c < pe; ++c) {
      float* __restrict dw = pp + c * H;
      for (int64_t n = bounds[c]; n < bounds[c + 1]; ++n) {
        const float* __restrict gn = gp + n * H;
        const float* __restrict xn = xp + n * H;
        float* __restrict dn = dxp + n * H;
        const float rn = rp[n];
        float dot = 0.f;
#pragma omp simd reduction(+ : dot)
        for (int64_t j = 0; j < H; ++j) dot += gn[j] * wp[j] * xn[j];
        const float c3 = rn * rn * rn * dot / static_cast<float>(H);
#pragma omp simd
        for (int64_t j = 0; j < H; ++j) {
          dn[j] = rn * gn[j] * wp[j] - c3 * xn[j];
          dw[j] += gn[j] * xn[j] * rn;
        }
      }
    }
  });
  return {dx, partial.sum(0)};
}

// The rotary embedding in the rotate-half convention on x (B, L, heads, D) with cos, sin (B, L, D):
// y = x cos + rotate_half(x) sin, rotate_half(x) = [-x2, x1]; with `inverse`, sin negated (the transpose of the
// rotation: the backward pass).
torch::Tensor rotary(const torch::Tensor& x, const torch::Tensor& cos, const torch::Tensor& sin, bool inverse) {
  check(x, "rotary x");
  check(cos, "rotary cos");
  check(sin, "rotary sin");
  TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && cos.size(0) == x.size(0) && cos.size(1) == x.size(1) &&
                  cos.size(2) == x.size(3) && sin.sizes() == cos.sizes() && x.size(3) % 2 == 0,
              "rotary: x (B, L, heads, D) with cos and sin (B, L, D)");
  const int64_t BL = x.size(0) * x.size(1), Hn = x.size(2), D = x.size(3), half = D / 2;
  auto y = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float sign = inverse ? -1.f : 1.f;
  at::parallel_for(0, BL, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* __restrict c = cp + t * D;
      const float* __restrict s = sp + t * D;
      for (int64_t h = 0; h < Hn; ++h) {
        const float* __restrict xh = xp + (t * Hn + h) * D;
        float* __restrict yh = yp + (t * Hn + h) * D;
#pragma omp simd
        for (int64_t j = 0; j < half; ++j) yh[j] = xh[j] * c[j] - xh[j + half] * (sign * s[j]);
#pragma omp simd
        for (int64_t j = half; j < D; ++j) yh[j] = xh[j] * c[j] + xh[j - half] * (sign * s[j]);
      }
    }
  });
  return y;
}

// silu(gate) * up, elementwise (same shapes)
torch::Tensor swiglu_forward(const torch::Tensor& gate, const torch::Tensor& up) {
  check(gate, "swiglu gate");
  check(up, "swiglu up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu: gate and up of one shape");
  auto y = torch::empty_like(gate);
  const float* gp = gate.data_ptr<float>();
  const float* up_ = up.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, gate.numel(), 4096, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) yp[i] = gp[i] * sigmoid(gp[i]) * up_[i];
  });
  return y;
}

// Gradients of swiglu_forward: d gate = g up s (1 + gate (1 - s)), d up = g gate s, s = sigmoid(gate)
std::vector<torch::Tensor> swiglu_backward(const torch::Tensor& g, const torch::Tensor& gate, const torch::Tensor& up) {
  check(g, "swiglu_backward g");
  auto dg = torch::empty_like(gate);
  auto du = torch::empty_like(up);
  const float* gr = g.data_ptr<float>();
  const float* gp = gate.data_ptr<float>();
  const float* upp = up.data_ptr<float>();
  float* dgp = dg.data_ptr<float>();
  float* dup = du.data_ptr<float>();
  at::parallel_for(0, gate.numel(), 4096, [&](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float s = sigmoid(gp[i]);
      dup[i] = gr[i] * gp[i] * s;
      dgp[i] = gr[i] * upp[i] * s * (1.f + gp[i] * (1.f - s));
    }
  });
  return {dg, du};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward, "RMSNorm: (y, 1 / rms)");
  m.def("rms_norm_backward", &rms_norm_backward, "RMSNorm's gradients: (dx, dw)");
  m.def("rotary", &rotary, "rotary embedding, rotate-half convention (inverse: the backward pass)");
  m.def("swiglu_forward", &swiglu_forward, "silu(gate) * up");
  m.def("swiglu_backward", &swiglu_backward, "swiglu's gradients: (d gate, d up)");
}
