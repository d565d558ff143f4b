// Vector loops shared by the native CPU kernels. at::vec::Vectorized<float> is 16 lanes with
// AVX-512, 8 with AVX2 (the build picks the host's; see lavin_fast/native.py).
//
// The adapter's weights are small ([n, d] with n <= 2 r/g + 2 rows) but one row of x meets all
// of them, so they are laid out as *panels*: for each chunk of kW columns, the n rows' kW values
// side by side (panel[(v n + u) kW + lane]). One pointer then walks every weight a column chunk
// needs with constant offsets, and a tile of the panel (kTileChunks chunks) stays in L1 while a
// block of rows streams past it. The loops keep kN accumulators (or coefficients) in registers:
// kN <= kMaxRun, so that with AVX2's 16 registers nothing goes through the stack (perf showed a
// stack round trip per step made the first version latency-bound).
#pragma once

#include <ATen/ATen.h>
#include <ATen/cpu/vec/vec.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

// Streaming stores (below) exist where the build targets x86 vectors.
#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#define LAVIN_FAST_CAN_STREAM 1
#else
#define LAVIN_FAST_CAN_STREAM 0
#endif

namespace lavin_fast_native {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
constexpr int kMaxRun = 12;            // accumulators per loop: 12 + 2 temporaries <= 16 AVX2 registers
constexpr int64_t kTileChunks = 32;    // column chunks per tile: 32 x 8 x 4 B x n rows <= 12 KB of panel

// Outputs of at least kStreamBytes are written with streaming (non-temporal) stores: a normal
// store first reads the line it writes (read-for-ownership), so y costs 2 M d e bytes of RAM
// traffic instead of M d e, and an output that large would not stay in the L3 for the next op
// anyway (8 MB: a quarter of the 32 MB L3 of the machine it was measured on). Measured with the
// row prefetch below, against the kernels without both, in one process (2026-12-02, 2 threads,
// fp32): B = 8, N = 512, d = 1024 forward 1.97 -> 1.03 ms, backward 3.41 -> 2.21 ms; d = 4096,
// M = 2048 forward 3.66 -> 1.99 ms, backward 6.59 -> 4.56 ms. Each change alone gave about half.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

// Whether fp32 rows [rows, cols] at `out` take streaming stores: large enough, and every store
// the kernels make starts a whole 64-byte line (the instruction needs the vector's alignment, and
// a partial line would be written in pieces): `out`, cols and `offset_step` (the column offsets
// the stores start at, e.g. a group's width) multiples of a line.
constexpr int64_t kLineFloats = 64 / sizeof(float);
inline bool stream_rows(const float* out, int64_t rows, int64_t cols, int64_t offset_step) {
  return LAVIN_FAST_CAN_STREAM && rows * cols * static_cast<int64_t>(sizeof(float)) >= kStreamBytes &&
         cols % kLineFloats == 0 && offset_step % kLineFloats == 0 && reinterpret_cast<std::uintptr_t>(out) % 64 == 0;
}

inline void store(const Vec& v, float* out, bool stream) {
#if defined(CPU_CAPABILITY_AVX512)
  if (stream) return _mm512_stream_ps(out, v);
#elif defined(CPU_CAPABILITY_AVX2)
  if (stream) return _mm256_stream_ps(out, v);
#endif
  v.store(out);
}

// Streaming stores are weakly ordered: each thread fences them before the parallel region ends.
inline void fence_streams(bool stream) {
#if LAVIN_FAST_CAN_STREAM
  if (stream) _mm_sfence();
#endif
}

// Asks for `bytes` at p (into all cache levels) ahead of use: the next block of rows is prefetched
// while this one computes, so its RAM latency overlaps arithmetic (the hardware prefetcher alone
// left the kernels waiting: the gain above).
inline void prefetch(const void* p, int64_t bytes) {
  const char* c = static_cast<const char*>(p);
  const int64_t skew = static_cast<int64_t>(reinterpret_cast<std::uintptr_t>(c) % 64);   // every line, the last too
  for (int64_t i = -skew; i < bytes; i += 64) __builtin_prefetch(c + std::max<int64_t>(i, 0), 0, 3);
}

// acc[u] += a[v kW + lane] * panel[(v stride + u) kW + lane] for v < chunks, u < kN, per lane.
template <int kN>
inline void panel_dots(const float* a, const float* panel, int64_t stride, int64_t chunks, Vec* acc) {
  Vec s[kN];
  for (int u = 0; u < kN; ++u) s[u] = acc[u];
  for (int64_t v = 0; v < chunks; ++v) {
    const Vec va = Vec::loadu(a + v * kW);
    const float* p = panel + v * stride * kW;
    for (int u = 0; u < kN; ++u) s[u] = at::vec::fmadd(va, Vec::loadu(p + u * kW), s[u]);
  }
  for (int u = 0; u < kN; ++u) acc[u] = s[u];
}

// out[q][v kW + lane] = base[q][...] + sum_{u < kN} coef[q coef_stride + u] panel[(v stride + u) kW + lane]
// for q < kR rows (rows kR apart by base_stride / out_stride; out may be base), two chunks per step:
// 2 kR independent FMA chains. One row's chain of kN dependent FMAs ran at the FMA latency (perf:
// ~50 cycles per chunk); Zen's 5-cycle latency at two FMAs per cycle wants about ten in flight.
// `stream`: streaming stores (stream_rows).
template <int kN, int kR>
inline void panel_combine(const float* base, int64_t base_stride, const float* panel, int64_t stride,
                          const float* coef, int64_t coef_stride, int64_t chunks, float* out, int64_t out_stride,
                          bool stream = false) {
  int64_t v = 0;
  for (; v + 2 <= chunks; v += 2) {
    Vec acc[kR][2];
    for (int q = 0; q < kR; ++q) {
      acc[q][0] = Vec::loadu(base + q * base_stride + v * kW);
      acc[q][1] = Vec::loadu(base + q * base_stride + (v + 1) * kW);
    }
    const float* p0 = panel + v * stride * kW;
    const float* p1 = p0 + stride * kW;
    for (int u = 0; u < kN; ++u) {
      const Vec w0 = Vec::loadu(p0 + u * kW), w1 = Vec::loadu(p1 + u * kW);
      for (int q = 0; q < kR; ++q) {
        const Vec k(coef[q * coef_stride + u]);
        acc[q][0] = at::vec::fmadd(k, w0, acc[q][0]);
        acc[q][1] = at::vec::fmadd(k, w1, acc[q][1]);
      }
    }
    for (int q = 0; q < kR; ++q) {
      store(acc[q][0], out + q * out_stride + v * kW, stream);
      store(acc[q][1], out + q * out_stride + (v + 1) * kW, stream);
    }
  }
  for (; v < chunks; ++v) {
    Vec acc[kR];
    for (int q = 0; q < kR; ++q) acc[q] = Vec::loadu(base + q * base_stride + v * kW);
    const float* p = panel + v * stride * kW;
    for (int u = 0; u < kN; ++u) {
      const Vec w = Vec::loadu(p + u * kW);
      for (int q = 0; q < kR; ++q) acc[q] = at::vec::fmadd(Vec(coef[q * coef_stride + u]), w, acc[q]);
    }
    for (int q = 0; q < kR; ++q) store(acc[q], out + q * out_stride + v * kW, stream);
  }
}

// panel_combine over any number of rows: four at a time, then one at a time.
template <int kN>
inline void panel_combine_rows(int64_t rows, const float* base, int64_t base_stride, const float* panel,
                               int64_t stride, const float* coef, int64_t coef_stride, int64_t chunks, float* out,
                               int64_t out_stride, bool stream = false) {
  int64_t q = 0;
  for (; q + 4 <= rows; q += 4) {
    panel_combine<kN, 4>(base + q * base_stride, base_stride, panel, stride, coef + q * coef_stride, coef_stride,
                         chunks, out + q * out_stride, out_stride, stream);
  }
  for (; q < rows; ++q) {
    panel_combine<kN, 1>(base + q * base_stride, base_stride, panel, stride, coef + q * coef_stride, coef_stride,
                         chunks, out + q * out_stride, out_stride, stream);
  }
}

// panel[(v stride + u) kW + lane] += sum_{q < rows} coef[q coef_stride + u] src[q src_stride + v kW + lane]:
// a block of rows summed into kN panel rows, each accumulator loaded and stored once per block.
template <int kN>
inline void panel_accumulate(const float* src, int64_t src_stride, int64_t rows, const float* coef,
                             int64_t coef_stride, int64_t chunks, float* panel, int64_t stride) {
  for (int64_t v = 0; v < chunks; ++v) {
    float* p = panel + v * stride * kW;
    Vec acc[kN];
    for (int u = 0; u < kN; ++u) acc[u] = Vec::loadu(p + u * kW);
    for (int64_t q = 0; q < rows; ++q) {
      const Vec x = Vec::loadu(src + q * src_stride + v * kW);
      const float* k = coef + q * coef_stride;
      for (int u = 0; u < kN; ++u) acc[u] = at::vec::fmadd(Vec(k[u]), x, acc[u]);
    }
    for (int u = 0; u < kN; ++u) acc[u].store(p + u * kW);
  }
}

// Calls f(std::integral_constant<int, K>{}, u0) for runs [u0, u0 + K) covering [0, n), K <= kMaxRun.
template <typename F>
inline void in_runs(int64_t n, F&& f) {
  for (int64_t u0 = 0; u0 < n; u0 += kMaxRun) {
    switch (std::min<int64_t>(kMaxRun, n - u0)) {
#define LAVIN_FAST_RUN(k) \
      case k: f(std::integral_constant<int, k>{}, u0); break;
      LAVIN_FAST_RUN(12) LAVIN_FAST_RUN(11) LAVIN_FAST_RUN(10) LAVIN_FAST_RUN(9) LAVIN_FAST_RUN(8)
      LAVIN_FAST_RUN(7) LAVIN_FAST_RUN(6) LAVIN_FAST_RUN(5) LAVIN_FAST_RUN(4) LAVIN_FAST_RUN(3)
      LAVIN_FAST_RUN(2) LAVIN_FAST_RUN(1)
#undef LAVIN_FAST_RUN
    }
  }
}

// Sum of a vector's lanes, first to last (the same order for any thread count).
inline float lane_sum(const Vec& v) {
  float lanes[kW];
  v.store(lanes);
  float sum = 0.0f;
  for (int64_t i = 0; i < kW; ++i) sum += lanes[i];
  return sum;
}

// w [n, cols] (fp32, row-major) as panels over columns [c0, c0 + chunks kW): out [chunks, n, kW].
inline void pack_panels(const float* w, int64_t n, int64_t cols, int64_t c0, int64_t chunks, float* out) {
  for (int64_t v = 0; v < chunks; ++v) {
    for (int64_t u = 0; u < n; ++u) Vec::loadu(w + u * cols + c0 + v * kW).store(out + (v * n + u) * kW);
  }
}

// Rows [m0, m0 + rows) of a contiguous [M, d] tensor as fp32: the rows themselves for fp32, else
// converted into `scratch` (rows d floats).
template <typename scalar_t>
inline const float* rows_as_float(const scalar_t* base, int64_t m0, int64_t rows, int64_t d, float* scratch) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return base + m0 * d;
  } else {
    at::vec::convert(base + m0 * d, scratch, rows * d);
    return scratch;
  }
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
