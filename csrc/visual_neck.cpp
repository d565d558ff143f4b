// The visual neck on CPU tensors: the forward and backward of `lavin_fast::visual_neck_fwd/bwd`
// (kernels/visual_neck.py holds the schema, the Triton kernels and the math in full).
//
//     pre    = x W1^T + b1                       [M, H1]   H1 = h (silu) or 2h (swiglu)
//     hidden = silu(pre)  |  silu(pre_g) * pre_v [M, h]
//     y      = hidden W2^T + b2                  [M, d_out]
// Backward, s = sigmoid, silu'(p) = s(p) (1 + p (1 - s(p))):
//     dhidden = dy W2;  dpre = dhidden * silu'(pre)  |  [dhidden pre_v silu'(pre_g), dhidden silu(pre_g)]
//     dx = dpre W1;  dW1 = dpre^T x;  db1 = sum_m dpre;  dW2 = dy^T hidden;  db2 = sum_m dy
//
// The four products go to ATen's fp32 GEMM (the neck is matmul-bound at LaVIN's widths: M = 6
// taps x batch rows against 1024 x 128 and 128 x 4096 weights, ~2.5 MB of fp32 weights read once
// per call); what is fused here is the activation: one vectorised pass over pre makes hidden
// forward, and dpre with the recomputed hidden backward (hidden never round-trips through a
// separate elementwise op). Bytes beyond the weights: M (d_in + d_out) e for x and y, 4 M H1 for
// pre forward; M (d_in + d_out) e + 4 M (H1 + 2 h) backward. fp32 throughout (16-bit x and dy
// converted once), results rounded to x's dtype once.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "vec_rows.h"

namespace lavin_fast_native {
namespace {

inline Vec sigmoid(const Vec& p) { return Vec(1.0f) / (Vec(1.0f) + p.neg().exp()); }

bool is_swiglu(const std::string& activation) {
  TORCH_CHECK(activation == "silu" || activation == "swiglu",
              "visual_neck (native): activation must be 'silu' or 'swiglu', got '", activation, "'");
  return activation == "swiglu";
}

// hidden [M, h] from pre [M, H1], one vectorised pass.
at::Tensor activate(const at::Tensor& pre, bool swiglu) {
  const int64_t M = pre.size(0), H1 = pre.size(1), h = swiglu ? H1 / 2 : H1;
  at::Tensor hidden = at::empty({M, h}, pre.options());
  const float* ps = pre.data_ptr<float>();
  float* hs = hidden.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float* g = ps + m * H1;   // the gate (silu: the whole row)
      const float* v = g + h;         // swiglu's value half
      float* out = hs + m * h;
      int64_t c = 0;
      for (; c + Vec::size() <= h; c += Vec::size()) {
        const Vec pg = Vec::loadu(g + c);
        Vec y = pg * sigmoid(pg);
        if (swiglu) y = y * Vec::loadu(v + c);
        y.store(out + c);
      }
      for (; c < h; ++c) {
        const float s = 1.0f / (1.0f + std::exp(-g[c]));
        out[c] = g[c] * s * (swiglu ? v[c] : 1.0f);
      }
    }
  });
  return hidden;
}

// (dpre [M, H1], hidden [M, h]) from pre and dhidden, one vectorised pass.
std::tuple<at::Tensor, at::Tensor> activation_backward(const at::Tensor& pre, const at::Tensor& dhidden,
                                                       bool swiglu) {
  const int64_t M = pre.size(0), H1 = pre.size(1), h = swiglu ? H1 / 2 : H1;
  at::Tensor dpre = at::empty_like(pre), hidden = at::empty({M, h}, pre.options());
  const float *ps = pre.data_ptr<float>(), *dhs = dhidden.data_ptr<float>();
  float *dps = dpre.data_ptr<float>(), *hs = hidden.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      const float *g = ps + m * H1, *v = g + h, *dh = dhs + m * h;
      float *dg = dps + m * H1, *dv = dg + h, *out = hs + m * h;
      int64_t c = 0;
      const Vec one(1.0f);
      for (; c + Vec::size() <= h; c += Vec::size()) {
        const Vec pg = Vec::loadu(g + c), s = sigmoid(pg), silu = pg * s, d = Vec::loadu(dh + c);
        const Vec dsilu = s * (one + pg * (one - s));
        if (swiglu) {
          const Vec pv = Vec::loadu(v + c);
          (d * pv * dsilu).store(dg + c);
          (d * silu).store(dv + c);
          (silu * pv).store(out + c);
        } else {
          (d * dsilu).store(dg + c);
          silu.store(out + c);
        }
      }
      for (; c < h; ++c) {
        const float s = 1.0f / (1.0f + std::exp(-g[c])), silu = g[c] * s, dsilu = s * (1.0f + g[c] * (1.0f - s));
        if (swiglu) {
          dg[c] = dh[c] * v[c] * dsilu, dv[c] = dh[c] * silu, out[c] = silu * v[c];
        } else {
          dg[c] = dh[c] * dsilu, out[c] = silu;
        }
      }
    }
  });
  return {dpre, hidden};
}

at::Tensor rows_f32(const at::Tensor& t) { return t.reshape({-1, t.size(-1)}).to(at::kFloat).contiguous(); }

void check_dtype(const at::Tensor& x) {
  dispatch_kernel_dtype(x.scalar_type(), "visual_neck (native)", [](auto) {});
  TORCH_CHECK(x.device().is_cpu(), "visual_neck (native): tensors must be on the CPU, x is on ", x.device());
}

std::tuple<at::Tensor, at::Tensor> visual_neck_fwd(const at::Tensor& x, const at::Tensor& in_weight,
                                                   const at::Tensor& in_bias, const at::Tensor& out_weight,
                                                   const at::Tensor& out_bias, const std::string& activation) {
  check_dtype(x);
  const bool swiglu = is_swiglu(activation);
  const int64_t h = out_weight.size(1);
  TORCH_CHECK(in_weight.dim() == 2 && in_weight.size(0) == (swiglu ? 2 : 1) * h && in_weight.size(1) == x.size(-1),
              "visual_neck (native): in_weight must be [", (swiglu ? 2 : 1) * h, ", ", x.size(-1), "], got ",
              in_weight.sizes());
  const at::Tensor x32 = rows_f32(x);
  const at::Tensor pre = at::addmm(in_bias.to(at::kFloat), x32, in_weight.to(at::kFloat).t());
  const at::Tensor y = at::addmm(out_bias.to(at::kFloat), activate(pre, swiglu), out_weight.to(at::kFloat).t());
  std::vector<int64_t> lead(x.sizes().begin(), x.sizes().end() - 1);
  auto shaped = [&](const at::Tensor& t) {
    std::vector<int64_t> shape(lead);
    shape.push_back(t.size(1));
    return t.view(shape);
  };
  return {shaped(y.to(x.scalar_type())), shaped(pre)};
}

std::vector<at::Tensor> visual_neck_bwd(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& in_weight,
                                        const at::Tensor& out_weight, const at::Tensor& pre,
                                        const std::string& activation) {
  check_dtype(x);
  const bool swiglu = is_swiglu(activation);
  TORCH_CHECK(pre.scalar_type() == at::kFloat && pre.size(-1) == in_weight.size(0),
              "visual_neck (native): pre must be the forward's fp32 [..., ", in_weight.size(0), "], got ",
              pre.scalar_type(), " ", pre.sizes());
  const at::Tensor dy32 = rows_f32(dy), x32 = rows_f32(x), pre32 = rows_f32(pre);
  const at::Tensor w1 = in_weight.to(at::kFloat), w2 = out_weight.to(at::kFloat);
  auto [dpre, hidden] = activation_backward(pre32, dy32.mm(w2).contiguous(), swiglu);
  const at::Tensor dx = dpre.mm(w1).to(x.scalar_type()).view(x.sizes());
  return {dx, dpre.t().mm(x32), dpre.sum(0), dy32.t().mm(hidden), dy32.sum(0)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lavin_fast_native, m) {
  m.def("visual_neck_fwd", &visual_neck_fwd);
  m.def("visual_neck_bwd", &visual_neck_bwd);
}

}  // namespace lavin_fast_native
