// Row helpers shared by the native CPU kernels: fp32 views of rows, and the three vector loops
// (dot products and sums of scaled rows) everything else is written with. at::vec::Vectorized<float>
// is 16 lanes with AVX-512, 8 with AVX2 (the build picks the host's; see lavin_fast/native.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
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

// out[u] = sum_c a[c] b[u * b_stride + c] for u < kDots: a read once for kDots dot products,
// kDots independent accumulators. kDots is a compile-time count so that the accumulators stay in
// registers (with a runtime count they went through the stack every step: a store-to-load
// chain that made the forward's down-projection latency-bound, perf annotate). Same order for
// any thread count.
template <int kDots>
inline void dots(const float* a, const float* b, int64_t b_stride, int64_t n, float* out) {
  Vec acc[kDots];
  for (int u = 0; u < kDots; ++u) acc[u] = Vec(0.0f);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    const Vec va = Vec::loadu(a + c);
    for (int u = 0; u < kDots; ++u) acc[u] = at::vec::fmadd(va, Vec::loadu(b + u * b_stride + c), acc[u]);
  }
  for (int u = 0; u < kDots; ++u) {
    float lanes[Vec::size()];
    acc[u].store(lanes);
    float sum = 0.0f;
    for (int i = 0; i < Vec::size(); ++i) sum += lanes[i];
    for (int64_t k = c; k < n; ++k) sum += a[k] * b[u * b_stride + k];
    out[u] = sum;
  }
}

// dots<n_dots> for n_dots <= 4.
inline void dot4(const float* a, const float* b, int64_t b_stride, int64_t n_dots, int64_t n, float* out) {
  switch (n_dots) {
    case 4: return dots<4>(a, b, b_stride, n, out);
    case 3: return dots<3>(a, b, b_stride, n, out);
    case 2: return dots<2>(a, b, b_stride, n, out);
    default: return dots<1>(a, b, b_stride, n, out);
  }
}

// out[u * out_stride + c] += sum_q coef[q * coef_stride + u] src[q][c] for u < kOut, c in
// [c0, c1): a block of rows summed into kOut outputs with the accumulators in registers (one
// read-modify-write of each output per block, not per row).
template <int kOut>
inline void accumulate_rows_n(int64_t rows, const float* const* src, const float* coef, int64_t coef_stride,
                              float* out, int64_t out_stride, int64_t c0, int64_t c1) {
  int64_t c = c0;
  for (; c + Vec::size() <= c1; c += Vec::size()) {
    Vec acc[kOut];
    for (int u = 0; u < kOut; ++u) acc[u] = Vec::loadu(out + u * out_stride + c);
    for (int64_t q = 0; q < rows; ++q) {
      const Vec v = Vec::loadu(src[q] + c);
      const float* k = coef + q * coef_stride;
      for (int u = 0; u < kOut; ++u) acc[u] = at::vec::fmadd(Vec(k[u]), v, acc[u]);
    }
    for (int u = 0; u < kOut; ++u) acc[u].store(out + u * out_stride + c);
  }
  for (; c < c1; ++c) {
    for (int u = 0; u < kOut; ++u) {
      float acc = out[u * out_stride + c];
      for (int64_t q = 0; q < rows; ++q) acc += coef[q * coef_stride + u] * src[q][c];
      out[u * out_stride + c] = acc;
    }
  }
}

// accumulate_rows_n<n_out> for n_out <= 8.
inline void accumulate_rows(int64_t rows, const float* const* src, const float* coef, int64_t coef_stride,
                            int64_t n_out, float* out, int64_t out_stride, int64_t c0, int64_t c1) {
  switch (n_out) {
#define LAVIN_FAST_CASE(n) \
    case n: return accumulate_rows_n<n>(rows, src, coef, coef_stride, out, out_stride, c0, c1);
    LAVIN_FAST_CASE(8) LAVIN_FAST_CASE(7) LAVIN_FAST_CASE(6) LAVIN_FAST_CASE(5)
    LAVIN_FAST_CASE(4) LAVIN_FAST_CASE(3) LAVIN_FAST_CASE(2) LAVIN_FAST_CASE(1)
#undef LAVIN_FAST_CASE
    default: return;
  }
}

// out[c] = base[c] + sum_{q < kRows} coef[q] src[q][c], c < n: one pass over out for kRows
// scaled rows (instead of kRows read-modify-writes of it, one per scaled row).
template <int kRows>
inline void add_rows_n(const float* base, const float* const* src, const float* coef, float* out, int64_t n) {
  Vec k[kRows];
  for (int q = 0; q < kRows; ++q) k[q] = Vec(coef[q]);
  int64_t c = 0;
  for (; c + Vec::size() <= n; c += Vec::size()) {
    Vec acc = Vec::loadu(base + c);
    for (int q = 0; q < kRows; ++q) acc = at::vec::fmadd(k[q], Vec::loadu(src[q] + c), acc);
    acc.store(out + c);
  }
  for (; c < n; ++c) {
    float acc = base[c];
    for (int q = 0; q < kRows; ++q) acc += coef[q] * src[q][c];
    out[c] = acc;
  }
}

// out[c] = base[c] + sum_{q < rows} coef[q] src[q][c] for any number of rows, eight per pass
// (out may be base).
inline void add_rows(const float* base, const float* const* src, const float* coef, int64_t rows, float* out,
                     int64_t n) {
  if (rows == 0 && out != base) std::copy(base, base + n, out);
  for (int64_t q = 0; q < rows; q += 8) {
    const float* from = q == 0 ? base : out;
    switch (std::min<int64_t>(8, rows - q)) {
#define LAVIN_FAST_CASE(k) \
      case k: add_rows_n<k>(from, src + q, coef + q, out, n); break;
      LAVIN_FAST_CASE(8) LAVIN_FAST_CASE(7) LAVIN_FAST_CASE(6) LAVIN_FAST_CASE(5)
      LAVIN_FAST_CASE(4) LAVIN_FAST_CASE(3) LAVIN_FAST_CASE(2) LAVIN_FAST_CASE(1)
#undef LAVIN_FAST_CASE
    }
  }
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
