// The native kernels as PyTorch operators in the `normmatters` namespace: schemas (TORCH_LIBRARY) and the CPU
// implementations (TORCH_LIBRARY_IMPL(normmatters, CPU)); a CUDA kernel plugs in as another
// TORCH_LIBRARY_IMPL(normmatters, CUDA) under the same names. Fake (meta) implementations and autograd are
// registered from Python (normmatters/kernels/native/ops.py).
//
// Ops (x: (N, C, *) float32/float64/bfloat16, contiguous or channels-innermost; per-channel vectors (C,) in the
// compute dtype, float32 for bfloat16 x; norm one of mean, l2, l1, linf, range, topk; c the constant c(n)):
//   lp_batch_norm_fwd(x, weight, bias, norm, c, eps, k) -> (y, mean, raw, aux)
//       functional training forward; aux (A, C): range (2, C) int32 max/min positions (channel layout) or
//       max/min values (rows layout), topk (1, C) the k-th largest |d|, else (0, C)
//   lp_batch_norm_bwd(grad_y, x, weight, mean, raw, aux, norm, c, eps, k, need_x) -> (grad_x, grad_w, grad_b)
//       functional backward of the above; grad_x is empty (0,) when need_x is false
//   update_running_stats(mean, raw, running_mean!, running_var!, num_batches_tracked!, norm, c, momentum, n)
//       -> status: functional.update_running_stats with sigma = c * raw; a 0-dim int64, 1 updated, 0 non-finite
//       statistics, 2 finite statistics whose running_var would overflow (0 and 2: buffers unchanged)
//   lp_batch_norm_fwd_out / lp_batch_norm_bwd_out: the same kernels writing into caller-given outputs (the
//       eager path hands them pooled buffers, or x itself for in-place mode), the forward also updating the
//       running buffers in the same call, with explicit tuning (non-temporal stores, channels per task,
//       threads); not differentiable, for the eager autograd Functions in native_autograd.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>

#include "rows_kernels.h"

namespace {

using at::Tensor;

int norm_code(c10::string_view norm) {
    if (norm == "mean") return NM_MEAN;
    if (norm == "l2") return NM_L2;
    if (norm == "l1") return NM_L1;
    if (norm == "linf") return NM_LINF;
    if (norm == "range") return NM_RANGE;
    if (norm == "topk") return NM_TOPK;
    TORCH_CHECK(false, "normmatters native kernels: norm must be one of mean, l2, l1, linf, range, topk, got '",
                std::string(norm), "'");
}

at::ScalarType acc_of(at::ScalarType t) { return t == at::kBFloat16 ? at::kFloat : t; }

int64_t env_bytes(const char *name, int64_t fallback) {
    const char *v = std::getenv(name);
    const long long r = v ? std::atoll(v) : 0;
    return r > 0 ? r : fallback;
}

// the defaults of native.py's STREAM_BYTES and BLOCK_BYTES, read once
const int64_t kStreamBytes = env_bytes("NORMMATTERS_NATIVE_STREAM_BYTES", 1 << 20);
const int64_t kBlockBytes = env_bytes("NORMMATTERS_NATIVE_BLOCK_BYTES", 4 << 20);

struct Shape {
    int64_t N, C, S;
    bool channel;  // contiguous with S > 1: the channel kernels; else the rows kernels ((N*S, C) rows)
};

Shape check_input(const Tensor &x, const char *op) {
    TORCH_CHECK(x.device().is_cpu(), op, ": expected a CPU tensor, got ", x.device());
    TORCH_CHECK(x.dim() >= 2 && x.numel() > 0, op, ": expected non-empty (N, C, *) input, got shape ", x.sizes());
    const auto st = x.scalar_type();
    TORCH_CHECK(st == at::kFloat || st == at::kDouble || st == at::kBFloat16, op,
                ": expected float32, float64 or bfloat16 input, got ", st);
    const int64_t N = x.size(0), C = x.size(1), S = x.numel() / (N * C);
    const bool channel = x.is_contiguous() && S > 1;
    TORCH_CHECK(channel || (x.stride(1) == 1 && x.movedim(1, -1).is_contiguous()), op,
                ": expected contiguous or channels-innermost input, got strides ", x.strides());
    return {N, C, S, channel};
}

Tensor vector_in(const Tensor &v, at::ScalarType acc, int64_t C, const char *op, const char *name) {
    TORCH_CHECK(v.dim() == 1 && v.size(0) == C, op, ": expected ", name, " of shape (", C, "), got ", v.sizes());
    return v.scalar_type() == acc && v.is_contiguous() ? v : v.to(acc).contiguous();
}

struct Tuning {
    int stream;
    int64_t cb;
    int nt;
};

// threads <= 0: torch's thread count; stream < 0: native.py's _stream rule; block <= 0: _channel_block_for
Tuning tuning(const Tensor &x, const Shape &s, int64_t stream, int64_t block, int64_t threads) {
    Tuning t;
    t.nt = threads > 0 ? (int)threads : at::get_num_threads();
    const int64_t bytes = x.numel() * (int64_t)x.element_size();
    if (stream >= 0) {
        t.stream = (int)stream;
    } else {
        t.stream = bytes >= kStreamBytes && (!s.channel || (s.S * (int64_t)x.element_size()) % 64 == 0);
    }
    if (block > 0) {
        t.cb = block;
    } else {
        const int64_t fit = kBlockBytes / std::max<int64_t>(1, s.N * s.S * (int64_t)x.element_size());
        const int64_t share = (s.C + t.nt - 1) / std::max(1, t.nt);
        t.cb = std::max<int64_t>(1, std::min<int64_t>(std::min<int64_t>(fit, NM_CBMAX), share));
    }
    return t;
}

template <typename P>
P *ptr(const Tensor &t) { return t.defined() ? reinterpret_cast<P *>(t.data_ptr()) : nullptr; }
template <typename P>
P *ptr(const c10::optional<Tensor> &t) { return t.has_value() && t->defined() ? ptr<P>(*t) : nullptr; }

// Calls f(TS{}) with TS the element storage type of x: float, double or uint16_t (bfloat16 bits).
template <typename F>
auto by_dtype(at::ScalarType st, F &&f) {
    if (st == at::kFloat) return f(float{});
    if (st == at::kDouble) return f(double{});
    return f(uint16_t{});
}

bool bf16_buffers(const c10::optional<Tensor> &a, const c10::optional<Tensor> &b) {
    return (a.has_value() && a->defined() && a->scalar_type() == at::kBFloat16) ||
           (b.has_value() && b->defined() && b->scalar_type() == at::kBFloat16);
}

// The forward kernel into y (y may be x: in place), updating the given running buffers; returns the update's
// status: 1 updated, 0 non-finite statistics, 2 finite statistics whose running_var would overflow the buffer's
// dtype (0 and 2: every buffer unchanged); without buffers 1 or 0, the finite flag.
std::tuple<Tensor, Tensor, Tensor, int64_t> forward_into(
        const Tensor &x, const Tensor &weight, const Tensor &bias, c10::string_view norm, double c, double eps,
        int64_t k, const Tensor &y, const c10::optional<Tensor> &running_mean,
        const c10::optional<Tensor> &running_var, const c10::optional<Tensor> &nbt, double momentum,
        double unbias, int64_t stream, int64_t block, int64_t threads) {
    const char *op = "normmatters::lp_batch_norm_fwd";
    const Shape s = check_input(x, op);
    const int code = norm_code(norm);
    TORCH_CHECK(code != NM_TOPK || (k >= 1 && k <= NM_KMAX), op, ": topk needs 1 <= k <= ", NM_KMAX, ", got ", k);
    TORCH_CHECK(y.sizes() == x.sizes() && y.strides() == x.strides() && y.scalar_type() == x.scalar_type(), op,
                ": the output must have the input's shape, strides and dtype");
    const bool inplace = y.data_ptr() == x.data_ptr();
    const auto acc = acc_of(x.scalar_type());
    const auto vopt = x.options().dtype(acc);
    const Tensor w = vector_in(weight, acc, s.C, op, "weight"), b = vector_in(bias, acc, s.C, op, "bias");
    Tensor mean = at::empty({s.C}, vopt), raw = at::empty({s.C}, vopt);
    const bool want_pos = s.channel && code == NM_RANGE && !inplace;
    Tensor aux = want_pos ? at::empty({2, s.C}, x.options().dtype(at::kInt))
                          : at::empty({code == NM_RANGE ? 2 : code == NM_TOPK ? 1 : 0, s.C}, vopt);
    const Tuning t = tuning(x, s, stream, block, threads);
    const int buf_bf16 = bf16_buffers(running_mean, running_var);
    const int ok = by_dtype(x.scalar_type(), [&](auto tag) {
        using TS = decltype(tag);
        using T = typename NmElem<TS>::acc;
        T *hi = code == NM_TOPK || (code == NM_RANGE && !want_pos) ? ptr<T>(aux) : nullptr;
        T *lo = code == NM_RANGE && !want_pos ? ptr<T>(aux) + s.C : nullptr;
        T *rm = ptr<T>(running_mean), *rv = ptr<T>(running_var);
        int64_t *nb = ptr<int64_t>(nbt);
        if (s.channel) {
            return nm_forward<TS>(ptr<const TS>(x), ptr<TS>(y), ptr<const T>(w), ptr<const T>(b), ptr<T>(mean),
                                  ptr<T>(raw), hi, lo, s.N, s.C, s.S, code, c, eps, t.stream, t.nt, rm, rv, nb,
                                  momentum, unbias, buf_bf16, (int)k, t.cb, want_pos ? ptr<int32_t>(aux) : nullptr);
        }
        Tensor scratch = at::empty({4 * t.nt * s.C}, x.options().dtype(at::kDouble));
        Tensor tscratch = at::empty({(1 + 3 * t.nt) * s.C}, vopt);
        Tensor tops, topi;
        if (code == NM_TOPK) {  // per thread and channel: k values and a threshold; a count and a position
            tops = at::empty({t.nt * s.C * (k + 1)}, vopt);
            topi = at::empty({t.nt * 2 * s.C}, x.options().dtype(at::kInt));
        }
        return nm_forward_rows<TS>(ptr<const TS>(x), ptr<TS>(y), ptr<const T>(w), ptr<const T>(b), ptr<T>(mean),
                                   ptr<T>(raw), hi, lo, s.N * s.S, s.C, code, c, eps, t.nt, ptr<double>(scratch),
                                   ptr<T>(tscratch), rm, rv, nb, momentum, unbias, buf_bf16, t.stream, (int)k,
                                   ptr<T>(tops), ptr<int32_t>(topi));
    });
    return {mean, raw, aux, ok};
}

// The backward kernel into gx (undefined: no grad_x). In place (bias given) x is the output y that overwrote
// the input and the kernel rebuilds d and the thresholds from it (mean and aux unused).
std::tuple<Tensor, Tensor> backward_into(
        const Tensor &grad_y, const Tensor &x, const Tensor &weight, const c10::optional<Tensor> &mean,
        const Tensor &raw, const Tensor &aux, const c10::optional<Tensor> &bias, c10::string_view norm, double c,
        double eps, int64_t k, bool need_w, bool need_b, const Tensor &gx, int64_t stream, int64_t block,
        int64_t threads) {
    const char *op = "normmatters::lp_batch_norm_bwd";
    const Shape s = check_input(x, op);
    const int code = norm_code(norm);
    const auto acc = acc_of(x.scalar_type());
    const auto vopt = x.options().dtype(acc);
    TORCH_CHECK(grad_y.sizes() == x.sizes(), op, ": grad_y of shape ", grad_y.sizes(), " for input ", x.sizes());
    // the kernels read grad_y in x's layout
    const Tensor g = grad_y.scalar_type() == x.scalar_type() && grad_y.strides() == x.strides()
                         ? grad_y : at::empty_like(x).copy_(grad_y);
    if (gx.defined()) {
        TORCH_CHECK(gx.sizes() == x.sizes() && gx.strides() == x.strides() && gx.scalar_type() == x.scalar_type(),
                    op, ": grad_x must have the input's shape, strides and dtype");
    }
    const Tensor w = vector_in(weight, acc, s.C, op, "weight");
    const Tensor b = bias.has_value() && bias->defined() ? vector_in(*bias, acc, s.C, op, "bias") : Tensor();
    const Tensor r = vector_in(raw, acc, s.C, op, "raw");
    const Tensor m = mean.has_value() && mean->defined() ? vector_in(*mean, acc, s.C, op, "mean") : Tensor();
    TORCH_CHECK(b.defined() || m.defined(), op, ": needs mean (or, in place, the bias)");
    Tensor gw = need_w ? at::empty({s.C}, vopt) : Tensor();
    Tensor gb = need_b ? at::empty({s.C}, vopt) : Tensor();
    const Tuning t = tuning(x, s, stream, block, threads);
    by_dtype(x.scalar_type(), [&](auto tag) {
        using TS = decltype(tag);
        using T = typename NmElem<TS>::acc;
        const T *hi = nullptr, *lo = nullptr;
        const int32_t *pos = nullptr;
        if (!b.defined() && aux.numel()) {  // in place the kernel rebuilds its thresholds: aux unused
            if (aux.scalar_type() == at::kInt) {
                pos = ptr<const int32_t>(aux);  // range, channel kernels: the max/min positions
            } else {
                hi = ptr<const T>(aux);  // topk: tau; range (rows): max, then min
                if (code == NM_RANGE) lo = hi + s.C;
            }
        }
        if (s.channel) {
            nm_backward<TS>(ptr<const TS>(g), ptr<const TS>(x), ptr<TS>(gx), ptr<const T>(w), ptr<const T>(m),
                            ptr<const T>(r), hi, lo, ptr<T>(gw), ptr<T>(gb), s.N, s.C, s.S, code, c, eps, t.stream,
                            t.nt, (int)k, t.cb, pos, ptr<const T>(b));
        } else {
            Tensor scratch = at::empty({6 * t.nt * s.C}, x.options().dtype(at::kDouble));
            Tensor tscratch = at::empty({(10 + 6 * t.nt) * s.C}, vopt);
            nm_backward_rows<TS>(ptr<const TS>(g), ptr<const TS>(x), ptr<TS>(gx), ptr<const T>(w), ptr<const T>(m),
                                 ptr<const T>(r), hi, lo, ptr<T>(gw), ptr<T>(gb), s.N * s.S, s.C, code, c, eps, t.nt,
                                 ptr<double>(scratch), ptr<T>(tscratch), t.stream, (int)k, ptr<const T>(b));
        }
        return 0;
    });
    if (weight.scalar_type() != acc) {  // bfloat16 parameters of bfloat16 input
        if (gw.defined()) gw = gw.to(weight.scalar_type());
        if (gb.defined()) gb = gb.to(weight.scalar_type());
    }
    return {gw, gb};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> fwd(const Tensor &x, const Tensor &weight, const Tensor &bias,
                                               c10::string_view norm, const Tensor &c, double eps, int64_t k) {
    Tensor y = at::empty_like(x);
    auto [mean, raw, aux, ok] = forward_into(x, weight, bias, norm, c.item<double>(), eps, k, y, c10::nullopt,
                                             c10::nullopt, c10::nullopt, 0.0, 0.0, -1, 0, 0);
    (void)ok;
    return {y, mean, raw, aux};
}

std::tuple<Tensor, Tensor, Tensor> bwd(const Tensor &grad_y, const Tensor &x, const Tensor &weight,
                                       const Tensor &mean, const Tensor &raw, const Tensor &aux,
                                       c10::string_view norm, const Tensor &c, double eps, int64_t k, bool need_x) {
    Tensor gx = need_x ? at::empty_like(x) : Tensor();
    auto [gw, gb] = backward_into(grad_y, x, weight, mean, raw, aux, c10::nullopt, norm, c.item<double>(), eps, k,
                                  true, true, gx, -1, 0, 0);
    if (weight.scalar_type() != gw.scalar_type()) {
        gw = gw.to(weight.scalar_type());
        gb = gb.to(weight.scalar_type());
    }
    return {need_x ? gx : at::empty({0}, x.options()), gw, gb};
}

std::tuple<Tensor, Tensor, Tensor, int64_t> fwd_out(
        const Tensor &x, const Tensor &weight, const Tensor &bias, c10::string_view norm, double c, double eps,
        int64_t k, Tensor &y, const c10::optional<Tensor> &running_mean, const c10::optional<Tensor> &running_var,
        const c10::optional<Tensor> &nbt, double momentum, double unbias, int64_t stream, int64_t block,
        int64_t threads) {
    return forward_into(x, weight, bias, norm, c, eps, k, y, running_mean, running_var, nbt, momentum, unbias,
                        stream, block, threads);
}

std::tuple<Tensor, Tensor> bwd_out(
        const Tensor &grad_y, const Tensor &x, const Tensor &weight, const c10::optional<Tensor> &mean,
        const Tensor &raw, const Tensor &aux, const c10::optional<Tensor> &bias, c10::string_view norm, double c,
        double eps, int64_t k, bool need_w, bool need_b, const c10::optional<Tensor> &grad_x, int64_t stream,
        int64_t block, int64_t threads) {
    const Tensor gx = grad_x.has_value() ? *grad_x : Tensor();
    return backward_into(grad_y, x, weight, mean, raw, aux, bias, norm, c, eps, k, need_w, need_b, gx, stream,
                         block, threads);
}

Tensor update_running(const Tensor &mean, const Tensor &raw, const c10::optional<Tensor> &running_mean,
                      const c10::optional<Tensor> &running_var, const c10::optional<Tensor> &nbt,
                      c10::string_view norm, const Tensor &c, double momentum, c10::SymInt sym_n) {
    const int64_t n = sym_n.expect_int();
    const char *op = "normmatters::update_running_stats";
    const int code = norm_code(norm);
    const auto acc = mean.scalar_type();
    TORCH_CHECK(acc == at::kFloat || acc == at::kDouble, op, ": expected float32 or float64 statistics, got ", acc);
    const int64_t C = mean.numel();
    const Tensor m = vector_in(mean.reshape({-1}), acc, C, op, "mean");
    const Tensor r = vector_in(raw.reshape({-1}), acc, C, op, "raw");
    for (const auto *buf : {&running_mean, &running_var}) {
        if (buf->has_value() && (*buf)->defined()) {
            const Tensor &t = **buf;
            TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.numel() == C &&
                            (t.scalar_type() == acc || (acc == at::kFloat && t.scalar_type() == at::kBFloat16)),
                        op, ": expected a contiguous CPU running buffer of ", C, " ", acc, " values, got ",
                        t.scalar_type(), " ", t.sizes());
        }
    }
    TORCH_CHECK(!nbt.has_value() || !nbt->defined() || (nbt->scalar_type() == at::kLong && nbt->numel() == 1), op,
                ": expected an int64 num_batches_tracked of one element");
    TORCH_CHECK(n > 1, op, ": needs more than one value per channel, got n = ", n);
    const double unbias = (double)n / (double)(n - 1);
    const int buf_bf16 = bf16_buffers(running_mean, running_var);
    const int ok = acc == at::kFloat
        ? nm_update<float>(ptr<const float>(m), ptr<const float>(r), C, code, c.item<double>(), ptr<float>(running_mean),
                           ptr<float>(running_var), ptr<int64_t>(nbt), momentum, unbias, buf_bf16)
        : nm_update<double>(ptr<const double>(m), ptr<const double>(r), C, code, c.item<double>(),
                            ptr<double>(running_mean), ptr<double>(running_var), ptr<int64_t>(nbt), momentum, unbias,
                            0);
    return at::scalar_tensor(ok, mean.options().dtype(at::kLong));
}

// Autograd of lp_batch_norm_fwd as a C++ autograd Function (TORCH_LIBRARY_IMPL(normmatters, Autograd)): the
// forward redispatches below autograd to the device kernel, the backward calls lp_batch_norm_bwd through the
// dispatcher (so both appear as operators in traced graphs). Measured against torch.library.register_autograd
// (a Python autograd.Function around the op): see docs/bench/native-ops.md. Once differentiable: the backward
// op has no autograd of its own.
class LpBatchNormFwdAutograd : public torch::autograd::Function<LpBatchNormFwdAutograd> {
  public:
    static torch::autograd::variable_list forward(torch::autograd::AutogradContext *ctx, const Tensor &x,
                                                  const Tensor &weight, const Tensor &bias, c10::string_view norm,
                                                  const Tensor &c, double eps, int64_t k) {
        at::AutoDispatchBelowADInplaceOrView guard;
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("normmatters::lp_batch_norm_fwd", "")
                             .typed<decltype(fwd)>();
        auto [y, mean, raw, aux] = op.call(x, weight, bias, norm, c, eps, k);
        ctx->save_for_backward({x, weight, mean, raw, aux, c});
        ctx->saved_data["norm"] = std::string(norm);
        ctx->saved_data["eps"] = eps;
        ctx->saved_data["k"] = k;
        ctx->mark_non_differentiable({mean, raw, aux});
        return {y, mean, raw, aux};
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                   torch::autograd::variable_list grads) {
        const auto saved = ctx->get_saved_variables();
        const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1),
                   need_b = ctx->needs_input_grad(2);
        static auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("normmatters::lp_batch_norm_bwd", "")
                             .typed<decltype(bwd)>();
        const std::string norm = ctx->saved_data["norm"].toStringRef();
        Tensor gy = grads[0].defined() ? grads[0] : at::zeros_like(saved[0]);
        auto [gx, gw, gb] = op.call(gy, saved[0], saved[1], saved[2], saved[3], saved[4], norm, saved[5],
                                    ctx->saved_data["eps"].toDouble(), ctx->saved_data["k"].toInt(), need_x);
        return {need_x ? gx : Tensor(), need_w ? gw : Tensor(), need_b ? gb : Tensor(), Tensor(), Tensor(),
                Tensor(), Tensor()};
    }
};

std::tuple<Tensor, Tensor, Tensor, Tensor> fwd_autograd(const Tensor &x, const Tensor &weight, const Tensor &bias,
                                                        c10::string_view norm, const Tensor &c, double eps,
                                                        int64_t k) {
    auto out = LpBatchNormFwdAutograd::apply(x, weight, bias, norm, c, eps, k);
    return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY(normmatters, m) {
    m.def("lp_batch_norm_fwd(Tensor x, Tensor weight, Tensor bias, str norm, Tensor c, float eps, int k) "
          "-> (Tensor y, Tensor mean, Tensor raw, Tensor aux)");
    m.def("lp_batch_norm_bwd(Tensor grad_y, Tensor x, Tensor weight, Tensor mean, Tensor raw, Tensor aux, "
          "str norm, Tensor c, float eps, int k, bool need_x) -> (Tensor grad_x, Tensor grad_w, Tensor grad_b)");
    m.def("update_running_stats(Tensor mean, Tensor raw, Tensor(a!)? running_mean, Tensor(b!)? running_var, "
          "Tensor(c!)? num_batches_tracked, str norm, Tensor c, float momentum, SymInt n) -> Tensor");
    m.def("lp_batch_norm_fwd_out(Tensor x, Tensor weight, Tensor bias, str norm, float c, float eps, int k, "
          "Tensor(a!) y, Tensor(b!)? running_mean, Tensor(c!)? running_var, Tensor(d!)? num_batches_tracked, "
          "float momentum, float unbias, int stream, int block, int threads) "
          "-> (Tensor mean, Tensor raw, Tensor aux, int status)");
    m.def("lp_batch_norm_bwd_out(Tensor grad_y, Tensor x, Tensor weight, Tensor? mean, Tensor raw, Tensor aux, "
          "Tensor? bias, str norm, float c, float eps, int k, bool need_w, bool need_b, Tensor(a!)? grad_x, "
          "int stream, int block, int threads) -> (Tensor grad_w, Tensor grad_b)");
}

TORCH_LIBRARY_IMPL(normmatters, CPU, m) {
    m.impl("lp_batch_norm_fwd", &fwd);
    m.impl("lp_batch_norm_bwd", &bwd);
    m.impl("update_running_stats", &update_running);
    m.impl("lp_batch_norm_fwd_out", &fwd_out);
    m.impl("lp_batch_norm_bwd_out", &bwd_out);
}

TORCH_LIBRARY_IMPL(normmatters, Autograd, m) {
    m.impl("lp_batch_norm_fwd", &fwd_autograd);
}
