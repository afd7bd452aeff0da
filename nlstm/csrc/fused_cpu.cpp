// The fused Nested LSTM's two time loops on CPU, in C++ (nlstm/fused/cpp.py builds and loads it).
//
// The Python loops (nlstm/fused/forward.py, backward.py) issue ~26 element-wise kernels and a few
// GEMMs per step; at small widths the dispatch of those kernels is the step. Here each step issues
// the same GEMMs through ATen (into the same buffers) and does the element-wise work of each level
// as one plain loop over the elements, which the compiler vectorises (no intrinsics, no OpenMP of
// our own: the GEMMs use torch's threads, the loops run on the calling thread).
//
// The buffers and their layouts are the Python loops' (nlstm/fused/buffers.py), and so is the
// arithmetic: G[k] rows are [i, f, o, g | c_prev] after activation, the g rows of the weights are
// scaled by -2 where g is a tanh (g = 1 - 2 sigmoid(-2z)), S[k] = sigmoid(-2 c), and the backward
// writes the gate pre-activation gradients dA[k] in the kernel's row order i, f, o, g. So either
// loop can follow the other's forward, and the weight gradients after the backward loop stay in
// Python (a few large GEMMs over all steps).
//
// exp is computed here (sigmoid = 1 / (1 + exp(-x))), branch-free so that it vectorises: glibc's
// exp is only vectorised under -ffast-math, which this file must not use (it changes rounding and
// would set flush-to-zero for the whole process). Its error is ~1 ulp (Taylor polynomial on
// |r| <= ln2/2 after Cody-Waite reduction), far below the 1e-10 the float64 tests ask for.

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

using at::Tensor;

template <typename T>
struct ExpConst;

template <>
struct ExpConst<float> {
  using Int = int32_t;
  static constexpr float lo = -87.0f, hi = 88.0f;
  static constexpr float log2e = 1.44269504088896341f;
  static constexpr float ln2_hi = 0.693145751953125f, ln2_lo = 1.42860682030941723212e-6f;
  static constexpr float shifter = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  static constexpr int32_t shifter_bits = 0x4B400000, bias = 127, mant = 23;
  static constexpr int terms = 8;  // 1/7! * r^7 ~ 5e-9 relative: below float's 6e-8
};

template <>
struct ExpConst<double> {
  using Int = int64_t;
  static constexpr double lo = -708.0, hi = 709.0;
  static constexpr double log2e = 1.44269504088896338700;
  static constexpr double ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10;
  static constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52
  static constexpr int64_t shifter_bits = 0x4338000000000000LL, bias = 1023, mant = 52;
  static constexpr int terms = 14;  // r^14 / 14! ~ 4e-18 relative: below double's 1.1e-16
};

// exp(x) for x in [lo, hi] (clamped outside; NaN propagates), branch-free.
template <typename T>
inline T vexp(T x) {
  using C = ExpConst<T>;
  using I = typename C::Int;
  x = x < C::lo ? C::lo : x;
  x = x > C::hi ? C::hi : x;
  const T shifted = x * C::log2e + C::shifter;
  const T k = shifted - C::shifter;  // round(x / ln2)
  const T r = (x - k * C::ln2_hi) - k * C::ln2_lo;
  T p = T(1);
  // Horner on the Taylor series 1 + r + r^2/2! + ... (coefficients 1/m!, unrolled by the compiler)
  for (int m = C::terms - 1; m >= 1; --m) p = T(1) + p * (r * (T(1) / T(m)));
  I bits;
  std::memcpy(&bits, &shifted, sizeof(T));
  bits = (bits - C::shifter_bits + C::bias) << C::mant;  // 2^k
  T scale;
  std::memcpy(&scale, &bits, sizeof(T));
  return p * scale;
}

template <typename T>
inline T sigm(T x) {
  return T(1) / (T(1) + vexp(-x));
}

// ---------------------------------------------------------------------------------------------
// oneDNN's small-batch GEMM on prepacked weights (what the Python loops use for CPU float32; on
// AMD CPUs it runs the per-step products well ahead of MKL's). Looked up once; the caller checks
// with a tiny call that this torch build has it (nlstm/fused/cpp.py), else passes no packed weights.

using ScalarList = c10::List<std::optional<at::Scalar>>;

Tensor onednn_linear(const Tensor& x, const Tensor& packed, const std::optional<Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&, c10::string_view,
                                     ScalarList, std::optional<c10::string_view>)>();
  return op.call(x, packed, bias, "none", ScalarList(), std::nullopt);
}

// x packed^T + other
Tensor onednn_linear_add(const Tensor& x, const Tensor& other, const Tensor& packed) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "binary")
                       .typed<Tensor(const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&,
                                     c10::string_view)>();
  return op.call(x, other, packed, std::nullopt, "add");
}

// ---------------------------------------------------------------------------------------------
// Forward: per step, level 0..D-1: GEMM, then one loop over each row's elements (activations from
// the GEMM's output, plus the bias where the GEMM had none, into the gate columns; the next
// level's [u ; r] = [i g ; f c_prev]); the innermost level's loop also makes c and then, level by
// level outwards, s = sigmoid(-2c) and h = o tanh(c) = o - 2 o s, which is the memory of the
// level outside (or the output).

template <typename T, bool TANH_G, bool BIAS>
inline void activate_row(const T* src, const T* __restrict bias, T* dst, int64_t n) {
  for (int64_t j = 0; j < 3 * n; ++j) dst[j] = sigm(BIAS ? src[j] + bias[j] : src[j]);
  for (int64_t j = 3 * n; j < 4 * n; ++j) {
    const T z = BIAS ? src[j] + bias[j] : src[j];
    dst[j] = TANH_G ? T(1) - T(2) * sigm(z) : z;
  }
}

template <typename T>
inline void activate(bool tanh_g, const T* src, const T* bias, T* dst, int64_t n) {
  if (tanh_g) {
    if (bias) activate_row<T, true, true>(src, bias, dst, n); else activate_row<T, true, false>(src, bias, dst, n);
  } else {
    if (bias) activate_row<T, false, true>(src, bias, dst, n); else activate_row<T, false, false>(src, bias, dst, n);
  }
}

template <typename T>
void forward_steps(const Tensor& h0, at::TensorList G, at::TensorList UR, at::TensorList S, const Tensor& out,
                   const Tensor& wh0t, const std::vector<Tensor>& wcatt, at::TensorList bk,
                   c10::IntArrayRef tanh_g, bool train, const Tensor& xp, const std::optional<Tensor>& ph0,
                   at::TensorList pcat) {
  const int64_t depth = G.size(), inner = depth - 1;
  const int64_t T_ = out.size(0), B = out.size(1), n = out.size(2);
  const bool mk = ph0.has_value();
  std::vector<T*> g_ptr(depth), s_ptr(depth), ur_ptr(depth, nullptr);
  std::vector<const T*> b_ptr(depth, nullptr);
  for (int64_t k = 0; k < depth; ++k) {
    g_ptr[k] = G[k].data_ptr<T>();
    s_ptr[k] = S[k].data_ptr<T>();
    if (k >= 1) {
      ur_ptr[k] = UR[k - 1].data_ptr<T>();
      b_ptr[k] = bk[k - 1].data_ptr<T>();
    }
  }
  T* out_ptr = out.data_ptr<T>();
  const int64_t gs = B * 5 * n;  // one step of G
  for (int64_t t = 0; t < T_; ++t) {
    for (int64_t k = 0; k < depth; ++k) {
      T* gk = g_ptr[k] + t * gs;
      const T* src = gk;  // the pre-activations: in the gate columns, or the oneDNN GEMM's output
      int64_t ld = 5 * n;
      const T* bias = nullptr;
      Tensor a;
      const Tensor h_prev = t == 0 ? h0 : out.select(0, t - 1);
      if (mk) {
        a = k == 0 ? onednn_linear_add(h_prev, xp.select(0, t), *ph0)
                   : onednn_linear(UR[k - 1].select(0, t), pcat[k - 1], bk[k - 1]);
        TORCH_CHECK(a.is_contiguous() && a.scalar_type() == out.scalar_type(), "unexpected oneDNN output");
        src = a.data_ptr<T>();
        ld = 4 * n;
      } else {
        Tensor gates = G[k].select(0, t).narrow(1, 0, 4 * n);
        if (k == 0) {
          gates.addmm_(h_prev, wh0t);  // onto the hoisted input projection (bias included)
        } else {
          at::mm_out(gates, UR[k - 1].select(0, t), wcatt[k - 1]);
          bias = b_ptr[k];
        }
      }
      const bool tg = tanh_g[k] != 0;
      for (int64_t b = 0; b < B; ++b) {
        T* row = gk + b * 5 * n;
        activate<T>(tg, src + b * ld, bias, row, n);
        const T* __restrict i = row;
        const T* __restrict f = row + n;
        const T* __restrict g = row + 3 * n;
        const T* __restrict cp = row + 4 * n;
        if (k < inner) {
          T* __restrict ur = ur_ptr[k + 1] + (t * B + b) * 2 * n;
          for (int64_t j = 0; j < n; ++j) {
            ur[j] = i[j] * g[j];
            ur[n + j] = f[j] * cp[j];
          }
        } else {
          T* __restrict c = g_ptr[k] + (t + 1) * gs + b * 5 * n + 4 * n;
          for (int64_t j = 0; j < n; ++j) c[j] = i[j] * g[j] + f[j] * cp[j];
          for (int64_t l = inner; l >= 0; --l) {  // outwards: h^l = o tanh(c^l) is c^{l-1}
            const T* __restrict cl = g_ptr[l] + (t + 1) * gs + b * 5 * n + 4 * n;
            const T* __restrict o = g_ptr[l] + t * gs + b * 5 * n + 2 * n;
            T* __restrict h = l == 0 ? out_ptr + (t * B + b) * n : g_ptr[l - 1] + (t + 1) * gs + b * 5 * n + 4 * n;
            if (train) {
              T* __restrict s = s_ptr[l] + (t * B + b) * n;
              for (int64_t j = 0; j < n; ++j) {
                const T sj = sigm(T(-2) * cl[j]);
                s[j] = sj;
                h[j] = o[j] - T(2) * o[j] * sj;
              }
            } else {
              for (int64_t j = 0; j < n; ++j) h[j] = o[j] - T(2) * o[j] * sigm(T(-2) * cl[j]);
            }
          }
        }
      }
    }
  }
}

// forward(x, h0, c0, wx0, wh0, b0, wcat, bk, tanh_g, G, UR, S, out, train, ph0, pcat): fills G,
// UR, S (if train) and out as nlstm.fused.forward.forward_loop does (weights scaled, kernel
// order). wcat, bk, UR, pcat: levels 1..D-1. ph0 and pcat: the oneDNN-packed step weights (float32
// only), or None and [] for ATen's GEMMs. All buffers contiguous.
void forward(const Tensor& x, const Tensor& h0, at::TensorList c0, const Tensor& wx0, const Tensor& wh0,
             const Tensor& b0, at::TensorList wcat, at::TensorList bk, c10::IntArrayRef tanh_g, at::TensorList G,
             at::TensorList UR, at::TensorList S, const Tensor& out, bool train, const std::optional<Tensor>& ph0,
             at::TensorList pcat) {
  const int64_t depth = G.size();
  TORCH_CHECK(depth >= 1 && static_cast<int64_t>(c0.size()) == depth && static_cast<int64_t>(S.size()) == depth &&
                  static_cast<int64_t>(tanh_g.size()) == depth && static_cast<int64_t>(wcat.size()) == depth - 1 &&
                  static_cast<int64_t>(bk.size()) == depth - 1 && static_cast<int64_t>(UR.size()) == depth - 1,
              "nlstm fused_cpu.forward: inconsistent depth");
  TORCH_CHECK(!ph0 || static_cast<int64_t>(pcat.size()) == depth - 1, "nlstm fused_cpu.forward: bad packed weights");
  const int64_t T_ = x.size(0), B = x.size(1), m = x.size(2), n = h0.size(1);
  for (const auto& t : G) TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "G must be contiguous CPU");
  for (const auto& t : UR) TORCH_CHECK(t.is_contiguous(), "UR must be contiguous");
  for (const auto& t : S) TORCH_CHECK(t.is_contiguous(), "S must be contiguous");
  for (const auto& t : bk) TORCH_CHECK(t.is_contiguous(), "biases must be contiguous");
  TORCH_CHECK(h0.is_contiguous() && out.is_contiguous() && out.size(0) == T_ && out.size(1) == B &&
                  out.size(2) == n, "bad h0 or out");
  for (int64_t k = 0; k < depth; ++k) G[k].select(0, 0).narrow(1, 4 * n, n).copy_(c0[k]);
  Tensor xp;  // the hoisted input projection: its own tensor (oneDNN) or the gate columns (ATen)
  if (ph0) {
    xp = onednn_linear(x.reshape({T_ * B, m}), wx0, b0).view({T_, B, 4 * n});
  } else {
    Tensor proj = G[0].narrow(0, 0, T_).view({T_ * B, 5 * n}).narrow(1, 0, 4 * n);
    at::addmm_out(proj, b0, x.reshape({T_ * B, m}), wx0.t());
  }
  std::vector<Tensor> wcatt;
  for (const auto& w : wcat) wcatt.push_back(w.t());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "nlstm_fused_cpu_forward", [&] {
    forward_steps<scalar_t>(h0, G, UR, S, out, wh0.t(), wcatt, bk, tanh_g, train, xp, ph0, pcat);
  });
}

// ---------------------------------------------------------------------------------------------
// Backward: per step (T-1 down to 0), dh = dout_t + dA^0_{t+1} W_h^0; then, outer to inner per
// element, d o^k, dc^k = carry^k + 4 dh^k o s (1 - s) (+ the memory trace's gradient), with
// dh^{k+1} = dc^k; then inner to outer the gates: level D-1 from dc, level k < D-1 from the GEMM
// d[u ; r] = dA^{k+1}_t Wcat^{k+1}; [di ; df] = [du g ; dr c_prev], dg = du i, carry = dr f.
// Weights unscaled; dA in kernel order i, f, o, g, gradients with respect to torch's gates.

template <typename T, bool TANH_G>
inline void gate_grads_row(const T* __restrict row, const T* __restrict du, const T* __restrict dr,
                           T* __restrict da, T* __restrict carry, int64_t n) {
  const T* __restrict i = row;
  const T* __restrict f = row + n;
  const T* __restrict g = row + 3 * n;
  const T* __restrict cp = row + 4 * n;
  for (int64_t j = 0; j < n; ++j) {
    const T dg = du[j] * i[j];
    da[j] = du[j] * g[j] * (T(1) - i[j]) * i[j];
    da[n + j] = dr[j] * cp[j] * (T(1) - f[j]) * f[j];
    da[3 * n + j] = TANH_G ? dg * (T(1) - g[j] * g[j]) : dg;
    carry[j] = dr[j] * f[j];
  }
}

template <typename T>
void backward_steps(const std::optional<Tensor>& dout, const std::optional<Tensor>& dh_last,
                    const std::vector<T*>& dmem, const Tensor& wh0, at::TensorList wcat, c10::IntArrayRef tanh_g,
                    at::TensorList G, at::TensorList S, at::TensorList dA, at::TensorList dc, at::TensorList carry,
                    const Tensor& dh_buf, const Tensor& dur, const std::optional<Tensor>& ph0t,
                    at::TensorList pcatt) {
  const int64_t depth = G.size(), inner = depth - 1;
  const bool mk = ph0t.has_value();
  const int64_t T_ = dA[0].size(0), B = dA[0].size(1), n = dh_buf.size(1);
  std::vector<T*> g_ptr(depth), s_ptr(depth), da_ptr(depth), dc_ptr(depth), carry_ptr(depth);
  for (int64_t k = 0; k < depth; ++k) {
    g_ptr[k] = G[k].data_ptr<T>();
    s_ptr[k] = S[k].data_ptr<T>();
    da_ptr[k] = dA[k].data_ptr<T>();
    dc_ptr[k] = dc[k].data_ptr<T>();
    carry_ptr[k] = carry[k].data_ptr<T>();
  }
  T* const dh_base = dh_buf.data_ptr<T>();
  const T* dout_ptr = dout ? dout->data_ptr<T>() : nullptr;
  const T* dhl_ptr = dh_last ? dh_last->data_ptr<T>() : nullptr;
  T* const dur_base = dur.data_ptr<T>();
  const int64_t gs = B * 5 * n;
  for (int64_t t = T_ - 1; t >= 0; --t) {
    // dh_t: the loss's, plus the recurrence into step t+1 (or the final state's gradient).
    T* dh_ptr = dh_base;
    Tensor dh_t;  // the oneDNN GEMM's output, kept alive for the step
    if (t == T_ - 1) {
      const T* a = dout_ptr ? dout_ptr + t * B * n : nullptr;
      for (int64_t e = 0; e < B * n; ++e) dh_ptr[e] = (a ? a[e] : T(0)) + (dhl_ptr ? dhl_ptr[e] : T(0));
    } else if (mk) {
      dh_t = dout ? onednn_linear_add(dA[0].select(0, t + 1), dout->select(0, t), *ph0t)
                  : onednn_linear(dA[0].select(0, t + 1), *ph0t, std::nullopt);
      TORCH_CHECK(dh_t.is_contiguous() && dh_t.scalar_type() == dh_buf.scalar_type(), "unexpected oneDNN output");
      dh_ptr = dh_t.data_ptr<T>();
    } else if (dout) {
      at::addmm_out(const_cast<Tensor&>(dh_buf), dout->select(0, t), dA[0].select(0, t + 1), wh0);
    } else {
      at::mm_out(const_cast<Tensor&>(dh_buf), dA[0].select(0, t + 1), wh0);
    }
    // Outer to inner: d o^k (as a pre-activation gradient) and dc^k; then the innermost gates.
    for (int64_t b = 0; b < B; ++b) {
      const T* __restrict d = dh_ptr + b * n;
      for (int64_t k = 0; k < depth; ++k) {
        const T* __restrict s = s_ptr[k] + (t * B + b) * n;
        const T* __restrict o = g_ptr[k] + t * gs + b * 5 * n + 2 * n;
        const T* __restrict cin = carry_ptr[k] + b * n;
        const T* __restrict dm = dmem[k] ? dmem[k] + (t * B + b) * n : nullptr;
        T* __restrict d_o = da_ptr[k] + (t * B + b) * 4 * n + 2 * n;
        T* __restrict dck = dc_ptr[k] + b * n;
        if (dm) {
          for (int64_t j = 0; j < n; ++j) {
            d_o[j] = (d[j] - T(2) * d[j] * s[j]) * (T(1) - o[j]) * o[j];
            dck[j] = cin[j] + T(4) * d[j] * (o[j] * (T(1) - s[j]) * s[j]) + dm[j];
          }
        } else {
          for (int64_t j = 0; j < n; ++j) {
            d_o[j] = (d[j] - T(2) * d[j] * s[j]) * (T(1) - o[j]) * o[j];
            dck[j] = cin[j] + T(4) * d[j] * (o[j] * (T(1) - s[j]) * s[j]);
          }
        }
        d = dck;
      }
      const T* row = g_ptr[inner] + t * gs + b * 5 * n;
      const T* dci = dc_ptr[inner] + b * n;  // c = f c_prev + i g: d[u ; r] is dc twice
      T* da = da_ptr[inner] + (t * B + b) * 4 * n;
      if (tanh_g[inner]) gate_grads_row<T, true>(row, dci, dci, da, carry_ptr[inner] + b * n, n);
      else gate_grads_row<T, false>(row, dci, dci, da, carry_ptr[inner] + b * n, n);
    }
    // Inner to outer: level k < D-1 gets d[u ; r] from level k+1's gate gradients.
    for (int64_t k = inner - 1; k >= 0; --k) {
      const T* dur_ptr = dur_base;
      Tensor d_in;  // the oneDNN GEMM's output, kept alive for the loop
      if (mk) {
        d_in = onednn_linear(dA[k + 1].select(0, t), pcatt[k], std::nullopt);
        TORCH_CHECK(d_in.is_contiguous() && d_in.scalar_type() == dur.scalar_type(), "unexpected oneDNN output");
        dur_ptr = d_in.data_ptr<T>();
      } else {
        at::mm_out(const_cast<Tensor&>(dur), dA[k + 1].select(0, t), wcat[k]);
      }
      for (int64_t b = 0; b < B; ++b) {
        const T* row = g_ptr[k] + t * gs + b * 5 * n;
        const T* du = dur_ptr + b * 2 * n;
        T* da = da_ptr[k] + (t * B + b) * 4 * n;
        if (tanh_g[k]) gate_grads_row<T, true>(row, du, du + n, da, carry_ptr[k] + b * n, n);
        else gate_grads_row<T, false>(row, du, du + n, da, carry_ptr[k] + b * n, n);
      }
    }
  }
}

// backward(dout, dh_last, dc_last, dmem, wh0, wcat, tanh_g, G, S, dA, dc, carry, dh_buf, dur, ph0t,
// pcatt): fills dA as nlstm.fused.backward.backward_loop does; afterwards carry[k] holds dc0^k.
// dout (T, B, n), dh_last, dc_last[k] (B, n), dmem[k] (T, B, n): contiguous or None. ph0t, pcatt:
// the oneDNN-packed transposed step weights (levels 1..D-1), or None and [] for ATen's GEMMs.
void backward(const std::optional<Tensor>& dout, const std::optional<Tensor>& dh_last,
              const c10::List<std::optional<Tensor>>& dc_last, const c10::List<std::optional<Tensor>>& dmem,
              const Tensor& wh0, at::TensorList wcat, c10::IntArrayRef tanh_g, at::TensorList G, at::TensorList S,
              at::TensorList dA, at::TensorList dc, at::TensorList carry, const Tensor& dh_buf, const Tensor& dur,
              const std::optional<Tensor>& ph0t, at::TensorList pcatt) {
  const int64_t depth = G.size();
  TORCH_CHECK(depth >= 1 && static_cast<int64_t>(S.size()) == depth && static_cast<int64_t>(dA.size()) == depth &&
                  static_cast<int64_t>(dc.size()) == depth && static_cast<int64_t>(carry.size()) == depth &&
                  static_cast<int64_t>(dc_last.size()) == depth && static_cast<int64_t>(dmem.size()) == depth &&
                  static_cast<int64_t>(tanh_g.size()) == depth && static_cast<int64_t>(wcat.size()) == depth - 1,
              "nlstm fused_cpu.backward: inconsistent depth");
  TORCH_CHECK(!ph0t || static_cast<int64_t>(pcatt.size()) == depth - 1, "nlstm fused_cpu.backward: bad packed weights");
  auto contiguous = [](const std::optional<Tensor>& t) { return !t || t->is_contiguous(); };
  TORCH_CHECK(contiguous(dout) && contiguous(dh_last), "dout and dh_last must be contiguous");
  for (const auto& t : {G, S, dA, dc, carry})
    for (const auto& u : t) TORCH_CHECK(u.is_contiguous(), "buffers must be contiguous");
  TORCH_CHECK(dh_buf.is_contiguous() && dur.is_contiguous(), "buffers must be contiguous");
  for (int64_t k = 0; k < depth; ++k) {
    const std::optional<Tensor> c = dc_last.get(k);
    if (c) carry[k].copy_(*c); else carry[k].zero_();
  }
  std::vector<Tensor> dm_keep;  // contiguous copies where needed (kept alive for the loop)
  for (int64_t k = 0; k < depth; ++k) {
    const std::optional<Tensor> d = dmem.get(k);
    dm_keep.push_back(d ? d->contiguous() : Tensor());
  }
  AT_DISPATCH_FLOATING_TYPES(G[0].scalar_type(), "nlstm_fused_cpu_backward", [&] {
    std::vector<scalar_t*> dm(depth, nullptr);
    for (int64_t k = 0; k < depth; ++k)
      if (dm_keep[k].defined()) dm[k] = dm_keep[k].data_ptr<scalar_t>();
    backward_steps<scalar_t>(dout, dh_last, dm, wh0, wcat, tanh_g, G, S, dA, dc, carry, dh_buf, dur, ph0t, pcatt);
  });
}

}  // namespace

TORCH_LIBRARY(nlstm_fused_cpu, m) {
  m.def("forward", &forward);
  m.def("backward", &backward);
}
