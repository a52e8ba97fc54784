// Vectorisable exponentials shared by the project's C++ kernels (rollout/decode_attention.cpp,
// policy/layer_kernels.cpp): plain loops over them compile to AVX2 where the machine has it.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace tokenmdp {

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

// sigmoid(x) from exp(-|x|), which never overflows
#pragma omp declare simd notinbranch
inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  return (x >= 0.f ? 1.f : e) / (1.f + e);
}

}  // namespace tokenmdp
