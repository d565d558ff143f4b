// Row helpers shared by the native CPU kernels: fp32 views of rows, and the three vector loops
// (dot product, axpy, scaled copy) everything else is written with. at::vec::Vectorized<float>
// is 16 lanes with AVX-512, 8 with AVX2 (the build picks the host's; see lavin_fast/native.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <vector>

namespace lavin_fast_native {

using Vec = at::vec::Vectorized<float>;

// sum_c a[c] b[c], lanes summed last (the same order for any thread count).
inline float dot(const float* a, const float* b, int64_t n) {
  Vec acc(0.0f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    acc = at::vec::fmadd(Vec::loadu(a + c), Vec::loadu(b + c), acc);
  }
  float lanes[Vec::size()];
  acc.store(lanes);
  float sum = 0.0f;
  for (int i = 0; i < Vec::size(); ++i) sum += lanes[i];
  for (; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

// y[c] += alpha x[c]
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const Vec va(alpha);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    at::vec::fmadd(va, Vec::loadu(x + c), Vec::loadu(y + c)).store(y + c);
  }
  for (; c < n; ++c) y[c] += alpha * x[c];
}

// Row m of a [B, N, d] tensor with unit inner stride, as an fp32 pointer: the row itself for
// fp32, else converted into `scratch` (d floats).
template <typename scalar_t>
inline const float* row_as_float(const scalar_t* base, int64_t offset, int64_t d, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return base + offset;
  } else {
    at::vec::convert(base + offset, scratch, d);
    return scratch;
  }
}

// Offset of row m = b N + n in a [B, N, d] tensor.
inline int64_t row_offset(const at::Tensor& t, int64_t m, int64_t tokens) {
  return (m / tokens) * t.stride(0) + (m % tokens) * t.stride(1);
}

// A [B, N, d] activation the kernels can walk row by row: unit inner stride (a copy otherwise).
inline at::Tensor unit_inner_stride(const at::Tensor& t) {
  return t.size(2) <= 1 || t.stride(2) == 1 ? t : t.contiguous();
}

// Calls f(scalar_t{}) for the dtypes the kernels take (fp32, bf16, fp16), else a clear error.
template <typename F>
void dispatch_kernel_dtype(at::ScalarType dtype, const char* op, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, op, ": x has dtype ", dtype, "; the kernel takes float32, bfloat16, float16");
  }
}

}  // namespace lavin_fast_native
