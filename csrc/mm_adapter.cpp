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
// Memory: each row of x (dy) is read from RAM once into L1 and used there for both of its
// passes (down then up forward; dy U then dx and the weight gradients backward). Forward moves
// 2 M d e bytes (e = element size) + 4 M r (hd) + the weights; backward 3 M d e (dy, x, dx)
// + 4 M r (hd) + per block of kRowBlock rows one fp32 partial of the weight gradients
// (4 (r d + 2 d r/g + 2 d + r) bytes, written and summed once).
//
// Arithmetic in fp32 for fp32/bf16/fp16 inputs (16-bit rows are converted on load, results
// rounded once on store). Deterministic for any thread count: rows are independent forward;
// backward the weight-gradient partials belong to fixed blocks of kRowBlock rows and are summed
// in block order, the routing gradient in row order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/PhiloxRNGEngine.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "vec_rows.h"

namespace lavin_fast_native {
namespace {

constexpr int64_t kRowBlock = 64;   // rows per weight-gradient partial (fixed: thread-count invariant)
constexpr int64_t kColTile = 256;   // columns per step of the backward's second pass (L1-sized)

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

// Everything both passes read, as fp32 contiguous tensors (a few KB: the weights, the table).
struct Params {
  int64_t batch, tokens, d, r, rg, dg, table_rows;
  at::Tensor a_w, a_b, ub_t, ud_t, ub, ud, routing, index;   // ub_t, ud_t: U^T [r/g, d]
  double scale;

  int64_t table_row(int64_t m) const {
    const int64_t t = index.defined() ? index.data_ptr<int64_t>()[m] : m / tokens;
    TORCH_CHECK(t >= 0 && t < table_rows, "mm_adapter (native): routing_index value ", t,
                " is not a row of routing [", table_rows, ", 2]");
    return t;
  }
};

at::Tensor f32(const at::Tensor& t) { return t.to(at::kFloat).contiguous(); }

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
  p.batch = x.size(0), p.tokens = x.size(1), p.d = d, p.r = r, p.rg = rg, p.dg = d / (r / rg);
  p.table_rows = routing.size(0);
  p.a_w = f32(a_w), p.a_b = a_b ? f32(*a_b) : at::Tensor();
  p.ub_t = f32(ub_w.t()), p.ud_t = f32(ud_w.t()), p.ub = f32(ub), p.ud = f32(ud);
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
// Forward: per row, the r dot products of the down-projection over the row (in L1), dropout,
// then y = x + s (w_0 u_0 + w_1 u_1) + sum_j (s w_0 hd_kj) U_0^T[j] + (s w_1 hd_kj) U_1^T[j] over
// each group's columns. 2 M d e bytes from RAM; about (r + 2 r/g + 2) d FMAs per row.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_rows(const Params& p, const at::Tensor& x, at::Tensor& y, at::Tensor& hd, float dropout_p,
                  uint64_t seed) {
  const int64_t M = p.batch * p.tokens, d = p.d, r = p.r, rg = p.rg, dg = p.dg;
  const scalar_t* xs = x.data_ptr<scalar_t>();
  scalar_t* ys = y.data_ptr<scalar_t>();
  float* hds = hd.data_ptr<float>();
  const float *A = p.a_w.data_ptr<float>(), *a = p.a_b.data_ptr<float>(), *UbT = p.ub_t.data_ptr<float>(),
              *UdT = p.ud_t.data_ptr<float>(), *ub = p.ub.data_ptr<float>(), *ud = p.ud.data_ptr<float>(),
              *w = p.routing.data_ptr<float>();
  const float s = static_cast<float>(p.scale);
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> x_buf(d), out(d), mask(r), coef(2 * rg + 2);
    std::vector<const float*> src(2 * rg + 2);
    for (int64_t m = begin; m < end; ++m) {
      const float* xr = row_as_float(xs, row_offset(x, m, p.tokens), d, x_buf.data());
      float* h = hds + m * r;
      for (int64_t i = 0; i < r; i += 4) dot4(xr, A + i * d, d, std::min<int64_t>(4, r - i), d, h + i);
      for (int64_t i = 0; i < r; ++i) h[i] += a[i];
      if (dropout_p > 0) {
        dropout_row(seed, m, r, dropout_p, mask.data());
        for (int64_t i = 0; i < r; ++i) h[i] *= mask[i];
      }
      const int64_t t = p.table_row(m);
      const float s0 = s * w[2 * t], s1 = s * w[2 * t + 1];
      float* o = std::is_same_v<scalar_t, float> ? reinterpret_cast<float*>(ys + m * d) : out.data();
      for (int64_t k = 0; k * dg < d; ++k) {   // group k's columns: x + 2 r/g + 2 scaled rows, one pass
        const int64_t c = k * dg;
        int64_t n = 0;
        for (int64_t j = 0; j < rg; ++j) {
          src[n] = UbT + j * d + c, coef[n++] = s0 * h[k * rg + j];
          src[n] = UdT + j * d + c, coef[n++] = s1 * h[k * rg + j];
        }
        src[n] = ub + c, coef[n++] = s0;
        src[n] = ud + c, coef[n++] = s1;
        add_rows(xr + c, src.data(), coef.data(), n, o + c, dg);
      }
      if constexpr (!std::is_same_v<scalar_t, float>) at::vec::convert(o, ys + m * d, d);
    }
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
  const at::Tensor x = unit_inner_stride(x_in);
  at::Tensor y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor hd = at::empty({p.batch, p.tokens, p.r}, x.options().dtype(at::kFloat));
  const uint64_t s = seed_of(dropout_p, seed);
  dispatch_kernel_dtype(x.scalar_type(), "mm_adapter (native)", [&](auto tag) {
    forward_rows<decltype(tag)>(p, x, y, hd, static_cast<float>(dropout_p), s);
  });
  return {y, hd};
}

// ---------------------------------------------------------------------------------------------
// Backward, per block of kRowBlock rows (the parallel unit):
//   pass 1, per row: dhw_e = s dy U_e (2 r/g dot products per group), dy . u_e, dw_e, dh;
//   pass 2, per column tile of kColTile, per row: dx = dy + dh A, and into the block's fp32
//   partial dA += dh x, dU_e^T += (s w_e hd) dy, du_e += s w_e dy (tile-sized, in L1).
// Then the partials are summed in block order (parallel over elements) and the per-row routing
// gradients into the table in row order. RAM: dy, x read, dx written once (3 M d e).
// ---------------------------------------------------------------------------------------------
struct Partial {   // offsets into one block's partial row of `total` floats
  int64_t dA, dUb, dUd, dub, dud, da, total;
  Partial(int64_t r, int64_t rg, int64_t d)
      : dA(0), dUb(r * d), dUd(dUb + rg * d), dub(dUd + rg * d), dud(dub + d), da(dud + d), total(da + r) {}
};

template <typename scalar_t>
void backward_blocks(const Params& p, const at::Tensor& dy, const at::Tensor& x, const float* hds, at::Tensor& dx,
                     float* partials, float* dw_rows, float dropout_p, uint64_t seed) {
  const int64_t M = p.batch * p.tokens, d = p.d, r = p.r, rg = p.rg, dg = p.dg;
  const Partial layout(r, rg, d);
  const scalar_t *dys = dy.data_ptr<scalar_t>(), *xs = x.data_ptr<scalar_t>();
  scalar_t* dxs = dx.data_ptr<scalar_t>();
  const float *A = p.a_w.data_ptr<float>(), *UbT = p.ub_t.data_ptr<float>(), *UdT = p.ud_t.data_ptr<float>(),
              *ub = p.ub.data_ptr<float>(), *ud = p.ud.data_ptr<float>(), *w = p.routing.data_ptr<float>();
  const float s = static_cast<float>(p.scale);
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
    constexpr bool kFloat = std::is_same_v<scalar_t, float>;
    std::vector<float> dy_buf(kFloat ? 0 : kRowBlock * d), x_buf(kFloat ? 0 : kRowBlock * d), dx_tile(kColTile);
    std::vector<float> dh(kRowBlock * r), hw0(kRowBlock * r), hw1(kRowBlock * r), sw(kRowBlock * 2), mask(r),
        dhw0(r), dhw1(r);
    std::vector<const float*> dy_rows(kRowBlock), x_rows(kRowBlock), a_rows(r);
    for (int64_t block = block_begin; block < block_end; ++block) {
      const int64_t m0 = block * kRowBlock, rows = std::min(kRowBlock, M - m0);
      float* part = partials + block * layout.total;
      std::fill(part, part + layout.total, 0.0f);
      for (int64_t q = 0; q < rows; ++q) {   // pass 1
        const int64_t m = m0 + q;
        dy_rows[q] = row_as_float(dys, row_offset(dy, m, p.tokens), d, kFloat ? nullptr : dy_buf.data() + q * d);
        x_rows[q] = row_as_float(xs, row_offset(x, m, p.tokens), d, kFloat ? nullptr : x_buf.data() + q * d);
        const float* g = dy_rows[q];
        const float* hd = hds + m * r;
        for (int64_t k = 0; k * dg < d; ++k) {
          for (int64_t j = 0; j < rg; j += 4) {
            const int64_t n = std::min<int64_t>(4, rg - j);
            dot4(g + k * dg, UbT + j * d + k * dg, d, n, dg, dhw0.data() + k * rg + j);
            dot4(g + k * dg, UdT + j * d + k * dg, d, n, dg, dhw1.data() + k * rg + j);
          }
        }
        for (int64_t i = 0; i < r; ++i) dhw0[i] *= s, dhw1[i] *= s;
        float dw0 = s * dot(g, ub, d), dw1 = s * dot(g, ud, d);
        for (int64_t i = 0; i < r; ++i) dw0 += hd[i] * dhw0[i], dw1 += hd[i] * dhw1[i];
        dw_rows[2 * m] = dw0, dw_rows[2 * m + 1] = dw1;
        const int64_t t = p.table_row(m);
        const float w0 = w[2 * t], w1 = w[2 * t + 1];
        if (dropout_p > 0) dropout_row(seed, m, r, dropout_p, mask.data());
        for (int64_t i = 0; i < r; ++i) {
          dh[q * r + i] = (w0 * dhw0[i] + w1 * dhw1[i]) * (dropout_p > 0 ? mask[i] : 1.0f);
          hw0[q * r + i] = s * w0 * hd[i], hw1[q * r + i] = s * w1 * hd[i];
          part[layout.da + i] += dh[q * r + i];
        }
        sw[2 * q] = s * w0, sw[2 * q + 1] = s * w1;
      }
      for (int64_t c0 = 0; c0 < d; c0 += kColTile) {   // pass 2
        const int64_t c1 = std::min(d, c0 + kColTile), width = c1 - c0;
        for (int64_t i = 0; i < r; ++i) a_rows[i] = A + i * d + c0;
        for (int64_t q = 0; q < rows; ++q) {   // dx = dy + dh A, one store per element
          const float *g = dy_rows[q] + c0, *dhq = dh.data() + q * r;
          float* out = kFloat ? reinterpret_cast<float*>(dxs + (m0 + q) * d) + c0 : dx_tile.data();
          add_rows(g, a_rows.data(), dhq, r, out, width);
          if constexpr (!kFloat) at::vec::convert(out, dxs + (m0 + q) * d + c0, width);
        }
        // The block's rows summed into the tile of each gradient, eight outputs at a time.
        for (int64_t i = 0; i < r; i += 8) {   // dA += dh^T x
          accumulate_rows(rows, x_rows.data(), dh.data() + i, r, std::min<int64_t>(8, r - i),
                          part + layout.dA + i * d, d, c0, c1);
        }
        for (int64_t k = c0 / dg; k * dg < c1; ++k) {   // dU_e^T += (s w_e hd)^T dy, the groups this tile meets
          const int64_t lo = std::max(c0, k * dg), hi = std::min(c1, (k + 1) * dg);
          for (int64_t j = 0; j < rg; j += 8) {
            const int64_t n = std::min<int64_t>(8, rg - j);
            accumulate_rows(rows, dy_rows.data(), hw0.data() + k * rg + j, r, n, part + layout.dUb + j * d, d, lo, hi);
            accumulate_rows(rows, dy_rows.data(), hw1.data() + k * rg + j, r, n, part + layout.dUd + j * d, d, lo, hi);
          }
        }
        accumulate_rows(rows, dy_rows.data(), sw.data(), 2, 2, part + layout.dub, d, c0, c1);   // du_e (dud = dub + d)
      }
    }
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
  const at::Tensor x = unit_inner_stride(x_in), dy = unit_inner_stride(dy_in), hd = hd_in.contiguous();
  const int64_t M = p.batch * p.tokens, d = p.d, r = p.r, rg = p.rg;
  const Partial layout(r, rg, d);
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor partials = at::empty({blocks, layout.total}, x.options().dtype(at::kFloat));
  at::Tensor dw_rows = at::empty({M, 2}, x.options().dtype(at::kFloat));
  const uint64_t s = seed_of(dropout_p, seed);
  dispatch_kernel_dtype(x.scalar_type(), "mm_adapter (native)", [&](auto tag) {
    backward_blocks<decltype(tag)>(p, dy, x, hd.data_ptr<float>(), dx, partials.data_ptr<float>(),
                              dw_rows.data_ptr<float>(), static_cast<float>(dropout_p), s);
  });
  // The blocks' partials summed in block order, parallel over elements.
  at::Tensor total = at::zeros({layout.total}, x.options().dtype(at::kFloat));
  const float* parts = partials.data_ptr<float>();
  float* sum = total.data_ptr<float>();
  at::parallel_for(0, layout.total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t block = 0; block < blocks; ++block) {
      const float* row = parts + block * layout.total;
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
  auto piece = [&](int64_t offset, at::IntArrayRef shape) {
    int64_t n = 1;
    for (auto size : shape) n *= size;
    return total.narrow(0, offset, n).view(shape);
  };
  return {dx,
          d_routing,
          piece(layout.dA, {r, d}).clone(),
          piece(layout.da, {r}).clone(),
          piece(layout.dUb, {rg, d}).t().contiguous(),
          piece(layout.dub, {d}).clone(),
          piece(layout.dUd, {rg, d}).t().contiguous(),
          piece(layout.dud, {d}).clone()};
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
