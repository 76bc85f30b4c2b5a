// Per-sample (row) Lp normalization: layer norm (centered), RMS norm (uncentered) and group norm (centered,
// affine per channel), for the norms l2, l1, linf, range (m contiguous chunks per row) and top-k (k <= 64).
//
// x is (R, n) contiguous: R rows (samples, or sample x group), n normalized elements each. Per row,
// with d = x - mu (mu = mean(x) centered, 0 uncentered), raw the norm's statistic of d (range: of x),
// sigma = c * raw, r = 1 / std::hypot(sigma, sqrt(eps)) (no square formed: finite for every finite x):
//     y_j = d_j * r * w_a(j) + b_a(j),     a(j) the affine index (row % G) * (n / S) + j / S (layer / RMS
//     norm: G = S = 1, a(j) = j, one vectorized loop; group norm: one weight per channel of S elements)
// Backward (gh = g * w, xh = d * r, Sg = sum gh, Sx = sum gh * xh):
//     gx_j = r * (gh_j - [centered] Sg / n - Q * psi_j)
//     l2:    Q = Sx / n,                 psi_j = xh_j
//     l1:    Q = (sigma r) Sx c / n,     psi_j = sign d_j - [centered] mean(sign d)
//     linf:  Q = (sigma r) Sx c,         psi_j = sign d_j [|d_j| = tau] / #eq - [centered] mean(that)
//     topk:  Q = (sigma r) Sx c / k,     psi_j = sign d_j ([|d_j| > tau] + [|d_j| = tau] (k - #gt) / #eq) - [c] mean
//     range: Q = (sigma r) Sx c / m,     psi_j = [x_j = hi_chunk] / #hi - [x_j = lo_chunk] / #lo
// (tau: max |d| for linf, the k-th largest |d| for top-k; ties share the weight evenly). grad_w / grad_b:
// sum over rows of g * xh and g per affine index. Rows are split over OpenMP threads (static schedule); each
// row's passes run while it sits in L1/L2; half / bfloat16 rows are converted to float once per row.
#pragma once
#include <math.h>

#include <cmath>
#include <omp.h>
#include <stdint.h>

#include <type_traits>
#include <vector>

#define NMR_L2 1
#define NMR_L1 2
#define NMR_LINF 3
#define NMR_RANGE 4
#define NMR_TOPK 5
#define NMR_KMAX 64
#define NMR_BLK 64 /* rows whose grad_w / grad_b partials are summed in T before going to double */

template <typename T>
static inline T nmr_sign(T v) { return (T)(v > 0) - (T)(v < 0); }

/* r = 1 / std::hypot(sigma, sqrt(eps)) in double: sigma^2 never formed */
static inline double nmr_rstd(double sigma, double eps) { return 1.0 / std::hypot(sigma, sqrt(eps)); }

/* the row's statistic: mu (0 unless centered), raw and (top-k) tau; xr the row in the compute type */
template <typename T>
static void nmr_stats(const T *__restrict__ xr, int64_t n, int norm, int centered, int k, int m, T *mu_out,
                      T *raw_out, T *tau_out) {
    T mu = 0;
    if (centered) {
        T s = 0;
        _Pragma("omp simd reduction(+:s)")
        for (int64_t j = 0; j < n; ++j) s += xr[j];
        mu = s / (T)n;
    }
    T raw = 0;
    if (norm == NMR_L2) {
        T s2 = 0;
        _Pragma("omp simd reduction(+:s2)")
        for (int64_t j = 0; j < n; ++j) { const T d = xr[j] - mu; s2 += d * d; }
        if (!isfinite(s2)) { /* d^2 overflowed T: again in double, scaled by the largest |d| */
            double a = 0.0, q = 0.0;
            for (int64_t j = 0; j < n; ++j) { const double v = std::fabs((double)xr[j] - (double)mu); a = v > a ? v : a; }
            if (a > 0 && isfinite(a)) {
                for (int64_t j = 0; j < n; ++j) { const double v = ((double)xr[j] - (double)mu) / a; q += v * v; }
                raw = (T)(a * sqrt(q / (double)n));
            } else raw = (T)a;
        } else raw = (T)sqrt((double)s2 / (double)n);
    } else if (norm == NMR_L1) {
        T s1 = 0;
        _Pragma("omp simd reduction(+:s1)")
        for (int64_t j = 0; j < n; ++j) s1 += std::fabs(xr[j] - mu);
        raw = s1 / (T)n;
    } else if (norm == NMR_LINF) {
        T mx = 0;
        _Pragma("omp simd reduction(max:mx)")
        for (int64_t j = 0; j < n; ++j) { const T a = std::fabs(xr[j] - mu); mx = a > mx ? a : mx; }
        raw = mx;
    } else if (norm == NMR_RANGE) {
        const int64_t L = n / m;
        double acc = 0.0;
        for (int c = 0; c < m; ++c) {
            const T *xc = xr + c * L;
            T hi = xc[0], lo = xc[0];
            _Pragma("omp simd reduction(max:hi) reduction(min:lo)")
            for (int64_t j = 0; j < L; ++j) { hi = xc[j] > hi ? xc[j] : hi; lo = xc[j] < lo ? xc[j] : lo; }
            acc += (double)(hi - lo);
        }
        raw = (T)(acc / m);
    } else { /* top-k of |d|: a running set of k values and its smallest; blocks of 16 elements are looked at one
                by one only if one of them beats (or, NaN, does not trail) that threshold */
        T top[NMR_KMAX];
        int kept = 0, at = 0;
        T thr = -1;
        for (int64_t j0 = 0; j0 < n; j0 += 16) {
            const int64_t j1 = n - j0 < 16 ? n : j0 + 16;
            int hit = 0;
            _Pragma("omp simd reduction(|:hit)")
            for (int64_t j = j0; j < j1; ++j) hit |= !(std::fabs(xr[j] - mu) <= thr);
            if (!hit) continue;
            for (int64_t j = j0; j < j1; ++j) {
                const T a = std::fabs(xr[j] - mu);
                if (kept < k) { top[kept++] = a; if (kept < k) continue; }
                else if (a > thr) top[at] = a;
                else continue;
                at = 0;
                for (int u = 1; u < k; ++u) if (top[u] < top[at]) at = u;
                thr = top[at];
            }
        }
        double acc = 0.0;
        for (int u = 0; u < kept; ++u) acc += (double)top[u];
        raw = (T)(acc / k);
        *tau_out = thr;
    }
    *mu_out = mu;
    *raw_out = raw;
}

template <typename TS, typename T>
static inline const T *nmr_row(const TS *src, int64_t n, T *buf) {
    if constexpr (std::is_same<TS, T>::value) {
        (void)buf; (void)n;
        return src;
    } else {
        _Pragma("omp simd")
        for (int64_t j = 0; j < n; ++j) buf[j] = static_cast<T>(src[j]);
        return buf;
    }
}

/* forward: y (R, n), mean (R) [centered only], raw (R), tau (R) [top-k only]; w, b (NULL: none) of the
   affine size G * n / S */
template <typename TS, typename T>
void nmr_forward(const TS *__restrict__ x, TS *__restrict__ y, const T *__restrict__ w, const T *__restrict__ b,
                 T *__restrict__ mean, T *__restrict__ rawv, T *__restrict__ tauv, int64_t R, int64_t n, int norm,
                 int centered, double c, double eps, int k, int m, int64_t G, int64_t S, int nthreads) {
    _Pragma("omp parallel num_threads(nthreads)")
    {
        std::vector<T> buf(std::is_same<TS, T>::value ? 0 : n);
        const int64_t Cg = n / S;
        const bool elem = S == 1 && G == 1;
        _Pragma("omp for schedule(static)")
        for (int64_t r = 0; r < R; ++r) {
            const T *xr = nmr_row<TS, T>(x + r * n, n, buf.data());
            T mu, raw, tau = 0;
            nmr_stats<T>(xr, n, norm, centered, k, m, &mu, &raw, &tau);
            if (mean) mean[r] = mu;
            rawv[r] = raw;
            if (tauv) tauv[r] = tau;
            const T rs = (T)nmr_rstd(c * (double)raw, eps);
            TS *__restrict__ yr = y + r * n;
            if (elem) {
                if (w && b) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<TS>((xr[j] - mu) * rs * w[j] + b[j]);
                } else if (w) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<TS>((xr[j] - mu) * rs * w[j]);
                } else {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<TS>((xr[j] - mu) * rs);
                }
            } else {
                const int64_t a0 = (r % G) * Cg;
                for (int64_t cg = 0; cg < Cg; ++cg) {
                    const T sc = rs * (w ? w[a0 + cg] : (T)1), sh = (b ? b[a0 + cg] : (T)0) - mu * sc;
                    const T *xs = xr + cg * S;
                    TS *ys = yr + cg * S;
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < S; ++j) ys[j] = static_cast<TS>(xs[j] * sc + sh);
                }
            }
        }
    }
}

/* backward: gx (R, n) or NULL; gw, gb (affine size, NULL: not wanted) */
template <typename TS, typename T>
void nmr_backward(const TS *__restrict__ g, const TS *__restrict__ x, TS *__restrict__ gx, const T *__restrict__ w,
                  const T *__restrict__ mean, const T *__restrict__ rawv, const T *__restrict__ tauv,
                  T *__restrict__ gw, T *__restrict__ gb, int64_t R, int64_t n, int norm, int centered, double c,
                  double eps, int k, int m, int64_t G, int64_t S, int nthreads) {
    const int64_t Cg = n / S, A = G * Cg;
    const bool affine_grads = gw || gb, elem = S == 1 && G == 1;
    std::vector<double> part(affine_grads ? (size_t)nthreads * 2 * A : 0, 0.0);
    _Pragma("omp parallel num_threads(nthreads)")
    {
        const int t_ = omp_get_thread_num();
        const bool conv = !std::is_same<TS, T>::value;
        std::vector<T> xbuf(conv ? n : 0), gbuf(n), blk(affine_grads && elem ? 2 * n : 0, (T)0);
        std::vector<T> hi(norm == NMR_RANGE ? m : 0), lo(hi.size()), whi(hi.size()), wlo(hi.size());
        double *pw = affine_grads ? part.data() + (size_t)t_ * 2 * A : nullptr, *pb = pw ? pw + A : nullptr;
        int64_t inblk = 0;
        _Pragma("omp for schedule(static)")
        for (int64_t r = 0; r < R; ++r) {
            const T *xr = nmr_row<TS, T>(x + r * n, n, xbuf.data());
            const T *g0 = nmr_row<TS, T>(g + r * n, n, gbuf.data());
            T *__restrict__ gh = gbuf.data();
            const T mu = centered ? mean[r] : (T)0, raw = rawv[r];
            const double sigma = c * (double)raw, rsd = nmr_rstd(sigma, eps);
            const T rs = (T)rsd;
            const int64_t a0 = (r % G) * Cg;
            /* gh = g * w (in gbuf) */
            if (elem) {
                if (w) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) gh[j] = g0[j] * w[j];
                } else if (g0 != gh) {
                    for (int64_t j = 0; j < n; ++j) gh[j] = g0[j];
                }
            } else {
                for (int64_t cg = 0; cg < Cg; ++cg) {
                    const T wv = w ? w[a0 + cg] : (T)1;
                    _Pragma("omp simd")
                    for (int64_t j = cg * S; j < (cg + 1) * S; ++j) gh[j] = g0[j] * wv;
                }
            }
            T Sg = 0, Sx = 0;
            _Pragma("omp simd reduction(+:Sg, Sx)")
            for (int64_t j = 0; j < n; ++j) { Sg += gh[j]; Sx += gh[j] * (xr[j] - mu); }
            Sx *= rs; /* sum gh * xh */
            const double sr = sigma * rsd; /* sigma * r <= 1 */
            double Q = 0.0, P = 0.0; /* gx = r (gh - Sg/n [centered] + P - Q * e_j) with e_j the norm's part */
            T tau = 0, wq = 0;
            if (norm == NMR_L2) {
                Q = (double)Sx / n;
            } else if (norm == NMR_L1) {
                T ss = 0;
                _Pragma("omp simd reduction(+:ss)")
                for (int64_t j = 0; j < n; ++j) ss += nmr_sign(xr[j] - mu);
                Q = sr * Sx * c / n;
                if (centered) P = Q * (double)ss / n;
            } else if (norm == NMR_LINF || norm == NMR_TOPK) {
                tau = norm == NMR_LINF ? raw : tauv[r];
                T cgt = 0, ceq = 0, sgt = 0, seq = 0;
                _Pragma("omp simd reduction(+:cgt, ceq, sgt, seq)")
                for (int64_t j = 0; j < n; ++j) {
                    const T d = xr[j] - mu, a = std::fabs(d), sd = nmr_sign(d);
                    cgt += (T)(a > tau); ceq += (T)(a == tau);
                    sgt += a > tau ? sd : (T)0; seq += a == tau ? sd : (T)0;
                }
                const double kk = norm == NMR_LINF ? 1.0 : (double)k;
                const double weq = ceq > 0 ? (kk - (double)cgt) / (double)ceq : 0.0;
                wq = (T)weq;
                Q = sr * Sx * c / kk;
                if (centered) P = Q * ((double)sgt + weq * (double)seq) / n;
            } else { /* range: per chunk max / min and their counts */
                const int64_t L = n / m;
                double Qm = sr * Sx * c / m;
                for (int ch = 0; ch < m; ++ch) {
                    const T *xc = xr + ch * L;
                    T h = xc[0], l = xc[0];
                    _Pragma("omp simd reduction(max:h) reduction(min:l)")
                    for (int64_t j = 0; j < L; ++j) { h = xc[j] > h ? xc[j] : h; l = xc[j] < l ? xc[j] : l; }
                    T nh = 0, nl = 0;
                    _Pragma("omp simd reduction(+:nh, nl)")
                    for (int64_t j = 0; j < L; ++j) { nh += (T)(xc[j] == h); nl += (T)(xc[j] == l); }
                    hi[ch] = h; lo[ch] = l; whi[ch] = (T)(Qm / nh); wlo[ch] = (T)(Qm / nl);
                }
            }
            const T base = (T)((centered ? (double)Sg / n : 0.0) - P), Qt = (T)Q;
            if (gx) {
                TS *__restrict__ out = gx + r * n;
                if (norm == NMR_L2) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<TS>(rs * (gh[j] - base - Qt * ((xr[j] - mu) * rs)));
                } else if (norm == NMR_L1) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<TS>(rs * (gh[j] - base - Qt * nmr_sign(xr[j] - mu)));
                } else if (norm == NMR_LINF || norm == NMR_TOPK) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) {
                        const T d = xr[j] - mu, a = std::fabs(d);
                        const T e = a > tau ? nmr_sign(d) : (a == tau ? nmr_sign(d) * wq : (T)0);
                        out[j] = static_cast<TS>(rs * (gh[j] - base - Qt * e));
                    }
                } else {
                    const int64_t L = n / m;
                    for (int ch = 0; ch < m; ++ch) {
                        const T h = hi[ch], l = lo[ch], wh = whi[ch], wl = wlo[ch];
                        _Pragma("omp simd")
                        for (int64_t j = ch * L; j < (ch + 1) * L; ++j)
                            out[j] = static_cast<TS>(rs * (gh[j] - base - ((xr[j] == h ? wh : (T)0) - (xr[j] == l ? wl : (T)0))));
                    }
                }
            }
            if (affine_grads) { /* g itself: reloaded (gh holds g * w) */
                const T *gg = nmr_row<TS, T>(g + r * n, n, gh);
                if (elem) {
                    T *bw = blk.data(), *bb = bw + n;
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) { bw[j] += gg[j] * ((xr[j] - mu) * rs); bb[j] += gg[j]; }
                    if (++inblk == NMR_BLK) {
                        for (int64_t j = 0; j < n; ++j) { pw[j] += (double)bw[j]; pb[j] += (double)bb[j]; bw[j] = 0; bb[j] = 0; }
                        inblk = 0;
                    }
                } else {
                    for (int64_t cg = 0; cg < Cg; ++cg) {
                        T sw = 0, sb = 0;
                        const T *gs = gg + cg * S, *xs = xr + cg * S;
                        _Pragma("omp simd reduction(+:sw, sb)")
                        for (int64_t j = 0; j < S; ++j) { sw += gs[j] * (xs[j] - mu); sb += gs[j]; }
                        pw[a0 + cg] += (double)sw * (double)rs; pb[a0 + cg] += (double)sb;
                    }
                }
            }
        }
        if (affine_grads && elem && inblk)
            for (int64_t j = 0; j < n; ++j) { pw[j] += (double)blk[j]; pb[j] += (double)blk[n + j]; }
    }
    if (affine_grads) {
        for (int64_t a = 0; a < A; ++a) {
            double sw = 0.0, sb = 0.0;
            for (int t = 0; t < nthreads; ++t) { sw += part[(size_t)t * 2 * A + a]; sb += part[(size_t)t * 2 * A + A + a]; }
            if (gw) gw[a] = (T)sw;
            if (gb) gb[a] = (T)sb;
        }
    }
}
