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

// out[u] = sum_c a[c] b[u * b_stride + c] for u < n <= 4: a read once for four dot products,
// four independent accumulators (no FMA latency chain). Same order for any thread count.
inline void dot4(const float* a, const float* b, int64_t b_stride, int64_t n_dots, int64_t n, float* out) {
  Vec acc[4] = {Vec(0.0f), Vec(0.0f), Vec(0.0f), Vec(0.0f)};
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec va = Vec::loadu(a + c);
    for (int64_t u = 0; u < 4; ++u) {
      if (u < n_dots) acc[u] = at::vec::fmadd(va, Vec::loadu(b + u * b_stride + c), acc[u]);
    }
  }
  for (int64_t u = 0; u < n_dots; ++u) {
    float lanes[Vec::size()];
    acc[u].store(lanes);
    float sum = 0.0f;
    for (int i = 0; i < Vec::size(); ++i) sum += lanes[i];
    for (int64_t k = c; k < n; ++k) sum += a[k] * b[u * b_stride + k];
    out[u] = sum;
  }
}

// out[u * out_stride + c] += sum_q coef[q * coef_stride + u] src[q][c] for u < n_out <= 8,
// c in [c0, c1): a block of rows summed into up to eight outputs with the accumulators in
// registers (one read-modify-write of each output per block, not per row).
inline void accumulate_rows(int64_t rows, const float* const* src, const float* coef, int64_t coef_stride,
                            int64_t n_out, float* out, int64_t out_stride, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + Vec::size() <= c1; c += Vec::size()) {
    Vec acc[8];
    for (int64_t u = 0; u < 8; ++u) {
      if (u < n_out) acc[u] = Vec::loadu(out + u * out_stride + c);
    }
    for (int64_t q = 0; q < rows; ++q) {
      const Vec v = Vec::loadu(src[q] + c);
      const float* k = coef + q * coef_stride;
      for (int64_t u = 0; u < 8; ++u) {
        if (u < n_out) acc[u] = at::vec::fmadd(Vec(k[u]), v, acc[u]);
      }
    }
    for (int64_t u = 0; u < 8; ++u) {
      if (u < n_out) acc[u].store(out + u * out_stride + c);
    }
  }
  for (; c < c1; ++c) {
    for (int64_t u = 0; u < n_out; ++u) {
      float acc = out[u * out_stride + c];
      for (int64_t q = 0; q < rows; ++q) acc += coef[q * coef_stride + u] * src[q][c];
      out[u * out_stride + c] = acc;
    }
  }
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
