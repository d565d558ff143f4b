// The MM-Adapter on CPU tensors: the forward and backward of `lavin_fast::mm_adapter_fwd/bwd`
// (kernels/mm_adapter.py holds the schema, the Triton kernels and the math in full).
//
// Rows m = (b, n) of x flattened, M = B N; t(m) = routing_index[b, n], or b without an index:
//
//     h   = (x A^T + a) * mask                     [M, r]   mask: 0 or 1/(1-p), Philox(seed, m)
//     y   = x + s (w_0(t) (h U_0^T + u_0) + w_1(t) (h U_1^T + u_1))
//
// U_0, U_1 (conv_B, conv_D) are grouped [d, r/g]: column c of group k = c / (d/g) reads hidden
// units k r/g + j, j < r/g. Backward, with hd = h * mask saved by the forward:
//
//     dhw_e = s dy U_e;   dw_e = hd . dhw_e + s dy . u_e  (summed into routing row t(m))
//     dh    = (w_0 dhw_0 + w_1 dhw_1) * mask
//     dx    = dy + dh A;   dA = dh^T x;   da = sum_m dh
//     dU_e  = s (w_e hd)^T dy (grouped entries only);   du_e = s sum_m w_e dy
//
// Layout: the weights become panels (vec_rows.h): A as [d/W, r, W], and per group k the rows
// U_0^T, U_1^T, u_0, u_1 over the group's columns as one [dg/W, n, W] panel, n = 2 r/g + 2
// (columns past the last whole chunk of W, for odd d, run scalar on the plain weights). A block
// of kRows rows streams past an L1-sized tile of a panel, so the weights are read from L2 once
// per block, not once per row (per row they were 72 KB of L2 traffic at d = 1024 against 4 KB of
// x: the first version ran at 1.6 us per row, compute-side, perf). Where each table row serves
// many rows (per-sample routing) both passes first mix the two experts into one panel per table
// row (4 T (r/g + 1) d bytes): 13 d FMAs a row forward instead of 18 d, ~25 d backward instead of
// 36 d at r = 8, g = 2 (forward_rows, spread_run_sums).
//
// Memory: each block of x (dy) is read from RAM once and used from L2 for its second pass (up
// after down forward; dx and the weight gradients after dy U backward); the next block is
// prefetched while this one computes, and a large y (dx) is written with streaming stores, which
// skip the read of each line a plain store does first (vec_rows.h, kStreamBytes). Forward moves 2 M d e
// bytes (e = element size) + 4 M r (hd) + the weights; backward 3 M d e (dy, x, dx) + 4 M r (hd)
// + per chunk of rows one fp32 partial of the weight gradients (4 (r d + 2 d r/g + 2 d + r)
// bytes, written and summed once).
//
// Arithmetic in fp32 for fp32/bf16/fp16 inputs (16-bit rows are converted on load, results
// rounded once on store). Deterministic for any thread count: rows are independent forward;
// backward the weight-gradient partials belong to fixed chunks of rows (their size set by M
// alone) and are summed in chunk order, the routing gradient in row order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>
#include <vector>

#include "vec_rows.h"

namespace lavin_fast_native {
namespace {

constexpr int64_t kRows = 16;   // rows per block: 2 x 16 rows of d fp32 stay in L2 between the passes

// Dropout factor of row m's hidden units: Philox4x32-10 keyed by (seed, row), so any thread
// draws the same mask for a row and the backward replays the forward's.
void dropout_row(uint64_t seed, int64_t m, int64_t r, float p, float* out) {
  at::Philox4_32 engine(seed, static_cast<uint64_t>(m), 0);
  const float keep_scale = 1.0f / (1.0f - p);
  for (int64_t i = 0; i < r; ++i) {
    const float u = static_cast<float>(engine() >> 8) * (1.0f / 16777216.0f);   // [0, 1), 24 bits
    out[i] = u >= p ? keep_scale : 0.0f;
  }
}

// Everything both passes read, as fp32 contiguous tensors (a few hundred KB at most).
struct Params {
  int64_t batch, tokens, M, d, r, rg, groups, dg, n, a_chunks, g_chunks, table_rows;
  at::Tensor a_w, a_b, ub_w, ud_w, ub, ud, a_panel, up_panel, routing, index;
  double scale;

  int64_t table_row(int64_t m) const {
    const int64_t t = index.defined() ? index.data_ptr<int64_t>()[m] : m / tokens;
    TORCH_CHECK(t >= 0 && t < table_rows, "mm_adapter (native): routing_index value ", t,
                " is not a row of routing [", table_rows, ", 2]");
    return t;
  }
  const float* group_panel(int64_t k) const { return up_panel.data_ptr<float>() + k * g_chunks * n * kW; }
  // Row u of the up weights [U_0^T; U_1^T; u_0; u_1] ([n, d]) at column c: the columns past a
  // group's last whole chunk, which run scalar.
  float up_at(int64_t u, int64_t c) const {
    if (u < rg) return ub_w.data_ptr<float>()[c * rg + u];
    if (u < 2 * rg) return ud_w.data_ptr<float>()[c * rg + u - rg];
    return (u == 2 * rg ? ub : ud).data_ptr<float>()[c];
  }
};

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

// The up weights as group panels [groups, dg/W, n, W] (vec_rows.h), straight from their stored
// layouts: per chunk of W columns, U_0 and U_1 ([d, rg] row-major) transposed by strided
// gathers, u_0 and u_1 loaded as they are. Vector moves only: the scalar transpose through an
// [n, d] copy it replaced took 30 us a call at d = 4096 (perf), most of a decode step's kernel.
void pack_up_panels(const Params& p, float* out) {
  const float *Ub = p.ub_w.data_ptr<float>(), *Ud = p.ud_w.data_ptr<float>(), *ub = p.ub.data_ptr<float>(),
              *ud = p.ud.data_ptr<float>();
  using IndexVec = at::vec::Vectorized<int32_t>;
  const IndexVec lanes = IndexVec::arange(0, static_cast<int32_t>(p.rg));   // lane i reads row c0 + i
  for (int64_t k = 0; k < p.groups; ++k) {
    for (int64_t v = 0; v < p.g_chunks; ++v) {
      const int64_t c0 = k * p.dg + v * kW;
      float* panel = out + ((k * p.g_chunks + v) * p.n) * kW;
      for (int64_t j = 0; j < p.rg; ++j) {
        at::vec::gather<sizeof(float)>(Ub + c0 * p.rg + j, lanes).store(panel + j * kW);
        at::vec::gather<sizeof(float)>(Ud + c0 * p.rg + j, lanes).store(panel + (p.rg + j) * kW);
      }
      Vec::loadu(ub + c0).store(panel + 2 * p.rg * kW);
      Vec::loadu(ud + c0).store(panel + (2 * p.rg + 1) * kW);
    }
  }
}

Params params(const at::Tensor& x, const at::Tensor& a_w, const std::optional<at::Tensor>& a_b,
              const at::Tensor& ub_w, const at::Tensor& ub, const at::Tensor& ud_w, const at::Tensor& ud,
              const at::Tensor& routing, const std::optional<at::Tensor>& routing_index, double scale) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) > 0, "mm_adapter (native): x must be [batch, tokens, dim>0], got ",
              x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "mm_adapter (native): tensors must be on the CPU, x is on ", x.device());
  const int64_t d = x.size(2), r = a_w.size(0), rg = ub_w.size(1);
  TORCH_CHECK(a_w.dim() == 2 && a_w.size(1) == d && r > 0, "mm_adapter (native): down_weight must be [hidden, ",
              d, "], got ", a_w.sizes());
  TORCH_CHECK(ub_w.dim() == 2 && ud_w.sizes() == ub_w.sizes() && ub_w.size(0) == d && rg > 0 && r % rg == 0 &&
              d % (r / rg) == 0, "mm_adapter (native): up weights must be [", d, ", hidden/groups], got ",
              ub_w.sizes(), " and ", ud_w.sizes());
  TORCH_CHECK(routing.dim() == 2 && routing.size(1) == 2, "mm_adapter (native): routing must be [rows, 2], got ",
              routing.sizes());
  Params p;
  p.batch = x.size(0), p.tokens = x.size(1), p.M = p.batch * p.tokens, p.d = d, p.r = r, p.rg = rg;
  p.groups = r / rg, p.dg = d / p.groups, p.n = 2 * rg + 2, p.a_chunks = d / kW, p.g_chunks = p.dg / kW;
  p.table_rows = routing.size(0);
  p.a_w = f32(a_w), p.a_b = a_b ? f32(*a_b) : at::Tensor();
  p.ub_w = f32(ub_w), p.ud_w = f32(ud_w), p.ub = f32(ub), p.ud = f32(ud);
  // Plain loops, not ATen ops: a dozen small ops cost ~0.1 ms a call, the whole forward at M = 64.
  p.a_panel = at::empty({p.a_chunks, r, kW}, x.options().dtype(at::kFloat));
  pack_panels(p.a_w.data_ptr<float>(), r, d, 0, p.a_chunks, p.a_panel.data_ptr<float>());
  p.up_panel = at::empty({p.groups, p.g_chunks, p.n, kW}, p.a_panel.options());
  pack_up_panels(p, p.up_panel.data_ptr<float>());
  p.routing = f32(routing);
  if (routing_index) {
    TORCH_CHECK(routing_index->sizes() == x.sizes().slice(0, 2), "mm_adapter (native): routing_index must be [",
                p.batch, ", ", p.tokens, "], got ", routing_index->sizes());
    p.index = routing_index->to(at::kLong).contiguous().view(-1);
  } else {
    TORCH_CHECK(p.table_rows == p.batch, "mm_adapter (native): routing must be [", p.batch, ", 2] without an index");
  }
  p.scale = scale;
  return p;
}

uint64_t seed_of(double dropout_p, const std::optional<at::Tensor>& seed) {
  if (dropout_p <= 0) return 0;
  TORCH_CHECK(seed && seed->numel() == 1, "mm_adapter (native): dropout needs a one-element seed tensor");
  return static_cast<uint64_t>(seed->to(at::kLong).item<int64_t>());
}

// ---------------------------------------------------------------------------------------------
// Forward, per block of kRows rows: the down-projection tile by tile of A's panel (r lane-wise
// accumulators per row), dropout, then y = x + sum_u coef_u up_u over each group's columns.
// Rows reading one table row t share its routing weights, so where each table row serves many
// rows (per-sample routing) the two experts are first mixed into one panel per t,
//     mixed_t = [s (w_0 U_0^T + w_1 U_1^T); s (w_0 u_0 + w_1 u_1)]      [rg + 1 rows per group]
// and a run of rows reading t adds coef = (hd_k., 1) . mixed_t: (r + rg + 1) d FMAs per row
// instead of (r + n) d with coef = (s w_0 hd_k., s w_1 hd_k., s w_0, s w_1) on the experts'
// panels (13 d against 18 d at r = 8, g = 2). Per-token routing keeps the second form. 2 M d e
// bytes from RAM.
// ---------------------------------------------------------------------------------------------

// Mix when the table rows are few against the rows (each mixed panel costs 2 (rg + 1) d FMAs
// and saves (n - rg - 1) d per row reading it).
constexpr int64_t kRowsPerMixedPanel = 16;

// Row u < rg + 1 of a mixed panel mixes rows (e0, e1) of the experts' panel: (j, rg + j) for
// U^T's column j, (2 rg, 2 rg + 1) for the biases.
inline std::pair<int64_t, int64_t> expert_rows(int64_t u, int64_t rg) {
  return u < rg ? std::pair<int64_t, int64_t>{u, rg + u} : std::pair<int64_t, int64_t>{2 * rg, 2 * rg + 1};
}

// mixed_t for every table row, [T, groups, g_chunks, rg + 1, W], where it pays
// (kRowsPerMixedPanel); else empty, and the passes run on the experts' panels.
struct MixedPanels {
  at::Tensor panels;
  const float* base = nullptr;   // nullptr: not mixed
  int64_t groups = 0, g_chunks = 0, m = 0;

  explicit MixedPanels(const Params& p) {
    if (p.table_rows * kRowsPerMixedPanel > p.M) return;
    groups = p.groups, g_chunks = p.g_chunks, m = p.rg + 1;
    const int64_t per_row = groups * g_chunks * m * kW;
    panels = at::empty({p.table_rows, per_row}, p.up_panel.options());
    const float *w = p.routing.data_ptr<float>(), *up = p.up_panel.data_ptr<float>();
    float* out = panels.data_ptr<float>();
    const float s = static_cast<float>(p.scale);
    at::parallel_for(0, p.table_rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const Vec w0(s * w[2 * t]), w1(s * w[2 * t + 1]);
        for (int64_t chunk = 0; chunk < groups * g_chunks; ++chunk) {   // (group, column chunk)
          const float* e = up + chunk * p.n * kW;
          float* o = out + t * per_row + chunk * m * kW;
          for (int64_t u = 0; u < m; ++u) {
            const auto [e0, e1] = expert_rows(u, p.rg);
            (w0 * Vec::loadu(e + e0 * kW) + w1 * Vec::loadu(e + e1 * kW)).store(o + u * kW);
          }
        }
      }
    });
    base = panels.data_ptr<float>();
  }
  explicit operator bool() const { return base != nullptr; }
  // The tile of table row t's panel for group k from column chunk v0.
  const float* tile(int64_t t, int64_t k, int64_t v0) const { return base + ((t * groups + k) * g_chunks + v0) * m * kW; }
};

template <typename scalar_t>
void forward_rows(const Params& p, const scalar_t* xs, scalar_t* ys, float* hds, float dropout_p, uint64_t seed) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t d = p.d, r = p.r, rg = p.rg, n = p.n, groups = p.groups, dg = p.dg, m = rg + 1;
  const float *A = p.a_w.data_ptr<float>(), *a = p.a_b.data_ptr<float>(),
              *A_panel = p.a_panel.data_ptr<float>(), *w = p.routing.data_ptr<float>();
  const float s = static_cast<float>(p.scale);
  const MixedPanels mixed(p);
  const int64_t blocks = (p.M + kRows - 1) / kRows;
  // y streams past the caches when large (vec_rows.h) and each chunk of it is stored once (one run
  // of panel rows); 16-bit outputs are converted from a buffer instead.
  bool stream = false;
  if constexpr (kFloat) stream = stream_rows(ys, p.M, d, dg) && (mixed ? m : n) <= kMaxRun;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    std::vector<float> x_buf(kFloat ? 0 : kRows * d), y_buf(kFloat ? 0 : kRows * d), mask(r),
        coef(kRows * groups * n), hcoef(kRows * groups * m);
    std::vector<int64_t> table(kRows);
    std::vector<Vec> acc(kRows * r);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t m0 = block * kRows, rows = std::min(kRows, p.M - m0);
      const float* xb = rows_as_float(xs, m0, rows, d, x_buf.data());
      float* yb = kFloat ? reinterpret_cast<float*>(ys) + m0 * d : y_buf.data();
      std::fill(acc.begin(), acc.end(), Vec(0.0f));
      for (int64_t v0 = 0; v0 < p.a_chunks; v0 += kTileChunks) {   // h = x A^T, one tile of A at a time
        const int64_t chunks = std::min(kTileChunks, p.a_chunks - v0);
        const float* tile = A_panel + v0 * r * kW;
        for (int64_t q = 0; q < rows; ++q) {
          if (m0 + kRows + q < p.M) prefetch(xs + (m0 + kRows + q) * d + v0 * kW, chunks * kW * sizeof(scalar_t));
          in_runs(r, [&](auto run, int64_t u0) {
            panel_dots<decltype(run)::value>(xb + q * d + v0 * kW, tile + u0 * kW, r, chunks, acc.data() + q * r + u0);
          });
        }
      }
      for (int64_t q = 0; q < rows; ++q) {
        const int64_t row = m0 + q;
        const float* xr = xb + q * d;
        float* h = hds + row * r;
        for (int64_t i = 0; i < r; ++i) {
          float sum = lane_sum(acc[q * r + i]);
          for (int64_t c = p.a_chunks * kW; c < d; ++c) sum += xr[c] * A[i * d + c];
          h[i] = sum + a[i];
        }
        if (dropout_p > 0) {
          dropout_row(seed, row, r, dropout_p, mask.data());
          for (int64_t i = 0; i < r; ++i) h[i] *= mask[i];
        }
        const int64_t t = table[q] = p.table_row(row);
        const float s0 = s * w[2 * t], s1 = s * w[2 * t + 1];
        for (int64_t k = 0; k < groups; ++k) {
          float *cq = coef.data() + (q * groups + k) * n, *hq = hcoef.data() + (q * groups + k) * m;
          for (int64_t j = 0; j < rg; ++j) cq[j] = s0 * h[k * rg + j], cq[rg + j] = s1 * h[k * rg + j], hq[j] = h[k * rg + j];
          cq[2 * rg] = s0, cq[2 * rg + 1] = s1, hq[rg] = 1.0f;
        }
      }
      // y = x + coef . up over each group's columns, per run of rows reading one mixed panel
      // (the whole block at once on the experts' panels).
      for (int64_t q0 = 0, q1; q0 < rows; q0 = q1) {
        q1 = q0 + 1;
        while (mixed && q1 < rows && table[q1] == table[q0]) ++q1;
        if (!mixed) q1 = rows;
        const int64_t run_rows = q1 - q0;
        for (int64_t k = 0; k < groups; ++k) {
          for (int64_t v0 = 0; v0 < p.g_chunks; v0 += kTileChunks) {
            const int64_t chunks = std::min(kTileChunks, p.g_chunks - v0), c = k * dg + v0 * kW;
            const float* x_run = xb + q0 * d + c;
            float* y_run = yb + q0 * d + c;
            if (mixed) {
              const float* tile = mixed.tile(table[q0], k, v0);
              in_runs(m, [&](auto run, int64_t u0) {
                panel_combine_rows<decltype(run)::value>(run_rows, u0 == 0 ? x_run : y_run, d, tile + u0 * kW, m,
                                                         hcoef.data() + (q0 * groups + k) * m + u0, groups * m,
                                                         chunks, y_run, d, stream);
              });
            } else {
              const float* tile = p.group_panel(k) + v0 * n * kW;
              in_runs(n, [&](auto run, int64_t u0) {
                panel_combine_rows<decltype(run)::value>(run_rows, u0 == 0 ? x_run : y_run, d, tile + u0 * kW, n,
                                                         coef.data() + (q0 * groups + k) * n + u0, groups * n,
                                                         chunks, y_run, d, stream);
              });
            }
          }
          for (int64_t c = k * dg + p.g_chunks * kW; c < (k + 1) * dg; ++c) {   // columns past the last chunk
            for (int64_t q = q0; q < q1; ++q) {
              const float* cq = coef.data() + (q * groups + k) * n;
              float sum = xb[q * d + c];
              for (int64_t u = 0; u < n; ++u) sum += cq[u] * p.up_at(u, c);
              yb[q * d + c] = sum;
            }
          }
        }
      }
      if constexpr (!kFloat) at::vec::convert(yb, ys + m0 * d, rows * d);
    }
    fence_streams(stream);
  });
}

std::tuple<at::Tensor, at::Tensor> mm_adapter_fwd(
    const at::Tensor& x_in, const at::Tensor& down_weight, const at::Tensor& down_bias, const at::Tensor& up_b_weight,
    const at::Tensor& up_b_bias, const at::Tensor& up_d_weight, const at::Tensor& up_d_bias, const at::Tensor& routing,
    const std::optional<at::Tensor>& routing_index, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const Params p = params(x_in, down_weight, down_bias, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing,
                          routing_index, scale);
  TORCH_CHECK(dropout_p >= 0 && dropout_p < 1, "mm_adapter (native): dropout_p must be in [0, 1), got ", dropout_p);
  const at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty(x.sizes(), x.options());
  at::Tensor hd = at::empty({p.batch, p.tokens, p.r}, x.options().dtype(at::kFloat));
  const uint64_t s = seed_of(dropout_p, seed);
  dispatch_kernel_dtype(x.scalar_type(), "mm_adapter (native)", [&](auto tag) {
    using scalar_t = decltype(tag);
    forward_rows<scalar_t>(p, x.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), hd.data_ptr<float>(),
                           static_cast<float>(dropout_p), s);
  });
  return {y, hd};
}

// ---------------------------------------------------------------------------------------------
// Backward, per chunk of rows (the owner of one weight-gradient partial), per block of kRows:
//   pass 1: dy . up_u per group, tile by tile of the group's panel (n lane-wise accumulators per
//           row), giving dhw_e = s dy U_e, dy . u_e, then per row dw_e, dh, and the block's
//           coefficients (s w_e hd, s w_e);
//   pass 2: dx = dy + dh A (A's panel), the partial's dA panel += dh^T x, and its up panels
//           += coef^T dy (dU_e^T and du_e).
// Then the partials are summed in chunk order (parallel over elements) and unpacked, and the
// per-row routing gradients summed into the table in row order. RAM: dy, x read, dx written
// once (3 M d e).
// ---------------------------------------------------------------------------------------------
struct Partial {   // offsets into one chunk's partial of `total` floats
  int64_t dA_panel, dA_tail, dU_panel, dU_tail, da, total;
  int64_t a_tail, g_tail;   // columns past the last whole chunk: of d, of each group
  explicit Partial(const Params& p)
      : a_tail(p.d - p.a_chunks * kW), g_tail(p.dg - p.g_chunks * kW) {
    dA_panel = 0;
    dA_tail = dA_panel + p.a_chunks * p.r * kW;
    dU_panel = dA_tail + p.r * a_tail;
    dU_tail = dU_panel + p.groups * p.g_chunks * p.n * kW;
    da = dU_tail + p.groups * p.n * g_tail;
    total = da + p.r;
  }
};

// Rows per partial: set by M alone (so the sums' order does not depend on the thread count), about
// 32 partials for large M, never fewer rows than 64 nor more than 512.
int64_t chunk_rows(int64_t M) {
  const int64_t target = ((M + 31) / 32 + kRows - 1) / kRows * kRows;
  return std::clamp<int64_t>(target, 64, 512);
}

// With mixed panels (the forward's condition), per run of rows reading one table row t the
// experts' gradients come from two sums over the run, G = [hd_k.; 1]^T dy per group's columns
// ([rg + 1] panel rows, accumulated as the forward's coefficients):
//     dU_e^T += s w_e G_j,  du_e += s w_e G_rg;   dw_e(t) += s <G, [U_e^T; u_e]>
// and dh = (dy . mixed_t) * mask: (rg + r + r + rg + 1) d FMAs per row and 4 (rg + 1) d per run,
// against (n + 2 r + n) d per row on the experts' panels (25 d + a run's share against 36 d at
// r = 8, g = 2). The run's routing gradient goes to its first row (its other rows add 0), so the
// table's row-order sum is unchanged.
// A run's sums G (run_sums: [groups, g_chunks, rg + 1, W], then [groups, rg + 1, g_tail]) onto
// the partial's up panels and tails (rows j and rg + j: s w_e G_j; 2 rg and 2 rg + 1: s w_e G_rg)
// and the run's routing gradient dw_e = s <G, [U_e^T; u_e]> into its first row of dw_rows
// (the run's other rows 0).
void spread_run_sums(const Params& p, const Partial& layout, int64_t t, const float* run_sums, float* part,
                     float* dw_run, int64_t run_rows) {
  const int64_t rg = p.rg, n = p.n, m = rg + 1;
  const float s = static_cast<float>(p.scale);
  const float sw0 = s * p.routing.data_ptr<float>()[2 * t], sw1 = s * p.routing.data_ptr<float>()[2 * t + 1];
  const Vec vw0(sw0), vw1(sw1);
  Vec dw0(0.0f), dw1(0.0f);
  for (int64_t chunk = 0; chunk < p.groups * p.g_chunks; ++chunk) {   // (group, column chunk)
    const float* G = run_sums + chunk * m * kW;
    const float* E = p.up_panel.data_ptr<float>() + chunk * n * kW;
    float* P = part + layout.dU_panel + chunk * n * kW;
    for (int64_t u = 0; u < m; ++u) {
      const auto [e0, e1] = expert_rows(u, rg);
      const Vec g = Vec::loadu(G + u * kW);
      at::vec::fmadd(vw0, g, Vec::loadu(P + e0 * kW)).store(P + e0 * kW);
      at::vec::fmadd(vw1, g, Vec::loadu(P + e1 * kW)).store(P + e1 * kW);
      dw0 = at::vec::fmadd(g, Vec::loadu(E + e0 * kW), dw0);
      dw1 = at::vec::fmadd(g, Vec::loadu(E + e1 * kW), dw1);
    }
  }
  float dw0_sum = lane_sum(dw0), dw1_sum = lane_sum(dw1);
  const float* tails = run_sums + p.groups * p.g_chunks * m * kW;
  for (int64_t k = 0; k < p.groups; ++k) {
    for (int64_t column = 0; column < layout.g_tail; ++column) {
      const int64_t c = k * p.dg + p.g_chunks * kW + column;
      for (int64_t u = 0; u < m; ++u) {
        const auto [e0, e1] = expert_rows(u, rg);
        const float g = tails[(k * m + u) * layout.g_tail + column];
        part[layout.dU_tail + (k * n + e0) * layout.g_tail + column] += sw0 * g;
        part[layout.dU_tail + (k * n + e1) * layout.g_tail + column] += sw1 * g;
        dw0_sum += g * p.up_at(e0, c), dw1_sum += g * p.up_at(e1, c);
      }
    }
  }
  dw_run[0] = s * dw0_sum, dw_run[1] = s * dw1_sum;
  std::fill(dw_run + 2, dw_run + 2 * run_rows, 0.0f);
}

template <typename scalar_t>
void backward_chunks(const Params& p, const scalar_t* dys, const scalar_t* xs, const float* hds, scalar_t* dxs,
                     float* partials, float* dw_rows, float dropout_p, uint64_t seed) {
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const int64_t d = p.d, r = p.r, rg = p.rg, n = p.n, groups = p.groups, dg = p.dg, m = rg + 1;
  const Partial layout(p);
  const float *A = p.a_w.data_ptr<float>(), *A_panel = p.a_panel.data_ptr<float>(), *w = p.routing.data_ptr<float>();
  const float s = static_cast<float>(p.scale);
  const MixedPanels mixed(p);
  const int64_t chunk = chunk_rows(p.M), n_chunks = (p.M + chunk - 1) / chunk;
  // dx streams past the caches as the forward's y (one run of A's panel rows writes each chunk;
  // its stores start at the tiles of A's panel, kTileChunks chunks apart).
  bool stream = false;
  if constexpr (kFloat) stream = stream_rows(dxs, p.M, d, kTileChunks * kW) && r <= kMaxRun;
  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    std::vector<float> dy_buf(kFloat ? 0 : kRows * d), x_buf(kFloat ? 0 : kRows * d), dx_buf(kFloat ? 0 : kRows * d);
    std::vector<float> dh(kRows * r), coef(kRows * groups * n), mask(r), dhw0(r), dhw1(r), dot_u(n);
    std::vector<float> run_sums(mixed ? groups * (p.g_chunks * m * kW + m * layout.g_tail) : 0);
    std::vector<int64_t> table(kRows);
    std::vector<Vec> acc(kRows * groups * n);
    for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
      float* part = partials + ci * layout.total;
      std::fill(part, part + layout.total, 0.0f);
      const int64_t chunk_end_row = std::min(p.M, (ci + 1) * chunk);
      for (int64_t m0 = ci * chunk; m0 < chunk_end_row; m0 += kRows) {
        const int64_t rows = std::min(kRows, chunk_end_row - m0);
        const float* dyb = rows_as_float(dys, m0, rows, d, dy_buf.data());
        const float* xb = rows_as_float(xs, m0, rows, d, x_buf.data());
        float* dxb = kFloat ? reinterpret_cast<float*>(dxs) + m0 * d : dx_buf.data();
        for (int64_t q = 0; q < rows; ++q) table[q] = p.table_row(m0 + q);
        // pass 1: dy . mixed_t (rg per group) or dy . up_u (n per group), tile by tile
        std::fill(acc.begin(), acc.end(), Vec(0.0f));
        for (int64_t k = 0; k < groups; ++k) {
          for (int64_t v0 = 0; v0 < p.g_chunks; v0 += kTileChunks) {
            const int64_t chunks = std::min(kTileChunks, p.g_chunks - v0), c = k * dg + v0 * kW;
            for (int64_t q = 0; q < rows; ++q) {
              // The next block's dy, and this block's x (fp32: first read in pass 2a; 16-bit x was
              // read converting it).
              if (m0 + kRows + q < p.M) prefetch(dys + (m0 + kRows + q) * d + c, chunks * kW * sizeof(scalar_t));
              if constexpr (kFloat) prefetch(xs + (m0 + q) * d + c, chunks * kW * sizeof(scalar_t));
              Vec* out = acc.data() + (q * groups + k) * n;
              if (mixed) {
                in_runs(rg, [&](auto run, int64_t u0) {
                  panel_dots<decltype(run)::value>(dyb + q * d + c, mixed.tile(table[q], k, v0) + u0 * kW, m, chunks,
                                                   out + u0);
                });
              } else {
                in_runs(n, [&](auto run, int64_t u0) {
                  panel_dots<decltype(run)::value>(dyb + q * d + c, p.group_panel(k) + (v0 * n + u0) * kW, n, chunks,
                                                   out + u0);
                });
              }
            }
          }
        }
        for (int64_t q = 0; q < rows; ++q) {
          const int64_t row = m0 + q, t = table[q];
          const float *g = dyb + q * d, *hd = hds + row * r;
          const float w0 = w[2 * t], w1 = w[2 * t + 1];
          if (dropout_p > 0) dropout_row(seed, row, r, dropout_p, mask.data());
          if (mixed) {   // dh = (dy . mixed_t) * mask; the routing gradient per run, below
            for (int64_t k = 0; k < groups; ++k) {
              for (int64_t j = 0; j < rg; ++j) {
                float sum = lane_sum(acc[(q * groups + k) * n + j]);
                for (int64_t c = k * dg + p.g_chunks * kW; c < (k + 1) * dg; ++c) {
                  sum += g[c] * s * (w0 * p.up_at(j, c) + w1 * p.up_at(rg + j, c));
                }
                dh[q * r + k * rg + j] = sum * (dropout_p > 0 ? mask[k * rg + j] : 1.0f);
              }
            }
          } else {
            float dot_u0 = 0.0f, dot_u1 = 0.0f;
            for (int64_t k = 0; k < groups; ++k) {
              for (int64_t u = 0; u < n; ++u) {
                float sum = lane_sum(acc[(q * groups + k) * n + u]);
                for (int64_t c = k * dg + p.g_chunks * kW; c < (k + 1) * dg; ++c) sum += g[c] * p.up_at(u, c);
                dot_u[u] = sum;
              }
              for (int64_t j = 0; j < rg; ++j) dhw0[k * rg + j] = s * dot_u[j], dhw1[k * rg + j] = s * dot_u[rg + j];
              dot_u0 += dot_u[2 * rg], dot_u1 += dot_u[2 * rg + 1];
            }
            float dw0 = s * dot_u0, dw1 = s * dot_u1;
            for (int64_t i = 0; i < r; ++i) dw0 += hd[i] * dhw0[i], dw1 += hd[i] * dhw1[i];
            dw_rows[2 * row] = dw0, dw_rows[2 * row + 1] = dw1;
            for (int64_t i = 0; i < r; ++i) {
              dh[q * r + i] = (w0 * dhw0[i] + w1 * dhw1[i]) * (dropout_p > 0 ? mask[i] : 1.0f);
            }
          }
          for (int64_t i = 0; i < r; ++i) part[layout.da + i] += dh[q * r + i];
          for (int64_t k = 0; k < groups; ++k) {   // pass 2b's coefficients: (hd, 1) mixed, else s w_e (hd, 1)
            float* cq = coef.data() + (q * groups + k) * n;
            if (mixed) {
              for (int64_t j = 0; j < rg; ++j) cq[j] = hd[k * rg + j];
              cq[rg] = 1.0f;
            } else {
              for (int64_t j = 0; j < rg; ++j) cq[j] = s * w0 * hd[k * rg + j], cq[rg + j] = s * w1 * hd[k * rg + j];
              cq[2 * rg] = s * w0, cq[2 * rg + 1] = s * w1;
            }
          }
        }
        // pass 2a: dx = dy + dh A and dA += dh^T x, tile by tile of A's panel
        float* dA_panel = part + layout.dA_panel;
        for (int64_t v0 = 0; v0 < p.a_chunks; v0 += kTileChunks) {
          const int64_t chunks = std::min(kTileChunks, p.a_chunks - v0), c = v0 * kW;
          const float* tile = A_panel + v0 * r * kW;
          in_runs(r, [&](auto run, int64_t u0) {
            panel_combine_rows<decltype(run)::value>(rows, u0 == 0 ? dyb + c : dxb + c, d, tile + u0 * kW, r,
                                                     dh.data() + u0, r, chunks, dxb + c, d, stream);
          });
          in_runs(r, [&](auto run, int64_t u0) {
            panel_accumulate<decltype(run)::value>(xb + c, d, rows, dh.data() + u0, r, chunks,
                                                   dA_panel + (v0 * r + u0) * kW, r);
          });
        }
        for (int64_t c = p.a_chunks * kW; c < d; ++c) {   // columns past the last chunk
          for (int64_t q = 0; q < rows; ++q) {
            float sum = dyb[q * d + c];
            for (int64_t i = 0; i < r; ++i) sum += dh[q * r + i] * A[i * d + c];
            dxb[q * d + c] = sum;
          }
          for (int64_t i = 0; i < r; ++i) {
            float sum = 0.0f;
            for (int64_t q = 0; q < rows; ++q) sum += dh[q * r + i] * xb[q * d + c];
            part[layout.dA_tail + i * layout.a_tail + (c - p.a_chunks * kW)] += sum;
          }
        }
        // pass 2b: coef^T dy, group by group: into the up panels (experts' form), or per run of
        // rows reading one table row into its sums G, then spread onto the experts (mixed form).
        for (int64_t q0 = 0, q1; q0 < rows; q0 = q1) {
          q1 = q0 + 1;
          while (mixed && q1 < rows && table[q1] == table[q0]) ++q1;
          if (!mixed) q1 = rows;
          const int64_t run_rows = q1 - q0, u_rows = mixed ? m : n;
          if (mixed) std::fill(run_sums.begin(), run_sums.end(), 0.0f);
          for (int64_t k = 0; k < groups; ++k) {
            float* sums = mixed ? run_sums.data() + k * p.g_chunks * m * kW
                                     : part + layout.dU_panel + k * p.g_chunks * n * kW;
            float* tail_sums = mixed ? run_sums.data() + groups * p.g_chunks * m * kW + k * m * layout.g_tail
                                          : part + layout.dU_tail + k * n * layout.g_tail;
            const float* cq = coef.data() + (q0 * groups + k) * n;
            for (int64_t v0 = 0; v0 < p.g_chunks; v0 += kTileChunks) {
              const int64_t chunks = std::min(kTileChunks, p.g_chunks - v0), c = k * dg + v0 * kW;
              in_runs(u_rows, [&](auto run, int64_t u0) {
                panel_accumulate<decltype(run)::value>(dyb + q0 * d + c, d, run_rows, cq + u0, groups * n, chunks,
                                                       sums + (v0 * u_rows + u0) * kW, u_rows);
              });
            }
            for (int64_t c = k * dg + p.g_chunks * kW; c < (k + 1) * dg; ++c) {
              const int64_t column = c - k * dg - p.g_chunks * kW;
              for (int64_t u = 0; u < u_rows; ++u) {
                float sum = 0.0f;
                for (int64_t q = q0; q < q1; ++q) sum += coef[(q * groups + k) * n + u] * dyb[q * d + c];
                tail_sums[u * layout.g_tail + column] += sum;
              }
            }
          }
          if (mixed) spread_run_sums(p, layout, table[q0], run_sums.data(), part, dw_rows + 2 * (m0 + q0), run_rows);
        }
        if constexpr (!kFloat) at::vec::convert(dxb, dxs + m0 * d, rows * d);
      }
    }
    fence_streams(stream);
  });
}

std::vector<at::Tensor> mm_adapter_bwd(
    const at::Tensor& dy_in, const at::Tensor& x_in, const at::Tensor& down_weight, const at::Tensor& up_b_weight,
    const at::Tensor& up_b_bias, const at::Tensor& up_d_weight, const at::Tensor& up_d_bias, const at::Tensor& routing,
    const std::optional<at::Tensor>& routing_index, const at::Tensor& hd_in, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed) {
  const Params p = params(x_in, down_weight, std::nullopt, up_b_weight, up_b_bias, up_d_weight, up_d_bias, routing,
                          routing_index, scale);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(),
              "mm_adapter (native): dy must match x (", x_in.sizes(), " ", x_in.scalar_type(), "), got ",
              dy_in.sizes(), " ", dy_in.scalar_type());
  TORCH_CHECK(hd_in.sizes() == at::IntArrayRef({p.batch, p.tokens, p.r}) && hd_in.scalar_type() == at::kFloat,
              "mm_adapter (native): hd must be the forward's fp32 [", p.batch, ", ", p.tokens, ", ", p.r, "], got ",
              hd_in.scalar_type(), " ", hd_in.sizes());
  const at::Tensor x = x_in.contiguous(), dy = dy_in.contiguous(), hd = hd_in.contiguous();
  const int64_t M = p.M, d = p.d, r = p.r, rg = p.rg, n = p.n;
  const Partial layout(p);
  const int64_t chunk = chunk_rows(M), n_chunks = (M + chunk - 1) / chunk;
  at::Tensor dx = at::empty(x.sizes(), x.options());
  at::Tensor partials = at::empty({n_chunks, layout.total}, x.options().dtype(at::kFloat));
  at::Tensor dw_rows = at::empty({M, 2}, x.options().dtype(at::kFloat));
  const uint64_t s = seed_of(dropout_p, seed);
  dispatch_kernel_dtype(x.scalar_type(), "mm_adapter (native)", [&](auto tag) {
    using scalar_t = decltype(tag);
    backward_chunks<scalar_t>(p, dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), hd.data_ptr<float>(),
                              dx.data_ptr<scalar_t>(), partials.data_ptr<float>(), dw_rows.data_ptr<float>(),
                              static_cast<float>(dropout_p), s);
  });
  // The chunks' partials summed in chunk order, parallel over elements.
  at::Tensor total = at::zeros({layout.total}, x.options().dtype(at::kFloat));
  const float* parts = partials.data_ptr<float>();
  float* sum = total.data_ptr<float>();
  at::parallel_for(0, layout.total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t ci = 0; ci < n_chunks; ++ci) {
      const float* row = parts + ci * layout.total;
      for (int64_t e = begin; e < end; ++e) sum[e] += row[e];
    }
  });
  // The routing gradient: each table row sums the rows that read it, in row order (fp64).
  std::vector<double> table(p.table_rows * 2, 0.0);
  const float* dw = dw_rows.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const int64_t t = p.table_row(m);
    table[2 * t] += dw[2 * m], table[2 * t + 1] += dw[2 * m + 1];
  }
  at::Tensor d_routing = at::empty({p.table_rows, 2}, x.options().dtype(at::kFloat));
  std::copy(table.begin(), table.end(), d_routing.data_ptr<float>());
  // Unpack the panels and tails into the weights' layouts (plain loops: see params()).
  const at::TensorOptions f32_options = x.options().dtype(at::kFloat);
  at::Tensor dA = at::empty({r, d}, f32_options), da = at::empty({r}, f32_options);
  at::Tensor dUb = at::empty({d, rg}, f32_options), dUd = at::empty({d, rg}, f32_options);
  at::Tensor dub = at::empty({d}, f32_options), dud = at::empty({d}, f32_options);
  const float* t = total.data_ptr<float>();
  float *dA_out = dA.data_ptr<float>(), *dUb_out = dUb.data_ptr<float>(), *dUd_out = dUd.data_ptr<float>(),
        *dub_out = dub.data_ptr<float>(), *dud_out = dud.data_ptr<float>();
  for (int64_t i = 0; i < r; ++i) {
    for (int64_t c = 0; c < d; ++c) {
      const int64_t v = c / kW, tail = c - p.a_chunks * kW;
      dA_out[i * d + c] = v < p.a_chunks ? t[layout.dA_panel + (v * r + i) * kW + c % kW]
                                         : t[layout.dA_tail + i * layout.a_tail + tail];
    }
  }
  std::copy_n(t + layout.da, r, da.data_ptr<float>());
  for (int64_t c = 0; c < d; ++c) {   // row u of the up gradients (as Params::up_at: U_0^T, U_1^T, u_0, u_1) at column c
    const int64_t k = c / p.dg, column = c - k * p.dg, v = column / kW, tail = column - p.g_chunks * kW;
    auto up_grad = [&](int64_t u) {
      return v < p.g_chunks ? t[layout.dU_panel + ((k * p.g_chunks + v) * n + u) * kW + column % kW]
                            : t[layout.dU_tail + (k * n + u) * layout.g_tail + tail];
    };
    for (int64_t j = 0; j < rg; ++j) dUb_out[c * rg + j] = up_grad(j), dUd_out[c * rg + j] = up_grad(rg + j);
    dub_out[c] = up_grad(2 * rg), dud_out[c] = up_grad(2 * rg + 1);
  }
  return {dx, d_routing, dA, da, dUb, dub, dUd, dud};
}

// The dropout mask the forward applies for `seed` and p: [B, N, r] fp32, 0 or 1/(1-p) (tests).
at::Tensor mm_adapter_dropout_mask(const at::Tensor& seed, int64_t batch, int64_t tokens, int64_t hidden,
                                   double p) {
  at::Tensor mask = at::empty({batch, tokens, hidden}, at::kFloat);
  TORCH_CHECK(seed.numel() == 1, "mm_adapter (native): seed must have one element");
  const uint64_t s = static_cast<uint64_t>(seed.to(at::kLong).item<int64_t>());
  float* out = mask.data_ptr<float>();
  at::parallel_for(0, batch * tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) dropout_row(s, m, hidden, static_cast<float>(p), out + m * hidden);
  });
  return mask;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lavin_fast_native, m) {
  m.def("mm_adapter_fwd", &mm_adapter_fwd);
  m.def("mm_adapter_bwd", &mm_adapter_bwd);
  m.def("mm_adapter_dropout_mask", &mm_adapter_dropout_mask);
}

}  // namespace lavin_fast_native
