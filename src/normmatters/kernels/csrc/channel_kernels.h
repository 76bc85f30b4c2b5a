// Channel kernels of the native CPU path, for contiguous (N, C, S) input with S > 1, and the per-type helpers
// both kernel families share (nm_scale, nm_coefs, nm_update_running, nm_update).
//
// The per-element arithmetic is the one normmatters/kernels/formulas.py composes from the estimator pieces
// in normmatters/estimators.py (lean_raw, lean_sums, lean_dstat, _extreme_pieces): read those for the math;
// this file only reorders it for the cache: a block of cb adjacent channels (chosen by
// native.py's _channel_block_for) at a time through every pass, the first pass reading each sample's block as
// one contiguous run, so only that pass of each direction streams from DRAM. The constant c(n) is an argument
// (cn), taken from the estimator registry; no statistic's constant is written here.
//
// Layout: x is (N, C, S) contiguous; per-channel vectors are (C,). Norm codes: common.h. Row sums
// accumulate in the element type (vectorized, omp simd reduction) and are added into double per row of S
// elements; counts are int32 per row (rows have fewer than 2**31 elements, see native.eligible) added into
// int64 per channel. Blocks are handed to the threads one at a time (dynamic schedule), so a thread that the
// OS preempts does not hold up the call by a whole static share. Range: the forward also writes pos (2, C)
// int32, the position (sample*S + spatial index) of each channel's max and min, negative (-(first + 1)) when
// tied.
#pragma once
#include "common.h"

/* forward: the per-channel multiplier w / sqrt(σ̂² + eps), σ̂ = cn · raw (mean-only: w), as w / hypot(σ̂, √eps):
   no square is formed, so it is right for every finite σ̂ (σ̂² overflows double above ~1.3e154) */
template <typename T>
static inline T nm_scale(int norm, double cn, double eps, T w, T raw) {
    if (norm == NM_MEAN) return w;
    const double sigma = cn * (double)raw;
    return (T)((double)w / hypot(sigma, sqrt(eps)));
}
/* l2's raw statistic sqrt(Σd²/n) of one channel whose Σd² overflowed double (finite |d| > ~1e154): the sum
   again with every d scaled by 2^-600 (elements at stride `step` from x, count of them `cnt`) */
template <typename TS, typename E>
static double nm_l2_rescaled(const TS *x, int64_t cnt, int64_t step, int64_t run, int64_t run_step, double m,
                             double n) {
    const double s = 0x1p-600;
    double acc = 0.0;
    for (int64_t i = 0; i < cnt; ++i) for (int64_t j = 0; j < run; ++j) {
        const double d = ((double)E::ld(x[i * step + j * run_step]) - m) * s;
        acc += d * d;
    }
    return sqrt(acc / n) / s;
}
/* backward: from one channel's sums (Σg, Σg·d, Σsign d; linf: Σ sign over |d| > τ and = τ, and their
   counts; range: counts of x = max and x = min) the gradients of w and b and the coefficients of
   ∂L/∂x = A·g + B + K·e(x) (e: l2 d, l1 sign d, linf the extreme signs, range ±1 at max/min) */
template <typename T>
static inline void nm_coefs(int norm, int k, double n, double cn, double eps, double wc, double rawc,
                                  double sg, double sgd, double ssign, double sgt, double seq, double cgt,
                                  double ceq, T *gw, T *gb, T *At, T *Bt, T *Kt, T *Kbt, T *weqt) {
    double A, sum_gx, K = 0.0, Kb = 0.0, weq = 0.0, ebar = 0.0, sigma = 0.0;
    if (norm == NM_MEAN) {
        A = wc; sum_gx = sgd;
    } else {
        sigma = cn * rawc;
        const double r = 1.0 / hypot(sigma, sqrt(eps));  /* no σ̂² formed: finite for every finite σ̂ */
        A = wc * r; sum_gx = sgd * r;
        const double coef = -(sigma * r) * r * wc * sum_gx;
        if (norm == NM_L2) { K = -r * r * wc * sum_gx / n; } /* coef/(nσ) without 0/0 at σ = 0 */
        else if (norm == NM_L1) { K = coef * cn / n; ebar = ssign * cn / n / n; }
        else if (norm == NM_LINF || norm == NM_TOPK) { /* linf is top-1 */
            const double kk = norm == NM_TOPK ? (double)k : 1.0;
            weq = (kk - cgt) / ceq;
            K = coef * cn / kk; ebar = (sgt + weq * seq) * cn / (n * kk);
        } else if (norm == NM_RANGE) { K = coef * cn / cgt; Kb = coef * cn / ceq; }
        ebar *= coef;
    }
    if (gw) *gw = (T)sum_gx;
    if (gb) *gb = (T)sg;
    *At = (T)A; *Bt = (T)(-A * sg / n - ebar); *Kt = (T)K; *Kbt = (T)Kb; *weqt = (T)weq;
}
/* functional.update_running_stats for one group, in T like the reference: returns the "statistics are
   finite" flag and leaves every buffer (NULL: absent) unchanged when it is 0. σ̂ = (T)cn · raw. */
template <typename T>
static int nm_update_running(const T *__restrict__ mean, const T *__restrict__ raw, int64_t C, int norm,
                                   double cn, T *__restrict__ run_mean, T *__restrict__ run_var,
                                   int64_t *__restrict__ nbt, double momentum, double unbias)
{
    const T ct = (T)cn, mom = (T)momentum, unb = (T)unbias;
    int ok = 1;
    for (int64_t c = 0; c < C; ++c) {
        if (!isfinite(mean[c])) ok = 0;
        if (norm != NM_MEAN && !isfinite((T)(ct * raw[c]))) ok = 0;
    }
    if (!ok) return 0;
    /* finite statistics whose running_var would overflow T (σ̂²·n/(n−1) > max): every buffer unchanged, 2 */
    if (run_var && norm != NM_MEAN) for (int64_t c = 0; c < C; ++c) {
        const T sigma = ct * raw[c];
        if (!isfinite(run_var[c] + ((T)(sigma * sigma) * unb - run_var[c]) * mom)) return 2;
    }
    for (int64_t c = 0; c < C; ++c) {
        if (run_mean) run_mean[c] = run_mean[c] + (mean[c] - run_mean[c]) * mom;
        if (run_var && norm != NM_MEAN) {
            const T sigma = ct * raw[c];
            run_var[c] = run_var[c] + ((T)(sigma * sigma) * unb - run_var[c]) * mom;
        }
    }
    if (nbt) *nbt += 1;
    return 1;
}

/* the running-buffer update of both forward kernels: T buffers, or bfloat16 buffers with float32 statistics
   (buf_bf16: only the bf16 variant passes it) */
template <typename T>
static int nm_update(const T *__restrict__ mean, const T *__restrict__ raw, int64_t C, int norm, double cn,
                           T *__restrict__ run_mean, T *__restrict__ run_var, int64_t *__restrict__ nbt,
                           double momentum, double unbias, int buf_bf16)
{
    if (buf_bf16)
        return nm_update_running_bf16buf((const float *)mean, (const float *)raw, C, norm, cn,
                                         (uint16_t *)run_mean, (uint16_t *)run_var, nbt, momentum,
                                         unbias);
    return nm_update_running<T>(mean, raw, C, norm, cn, run_mean, run_var, nbt, momentum, unbias);
}

/* top-k of one channel c: the k largest a = |(x − sb)·ml − mu| kept in a small array; a 64-element block
   whose max a does not beat the k-th largest so far (thr) is skipped after one vectorized pass; ties at thr
   change no sum. Returns thr (τ, the k-th largest), *sum = the sum of the k kept. Forward: sb = 0, ml = 1,
   mu = μ; in-place backward: the reconstruction d = (y − b)/scale, mu = 0. */
template <typename TS, typename T = typename NmElem<TS>::acc, typename E = NmElem<TS>>
static T nm_topk(const TS *__restrict__ x, int64_t N, int64_t C, int64_t S, int64_t c, T sb, T ml, T mu,
                       int topk, double *sum)
{
    T top[NM_KMAX];
    int cnt = 0, at = 0;
    T thr = 0;
    for (int64_t i = 0; i < N; ++i) for (int64_t j0 = 0; j0 < S; j0 += 64) {
        const TS *xr = x + (i * C + c) * S + j0;
        const int64_t L = S - j0 < 64 ? S - j0 : 64;
        if (cnt == topk) {
            T a = 0;
            _Pragma("omp simd reduction(max:a)")
            for (int64_t j = 0; j < L; ++j) { T v = E::abs((E::ld(xr[j]) - sb) * ml - mu); a = v > a ? v : a; }
            if (!(a > thr)) continue;
        }
        for (int64_t j = 0; j < L; ++j) {
            const T a = E::abs((E::ld(xr[j]) - sb) * ml - mu);
            if (cnt < topk) { top[cnt++] = a; if (cnt < topk) continue; }
            else if (a > thr) top[at] = a;
            else continue;
            at = 0; /* (re)locate the smallest kept value: the new threshold */
            for (int u = 1; u < topk; ++u) if (top[u] < top[at]) at = u;
            thr = top[at];
        }
    }
    double acc = 0.0;
    for (int u = 0; u < cnt; ++u) acc += (double)top[u];
    *sum = acc;
    return thr;
}

template <typename TS, typename T = typename NmElem<TS>::acc, typename E = NmElem<TS>>
int nm_forward(const TS *x, TS *y, const T *__restrict__ w, const T *__restrict__ b,
                     T *__restrict__ mean_out, T *__restrict__ raw_out, T *__restrict__ hi_out, T *__restrict__ lo_out,
                     int64_t N, int64_t C, int64_t S, int norm, double cn, double eps, int stream,
                     int nthreads, T *__restrict__ run_mean, T *__restrict__ run_var, int64_t *__restrict__ nbt,
                     double momentum, double unbias, int buf_bf16, int topk, int64_t cb,
                     int32_t *__restrict__ pos_out)
{
    const double n = (double)N * (double)S;
    const int64_t nblocks = (C + cb - 1) / cb;
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        TS buf[NM_BLK] __attribute__((aligned(64)));
        const int64_t c0 = blk * cb, nb = C - c0 < cb ? C - c0 : cb;
        double sum[NM_CBMAX], acc[NM_CBMAX];
        T hi[NM_CBMAX], lo[NM_CBMAX], mu[NM_CBMAX], mx[NM_CBMAX], scale[NM_CBMAX];
        for (int64_t q = 0; q < nb; ++q) {
            sum[q] = 0.0; acc[q] = 0.0; mx[q] = 0; hi[q] = lo[q] = E::ld(x[(c0 + q) * S]);
        }
        /* pass 1, from DRAM: Σx (range: and max, min), the block's channels of one sample in a row */
        for (int64_t i = 0; i < N; ++i) for (int64_t q = 0; q < nb; ++q) {
            const TS *xr = x + (i * C + c0 + q) * S;
            T s = 0;
            if (norm == NM_RANGE) {
                T h = hi[q], l = lo[q];
                _Pragma("omp simd reduction(+:s) reduction(max:h) reduction(min:l)")
                for (int64_t j = 0; j < S; ++j) { T v = E::ld(xr[j]); s += v; h = v > h ? v : h; l = v < l ? v : l; }
                hi[q] = h; lo[q] = l;
            } else {
                _Pragma("omp simd reduction(+:s)")
                for (int64_t j = 0; j < S; ++j) s += E::ld(xr[j]);
            }
            sum[q] += (double)s;
        }
        for (int64_t q = 0; q < nb; ++q) mu[q] = (T)(sum[q] / n);
        /* pass 2, from the cache (l2, l1, linf): the dispersion around μ */
        if (norm == NM_L1 || norm == NM_L2 || norm == NM_LINF) {
            for (int64_t i = 0; i < N; ++i) for (int64_t q = 0; q < nb; ++q) {
                const TS *xr = x + (i * C + c0 + q) * S;
                const T m = mu[q];
                T s = 0;
                if (norm == NM_L1) {
                    _Pragma("omp simd reduction(+:s)")
                    for (int64_t j = 0; j < S; ++j) s += E::abs(E::ld(xr[j]) - m);
                    acc[q] += (double)s;
                } else if (norm == NM_L2) {
                    _Pragma("omp simd reduction(+:s)")
                    for (int64_t j = 0; j < S; ++j) { T d = E::ld(xr[j]) - m; s += d * d; }
                    if (isfinite(s)) acc[q] += (double)s;
                    else { /* d² overflowed T (|d| > ~1.8e19 in float): this row again in double */
                        double s2 = 0.0;
                        for (int64_t j = 0; j < S; ++j) { double d = (double)E::ld(xr[j]) - m; s2 += d * d; }
                        acc[q] += s2;
                    }
                } else {
                    T a = mx[q];
                    _Pragma("omp simd reduction(max:a)")
                    for (int64_t j = 0; j < S; ++j) { T v = E::abs(E::ld(xr[j]) - m); a = v > a ? v : a; }
                    mx[q] = a;
                }
            }
        }
        for (int64_t q = 0; q < nb; ++q) {
            const int64_t c = c0 + q;
            const T m = mu[q];
            double raw = 0.0;
            if (norm == NM_RANGE) {
                raw = (double)(hi[q] - lo[q]);
                if (hi_out) hi_out[c] = hi[q];
                if (lo_out) lo_out[c] = lo[q];
            } else if (norm == NM_LINF) {
                raw = (double)mx[q];
            } else if (norm == NM_L1) {
                raw = acc[q] / n;
            } else if (norm == NM_L2) {
                raw = sqrt(acc[q] / n);
                if (!isfinite(raw) && isfinite((double)m)) /* Σd² overflowed (finite |d| > ~1e154) */
                    raw = nm_l2_rescaled<TS, E>(x + c * S, N, C * S, S, 1, (double)m, n);
            } else if (norm == NM_TOPK) {
                double s = 0.0;
                const T thr = nm_topk<TS, T>(x, N, C, S, c, 0, 1, m, topk, &s);
                raw = s / topk;
                hi_out[c] = thr; /* τ, the k-th largest |d|: backward compares against it */
            }
            mean_out[c] = m;
            raw_out[c] = norm == NM_MEAN ? m : (T)raw;
            scale[q] = nm_scale<T>(norm, cn, eps, w[c], (T)raw);
        }
        /* output pass, from the cache; range: also where the max and min are and whether they are tied */
        int64_t nhi[NM_CBMAX], nlo[NM_CBMAX], phi[NM_CBMAX], plo[NM_CBMAX];
        for (int64_t q = 0; q < nb; ++q) { nhi[q] = nlo[q] = 0; phi[q] = plo[q] = -1; }
        for (int64_t i = 0; i < N; ++i) for (int64_t q = 0; q < nb; ++q) {
            const int64_t c = c0 + q;
            const T m = mu[q], sc = scale[q], shift = b[c], h = hi[q], l = lo[q];
            for (int64_t j0 = 0; j0 < S; j0 += NM_BLK) {
                const int64_t L = S - j0 < NM_BLK ? S - j0 : NM_BLK;
                const TS *xr = x + (i * C + c) * S + j0;
                TS *yr = stream ? buf : y + (i * C + c) * S + j0;
                if (norm == NM_RANGE && pos_out) { /* before y is written: y may be x (in-place) */
                    int kh = 0, kl = 0;
                    _Pragma("omp simd reduction(+:kh,kl)")
                    for (int64_t j = 0; j < L; ++j) { const T v = E::ld(xr[j]); kh += v == h; kl += v == l; }
                    if (kh && phi[q] < 0)
                        for (int64_t j = 0; j < L; ++j) if (E::ld(xr[j]) == h) { phi[q] = i * S + j0 + j; break; }
                    if (kl && plo[q] < 0)
                        for (int64_t j = 0; j < L; ++j) if (E::ld(xr[j]) == l) { plo[q] = i * S + j0 + j; break; }
                    nhi[q] += kh; nlo[q] += kl;
                }
                _Pragma("omp simd")
                for (int64_t j = 0; j < L; ++j) yr[j] = E::st((E::ld(xr[j]) - m) * sc + shift);
                if (stream) E::stream(y + (i * C + c) * S + j0, buf, L);
            }
        }
        if (stream) NM_SFENCE();
        if (norm == NM_RANGE && pos_out) for (int64_t q = 0; q < nb; ++q) {
            /* p: the only element equal to the max (min); -(p + 1): the first of several, or -1 (none: NaN) */
            pos_out[c0 + q] = nhi[q] == 1 ? (int32_t)phi[q] : (int32_t)(-(phi[q] < 0 ? 0 : phi[q]) - 1);
            pos_out[C + c0 + q] = nlo[q] == 1 ? (int32_t)plo[q] : (int32_t)(-(plo[q] < 0 ? 0 : plo[q]) - 1);
        }
    }
    return nm_update<T>(mean_out, raw_out, C, norm, cn, run_mean, run_var, nbt, momentum, unbias,
                           buf_bf16);
}

template <typename TS, typename T = typename NmElem<TS>::acc, typename E = NmElem<TS>>
void nm_backward(const TS *__restrict__ g, const TS *__restrict__ x, TS *__restrict__ gx, const T *__restrict__ w,
                       const T *__restrict__ mean, const T *__restrict__ rawv, const T *__restrict__ hiv,
                       const T *__restrict__ lov, T *__restrict__ gw, T *__restrict__ gb, int64_t N, int64_t C,
                       int64_t S, int norm, double cn, double eps, int stream, int nthreads, int topk,
                       int64_t cb, const int32_t *__restrict__ posv, const T *__restrict__ bv)
{
    const double n = (double)N * (double)S;
    const int64_t nblocks = (C + cb - 1) / cb;
    _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nthreads)")
    for (int64_t blk = 0; blk < nblocks; ++blk) {
        TS buf[NM_BLK] __attribute__((aligned(64)));
        /* blocks in reverse: the forward read the last ones most recently, so they are the likeliest to be
           still in L3 (l1 backward 1.67-1.70 -> 1.53 ms at 64x64x32x32; range unchanged) */
        const int64_t c0 = (nblocks - 1 - blk) * cb, nb = C - c0 < cb ? C - c0 : cb;
        double sg[NM_CBMAX], sgd[NM_CBMAX], ssign[NM_CBMAX], sgt[NM_CBMAX], seq[NM_CBMAX];
        int64_t cgt[NM_CBMAX], ceq[NM_CBMAX];
        T At[NM_CBMAX], Bt[NM_CBMAX], Kt[NM_CBMAX], Kbt[NM_CBMAX], weqt[NM_CBMAX];
        /* range with the forward's positions (posv): the max and min values read from x there; a channel whose
           max and min are both unique (fast[q]) needs no comparisons: its ∂L/∂x is A·g + B except at those two
           elements, patched after pass 2, which then does not read x */
        T hiq[NM_CBMAX], loq[NM_CBMAX], muq[NM_CBMAX], sbq[NM_CBMAX], mlq[NM_CBMAX];
        int64_t phi[NM_CBMAX], plo[NM_CBMAX];
        int fast[NM_CBMAX];
        for (int64_t q = 0; q < nb; ++q) {
            const int64_t c = c0 + q;
            sg[q] = sgd[q] = ssign[q] = sgt[q] = seq[q] = 0.0; cgt[q] = ceq[q] = 0;
            fast[q] = 0;
            /* the element the formulas see is (x − sb)·ml: x itself (sb = 0, ml = 1, μ = mean); in-place
               (bv: the bias) the output y = scale·d + b rebuilt as d = (y − b)/scale (μ = 0) */
            if (bv) { sbq[q] = bv[c]; mlq[q] = (T)1 / nm_scale<T>(norm, cn, eps, w[c], rawv[c]); muq[q] = 0; }
            else { sbq[q] = 0; mlq[q] = 1; muq[q] = mean[c]; }
            hiq[q] = norm == NM_RANGE || norm == NM_TOPK ? (hiv ? hiv[c] : 0) : rawv[c];
            loq[q] = norm == NM_RANGE && lov ? lov[c] : 0;
            if (norm == NM_RANGE && posv) {
                const int32_t eh = posv[c], el = posv[C + c];
                phi[q] = eh >= 0 ? eh : -(int64_t)eh - 1;
                plo[q] = el >= 0 ? el : -(int64_t)el - 1;
                hiq[q] = E::ld(x[(phi[q] / S * C + c) * S + phi[q] % S]);
                loq[q] = E::ld(x[(plo[q] / S * C + c) * S + plo[q] % S]);
                fast[q] = eh >= 0 && el >= 0;
                if (fast[q]) cgt[q] = ceq[q] = 1;
            }
        }
        /* in-place: the thresholds the elements are compared with, from the rebuilt d (as the compiled path's
           Estimator.lean_thresholds): linf max |d|, range max and min d, top-k the k-th largest |d| */
        if (bv && (norm == NM_LINF || norm == NM_RANGE)) {
            for (int64_t q = 0; q < nb; ++q) { hiq[q] = norm == NM_LINF ? (T)0 : -INFINITY; loq[q] = INFINITY; }
            for (int64_t i = 0; i < N; ++i) for (int64_t q = 0; q < nb; ++q) {
                const TS *xr = x + (i * C + c0 + q) * S;
                const T sb = sbq[q], ml = mlq[q];
                T h = hiq[q], l = loq[q];
                if (norm == NM_LINF) {
                    _Pragma("omp simd reduction(max:h)")
                    for (int64_t j = 0; j < S; ++j) { T a = E::abs((E::ld(xr[j]) - sb) * ml); h = a > h ? a : h; }
                } else {
                    _Pragma("omp simd reduction(max:h) reduction(min:l)")
                    for (int64_t j = 0; j < S; ++j) {
                        T v = (E::ld(xr[j]) - sb) * ml; h = v > h ? v : h; l = v < l ? v : l;
                    }
                }
                hiq[q] = h; loq[q] = l;
            }
        } else if (bv && norm == NM_TOPK) {
            for (int64_t q = 0; q < nb; ++q) {
                double unused;
                hiq[q] = nm_topk<TS, T>(x, N, C, S, c0 + q, sbq[q], mlq[q], 0, topk, &unused);
            }
        }
        /* pass 1, from DRAM: the per-channel sums of (g, x), the block's channels of one sample in a row */
        for (int64_t i = 0; i < N; ++i) for (int64_t q = 0; q < nb; ++q) {
            const int64_t c = c0 + q;
            const T mu = muq[q], tau = hiq[q], lo = loq[q], sb = sbq[q], ml = mlq[q];
            const TS *xr = x + (i * C + c) * S;
            const TS *gr = g + (i * C + c) * S;
            T a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0;
            int k1 = 0, k2 = 0; /* int32 per row: vectorizes with the float sums */
            if (norm == NM_L1) {
                _Pragma("omp simd reduction(+:a1,a2,a3)")
                for (int64_t j = 0; j < S; ++j) {
                    T d = ((E::ld(xr[j]) - sb) * ml) - mu, gj = E::ld(gr[j]);
                    a1 += gj; a2 += gj * d; a3 += (T)(d > 0) - (T)(d < 0);
                }
            } else if (norm == NM_LINF || norm == NM_TOPK) {
                _Pragma("omp simd reduction(+:a1,a2,a4,a5,k1,k2)")
                for (int64_t j = 0; j < S; ++j) {
                    T d = ((E::ld(xr[j]) - sb) * ml) - mu, gj = E::ld(gr[j]), a = E::abs(d);
                    T sd = (T)(d > 0) - (T)(d < 0);
                    a1 += gj; a2 += gj * d;
                    k1 += a > tau; k2 += a == tau;
                    a4 += a > tau ? sd : 0; a5 += a == tau ? sd : 0;
                }
            } else if (norm == NM_RANGE && !fast[q]) {
                _Pragma("omp simd reduction(+:a1,a2,k1,k2)")
                for (int64_t j = 0; j < S; ++j) {
                    T v = ((E::ld(xr[j]) - sb) * ml), gj = E::ld(gr[j]);
                    a1 += gj; a2 += gj * (v - mu); k1 += v == tau; k2 += v == lo;
                }
            } else {
                _Pragma("omp simd reduction(+:a1,a2)")
                for (int64_t j = 0; j < S; ++j) {
                    T gj = E::ld(gr[j]); a1 += gj; a2 += gj * (((E::ld(xr[j]) - sb) * ml) - mu);
                }
            }
            sg[q] += (double)a1; sgd[q] += (double)a2; ssign[q] += (double)a3; sgt[q] += (double)a4;
            seq[q] += (double)a5; cgt[q] += k1; ceq[q] += k2;
        }
        for (int64_t q = 0; q < nb; ++q) {
            const int64_t c = c0 + q;
            nm_coefs<T>(norm, topk, n, cn, eps, (double)w[c], (double)rawv[c], sg[q], sgd[q], ssign[q],
                           sgt[q], seq[q], (double)cgt[q], (double)ceq[q], gw ? gw + c : NULL,
                           gb ? gb + c : NULL, At + q, Bt + q, Kt + q, Kbt + q, weqt + q);
        }
        if (!gx) continue;
        /* pass 2, from the cache: ∂L/∂x */
        for (int64_t i = 0; i < N; ++i) for (int64_t q = 0; q < nb; ++q) {
            const int64_t c = c0 + q;
            const T mu = muq[q], tau = hiq[q], lo = loq[q], sb = sbq[q], ml = mlq[q];
            const T A = At[q], B = Bt[q], K = Kt[q], Kb = Kbt[q], weq = weqt[q];
            for (int64_t j0 = 0; j0 < S; j0 += NM_BLK) {
                const int64_t L = S - j0 < NM_BLK ? S - j0 : NM_BLK;
                const TS *xr = x + (i * C + c) * S + j0;
                const TS *gr = g + (i * C + c) * S + j0;
                TS *out = stream ? buf : gx + (i * C + c) * S + j0;
                if (norm == NM_L2) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < L; ++j)
                        out[j] = E::st(A * E::ld(gr[j]) + B + K * (((E::ld(xr[j]) - sb) * ml) - mu));
                } else if (norm == NM_L1) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < L; ++j) {
                        T d = ((E::ld(xr[j]) - sb) * ml) - mu;
                        out[j] = E::st(A * E::ld(gr[j]) + B + K * ((T)(d > 0) - (T)(d < 0)));
                    }
                } else if (norm == NM_LINF || norm == NM_TOPK) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < L; ++j) {
                        T d = ((E::ld(xr[j]) - sb) * ml) - mu, a = E::abs(d);
                        T sd = (T)(d > 0) - (T)(d < 0);
                        T e = a > tau ? sd : (a == tau ? sd * weq : (T)0);
                        out[j] = E::st(A * E::ld(gr[j]) + B + K * e);
                    }
                } else if (norm == NM_RANGE && !fast[q]) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < L; ++j) {
                        T v = ((E::ld(xr[j]) - sb) * ml);
                        out[j] = E::st(A * E::ld(gr[j]) + B + (v == tau ? K : (T)0) - (v == lo ? Kb : (T)0));
                    }
                } else { /* mean-only, and range with a unique max and min (patched below) */
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < L; ++j) out[j] = E::st(A * E::ld(gr[j]) + B);
                }
                if (stream) E::stream(gx + (i * C + c) * S + j0, buf, L);
            }
        }
        if (stream) NM_SFENCE();
        for (int64_t q = 0; q < nb; ++q) if (fast[q]) {
            const int64_t c = c0 + q;
            const int64_t ah = (phi[q] / S * C + c) * S + phi[q] % S;
            const int64_t al = (plo[q] / S * C + c) * S + plo[q] % S;
            gx[ah] = E::st(At[q] * E::ld(g[ah]) + Bt[q] + Kt[q]);
            gx[al] = E::st(At[q] * E::ld(g[al]) + Bt[q] - Kbt[q]);
        }
    }
}
