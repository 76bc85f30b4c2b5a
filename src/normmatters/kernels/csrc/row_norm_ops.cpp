// The per-sample (row) Lp normalization kernels of row_norm_kernels.h as `normmatters::` operators
// (TORCH_LIBRARY_FRAGMENT: the namespace is defined in ops.cpp). Fake implementations and the kernels of the
// other devices (a composite of torch ops) are registered from Python (normmatters/kernels/row_native.py); the
// autograd of lp_row_norm_fwd is the C++ autograd Function below.
//
//   lp_row_norm(x, weight?, bias?, n, norm, centered, c, eps, k, chunks, groups, spatial) -> y
//       the entry point of every call (CompositeImplicitAutograd): x of any shape holding rows of n contiguous
//       elements (x.reshape(-1, n)), y of x's shape; runs lp_row_norm_fwd, differentiable through it
//
//   lp_row_norm_fwd(x, weight?, bias?, norm, centered, c, eps, k, chunks, groups, spatial)
//       -> (y, mean, raw, aux)
//       x (R, n) contiguous float32/float64/bfloat16/float16; mean (R,) centered else (0,), raw (R,) and aux
//       (R,) for top-k (the k-th largest |d|) else (0,), in the compute dtype (float32 for 16-bit x);
//       weight / bias (groups * n / spatial,): per element for layer / RMS norm (groups = spatial = 1), per
//       channel of spatial elements for group norm (row r holds group r % groups)
//   lp_row_norm_bwd(grad_y, x, weight?, mean, raw, aux, norm, centered, c, eps, k, chunks, groups, spatial,
//       need_x, need_w, need_b) -> (grad_x, grad_w, grad_b)   (grad_w / grad_b flat (A,) in the compute dtype;
//       empty (0,) when not needed)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <string>

#include "row_norm_kernels.h"

namespace {

using at::Tensor;

int row_norm_code(c10::string_view norm) {
    if (norm == "l2") return NMR_L2;
    if (norm == "l1") return NMR_L1;
    if (norm == "linf") return NMR_LINF;
    if (norm == "range") return NMR_RANGE;
    if (norm == "topk") return NMR_TOPK;
    TORCH_CHECK(false, "normmatters::lp_row_norm: norm must be one of l2, l1, linf, range, topk, got '",
                std::string(norm), "'");
}

at::ScalarType row_acc(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf ? at::kFloat : t; }

struct RowShape {
    int64_t R, n, A;
};

RowShape check_rows(const Tensor &x, int code, int64_t k, int64_t chunks, int64_t groups, int64_t spatial,
                    const char *op) {
    TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got ", x.device());
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) >= 2, op,
                ": expected contiguous (rows, n >= 2) input, got shape ", x.sizes(), " strides ", x.strides());
    const auto st = x.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16 || st == at::kHalf, op,
                ": expected float32, float64, bfloat16 or float16 input, got ", st);
    const int64_t R = x.size(0), n = x.size(1);
    TORCH_CHECK(code != NMR_TOPK || (k >= 1 && k <= NMR_KMAX && k <= n), op, ": topk needs 1 <= k <= min(",
                NMR_KMAX, ", n), got k = ", k, ", n = ", n);
    TORCH_CHECK(code != NMR_RANGE || (chunks >= 1 && n % chunks == 0 && n / chunks >= 2), op,
                ": range needs chunks dividing n into chunks of >= 2, got chunks = ", chunks, ", n = ", n);
    TORCH_CHECK(groups >= 1 && spatial >= 1 && n % spatial == 0 && R % groups == 0, op,
                ": bad groups / spatial (", groups, ", ", spatial, ") for ", R, " rows of ", n);
    return {R, n, groups * (n / spatial)};
}

Tensor affine_in(const c10::optional<Tensor> &v, at::ScalarType acc, int64_t A, const char *op, const char *name) {
    if (!v.has_value() || !v->defined()) return Tensor();
    TORCH_CHECK(v->numel() == A, op, ": expected ", name, " of ", A, " elements, got ", v->sizes());
    if (v->scalar_type() == acc && v->is_contiguous()) return *v;  // read flat through its pointer: no view needed
    return v->reshape({-1}).to(acc).contiguous();
}

template <typename P>
P *rptr(const Tensor &t) { return t.defined() && t.numel() ? reinterpret_cast<P *>(t.data_ptr()) : nullptr; }

template <typename F>
auto by_row_dtype(at::ScalarType st, F &&f) {
    if (st == at::kFloat) return f(float{}, float{});
    if (st == at::kDouble) return f(double{}, double{});
    if (st == at::kBFloat16) return f(c10::BFloat16{}, float{});
    return f(c10::Half{}, float{});
}

std::tuple<Tensor, Tensor, Tensor, Tensor> row_fwd(const Tensor &x, const c10::optional<Tensor> &weight,
                                                   const c10::optional<Tensor> &bias, c10::string_view norm,
                                                   bool centered, double c, double eps, int64_t k, int64_t chunks,
                                                   int64_t groups, int64_t spatial) {
    const char *op = "normmatters::lp_row_norm_fwd";
    const int code = row_norm_code(norm);
    const RowShape s = check_rows(x, code, k, chunks, groups, spatial, op);
    const auto acc = row_acc(x.scalar_type());
    const auto vopt = x.options().dtype(acc);
    const Tensor w = affine_in(weight, acc, s.A, op, "weight"), b = affine_in(bias, acc, s.A, op, "bias");
    Tensor y = at::empty_like(x);
    Tensor mean = at::empty({centered ? s.R : 0}, vopt), raw = at::empty({s.R}, vopt);
    Tensor aux = at::empty({code == NMR_TOPK ? s.R : 0}, vopt);
    const int nt = at::get_num_threads();
    by_row_dtype(x.scalar_type(), [&](auto ts, auto tc) {
        using TS = decltype(ts);
        using T = decltype(tc);
        nmr_forward<TS, T>(rptr<const TS>(x), rptr<TS>(y), rptr<const T>(w), rptr<const T>(b), rptr<T>(mean),
                           rptr<T>(raw), rptr<T>(aux), s.R, s.n, code, centered, c, eps, (int)k, (int)chunks,
                           groups, spatial, nt);
        return 0;
    });
    return {y, mean, raw, aux};
}

std::tuple<Tensor, Tensor, Tensor> row_bwd(const Tensor &grad_y, const Tensor &x, const c10::optional<Tensor> &weight,
                                           const Tensor &mean, const Tensor &raw, const Tensor &aux,
                                           c10::string_view norm, bool centered, double c, double eps, int64_t k,
                                           int64_t chunks, int64_t groups, int64_t spatial, bool need_x,
                                           bool need_w, bool need_b) {
    const char *op = "normmatters::lp_row_norm_bwd";
    const int code = row_norm_code(norm);
    const RowShape s = check_rows(x, code, k, chunks, groups, spatial, op);
    TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y of shape ", grad_y.sizes(), " for input ", x.sizes());
    const auto acc = row_acc(x.scalar_type());
    const auto vopt = x.options().dtype(acc);
    const Tensor g = grad_y.scalar_type() == x.scalar_type() ? grad_y.contiguous() : grad_y.to(x.scalar_type()).contiguous();
    const Tensor w = affine_in(weight, acc, s.A, op, "weight");
    TORCH_CHECK(raw.numel() == s.R && (!centered || mean.numel() == s.R) && (code != NMR_TOPK || aux.numel() == s.R),
                op, ": statistics of the wrong size for ", s.R, " rows");
    const Tensor m = mean.to(acc).contiguous(), rw = raw.to(acc).contiguous(), ax = aux.to(acc).contiguous();
    const bool has_w = weight.has_value() && weight->defined();
    Tensor gx = need_x ? at::empty_like(x) : at::empty({0}, x.options());
    Tensor gw = need_w && has_w ? at::empty({s.A}, vopt) : Tensor();
    Tensor gb = need_b ? at::empty({s.A}, vopt) : Tensor();
    const int nt = at::get_num_threads();
    by_row_dtype(x.scalar_type(), [&](auto ts, auto tc) {
        using TS = decltype(ts);
        using T = decltype(tc);
        nmr_backward<TS, T>(rptr<const TS>(g), rptr<const TS>(x), need_x ? rptr<TS>(gx) : nullptr, rptr<const T>(w),
                            rptr<const T>(m), rptr<const T>(rw), rptr<const T>(ax), rptr<T>(gw), rptr<T>(gb), s.R,
                            s.n, code, centered, c, eps, (int)k, (int)chunks, groups, spatial, nt);
        return 0;
    });
    if (!gw.defined()) gw = at::empty({0}, vopt);
    if (!gb.defined()) gb = at::empty({0}, vopt);
    return {gx, gw, gb};
}

// Autograd of lp_row_norm_fwd as a C++ autograd Function (as lp_batch_norm_fwd in ops.cpp): per call it costs
// a few microseconds less than torch.library.register_autograd (a Python autograd.Function around the op), which
// at small shapes is most of the call. The forward redispatches below autograd to the device kernel (CPU: the
// native kernels; other devices: the Python composite of row_native.py); the backward calls lp_row_norm_bwd
// through the dispatcher, so both appear as operators in traced graphs. Once differentiable.
using FwdFn = std::tuple<Tensor, Tensor, Tensor, Tensor>(const Tensor &, const c10::optional<Tensor> &,
                                                         const c10::optional<Tensor> &, c10::string_view, bool,
                                                         double, double, int64_t, int64_t, int64_t, int64_t);
using BwdFn = std::tuple<Tensor, Tensor, Tensor>(const Tensor &, const Tensor &, const c10::optional<Tensor> &,
                                                 const Tensor &, const Tensor &, const Tensor &, c10::string_view,
                                                 bool, double, double, int64_t, int64_t, int64_t, int64_t, bool, bool,
                                                 bool);

c10::optional<Tensor> opt(const Tensor &t) { return t.defined() ? c10::optional<Tensor>(t) : c10::nullopt; }

class LpRowNormFwdAutograd : public torch::autograd::Function<LpRowNormFwdAutograd> {
  public:
    // weight / bias optional: absent ones are no autograd inputs, so the edges are x, then weight and bias if given
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext *ctx, const Tensor &x,
                                                  const c10::optional<Tensor> &weight,
                                                  const c10::optional<Tensor> &bias, c10::string_view norm,
                                                  bool centered, double c, double eps, int64_t k, int64_t chunks,
                                                  int64_t groups, int64_t spatial) {
        at::AutoDispatchBelowADInplaceOrView guard;
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("normmatters::lp_row_norm_fwd", "")
                             .typed<FwdFn>();
        auto [y, mean, raw, aux] = op.call(x, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial);
        const Tensor w = weight.value_or(Tensor()), b = bias.value_or(Tensor());
        ctx->save_for_backward({x, w, mean, raw, aux});
        ctx->saved_data["norm"] = std::string(norm);
        ctx->saved_data["centered"] = centered;
        ctx->saved_data["c"] = c;
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["k"] = k;
        ctx->saved_data["chunks"] = chunks;
        ctx->saved_data["groups"] = groups;
        ctx->saved_data["spatial"] = spatial;
        if (b.defined()) {
            ctx->saved_data["bias_sizes"] = b.sizes().vec();
            ctx->saved_data["bias_dtype"] = static_cast<int64_t>(b.scalar_type());
        }
        ctx->mark_non_differentiable({mean, raw, aux});
        ctx->set_materialize_grads(false);  // no zero tensors for the statistics' (never used) gradients
        return {y, mean, raw, aux};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const Tensor &x = saved[0], &weight = saved[1];
        const bool has_b = ctx->saved_data.count("bias_sizes") > 0;
        const bool has_w = weight.defined();
        const bool need_x = ctx->needs_input_grad(0), need_w = has_w && ctx->needs_input_grad(1),
                   need_b = has_b && ctx->needs_input_grad(has_w ? 2 : 1);
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("normmatters::lp_row_norm_bwd", "")
                             .typed<BwdFn>();
        const std::string norm = ctx->saved_data["norm"].toStringRef();
        const Tensor gy = grads[0].defined() ? grads[0] : at::zeros_like(x);
        auto [gx, gw, gb] = op.call(gy, x, opt(weight), saved[2], saved[3], saved[4], norm,
                                    ctx->saved_data["centered"].toBool(), ctx->saved_data["c"].toDouble(),
                                    ctx->saved_data["eps"].toDouble(), ctx->saved_data["k"].toInt(),
                                    ctx->saved_data["chunks"].toInt(), ctx->saved_data["groups"].toInt(),
                                    ctx->saved_data["spatial"].toInt(), need_x, need_w, need_b);
        Tensor rw, rb;
        if (need_w) rw = (gw.sizes() == weight.sizes() ? gw : gw.reshape(weight.sizes())).to(weight.scalar_type());
        if (need_b)
        {
            const auto sizes = ctx->saved_data["bias_sizes"].toIntVector();
            rb = (gb.sizes() == c10::IntArrayRef(sizes) ? gb : gb.reshape(sizes))
                     .to(static_cast<at::ScalarType>(ctx->saved_data["bias_dtype"].toInt()));
        }
        return {need_x ? gx : Tensor(), rw, rb, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor(),
                Tensor()};
    }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> row_fwd_autograd(const Tensor &x, const c10::optional<Tensor> &weight,
                                                            const c10::optional<Tensor> &bias, c10::string_view norm,
                                                            bool centered, double c, double eps, int64_t k,
                                                            int64_t chunks, int64_t groups, int64_t spatial) {
    auto out = LpRowNormFwdAutograd::apply(x, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial);
    return {out[0], out[1], out[2], out[3]};
}

// lp_row_norm: rows of n elements of any x, through lp_row_norm_fwd (CompositeImplicitAutograd: under autograd,
// torch.compile and torch.export it decomposes into the reshape and the forward operator).
Tensor row_norm(const Tensor &x, const c10::optional<Tensor> &weight, const c10::optional<Tensor> &bias, int64_t n,
                c10::string_view norm, bool centered, double c, double eps, int64_t k, int64_t chunks, int64_t groups,
                int64_t spatial) {
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("normmatters::lp_row_norm_fwd", "")
                         .typed<FwdFn>();
    TORCH_CHECK(n >= 1, "normmatters::lp_row_norm: rows of n >= 1 elements, got n = ", n);
    // already rows (the common layer-norm call on a 2-D input): no view in and out, so no view nodes in autograd
    if (x.dim() == 2 && !x.unsafeGetTensorImpl()->has_symbolic_sizes_strides() && x.size(1) == n &&
        x.is_contiguous())
        return std::get<0>(op.call(x, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial));
    // symbolic sizes (torch.compile, torch.export): reshape / view by SymInt
    const Tensor x2 = x.reshape_symint({c10::SymInt(-1), c10::SymInt(n)}).contiguous();
    return std::get<0>(op.call(x2, weight, bias, norm, centered, c, eps, k, chunks, groups, spatial))
        .view_symint(x.sym_sizes());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(normmatters, m) {
    m.def("lp_row_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, str norm, bool centered, float c, float eps, "
          "int k, int chunks, int groups, int spatial) -> (Tensor y, Tensor mean, Tensor raw, Tensor aux)");
    m.def("lp_row_norm_bwd(Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor raw, Tensor aux, str norm, "
          "bool centered, float c, float eps, int k, int chunks, int groups, int spatial, bool need_x, "
          "bool need_w, bool need_b) -> (Tensor grad_x, Tensor grad_w, Tensor grad_b)");
    m.def("lp_row_norm(Tensor x, Tensor? weight, Tensor? bias, int n, str norm, bool centered, float c, float eps, "
          "int k, int chunks, int groups, int spatial) -> Tensor");
}

TORCH_LIBRARY_IMPL(normmatters, CompositeImplicitAutograd, m) { m.impl("lp_row_norm", &row_norm); }

TORCH_LIBRARY_IMPL(normmatters, Autograd, m) { m.impl("lp_row_norm_fwd", &row_fwd_autograd); }

TORCH_LIBRARY_IMPL(normmatters, CPU, m) {
    m.impl("lp_row_norm_fwd", &row_fwd);
    m.impl("lp_row_norm_bwd", &row_bwd);
}
