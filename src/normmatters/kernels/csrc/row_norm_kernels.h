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

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

/* the kernels below compare floats inside vectorized loops ((T)(a > tau), (T)(x >= max)); under ISO C++ (torch
   builds with -std=c++20) and the default -ftrapping-math GCC keeps such compares as branches and gives up on
   the loop ("control flow in loop"), so these functions are built without trapping math (no code here reads
   the floating-point exception flags; results, NaN included, are unchanged) */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC push_options
#pragma GCC optimize("no-trapping-math")
#endif

#define NMR_L2 1
#define NMR_L1 2
#define NMR_LINF 3
#define NMR_RANGE 4
#define NMR_TOPK 5
#define NMR_KMAX 64
#define NMR_NB 128 /* interleaved blocks of the top-k selection (> NMR_KMAX) */
#define NMR_BLK 64 /* rows whose grad_w / grad_b partials are summed in T before going to double */

/* |v| as a builtin: std::fabs, defined before the optimize pragma above, would not be inlined here */
static inline float nmr_fabs(float v) { return __builtin_fabsf(v); }
static inline double nmr_fabs(double v) { return __builtin_fabs(v); }

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
        if (!__builtin_isfinite(s2)) { /* d^2 overflowed T: again in double, scaled by the largest |d| */
            double a = 0.0, q = 0.0;
            for (int64_t j = 0; j < n; ++j) { const double v = nmr_fabs((double)xr[j] - (double)mu); a = v > a ? v : a; }
            if (a > 0 && __builtin_isfinite(a)) {
                for (int64_t j = 0; j < n; ++j) { const double v = ((double)xr[j] - (double)mu) / a; q += v * v; }
                raw = (T)(a * sqrt(q / (double)n));
            } else raw = (T)a;
        } else raw = (T)sqrt((double)s2 / (double)n);
    } else if (norm == NMR_L1) {
        T s1 = 0;
        _Pragma("omp simd reduction(+:s1)")
        for (int64_t j = 0; j < n; ++j) s1 += nmr_fabs(xr[j] - mu);
        raw = s1 / (T)n;
    } else if (norm == NMR_LINF) {
        T mx = 0;
        _Pragma("omp simd reduction(max:mx)")
        for (int64_t j = 0; j < n; ++j) { const T a = nmr_fabs(xr[j] - mu); mx = a > mx ? a : mx; }
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
    } else { /* top-k of |d|: the maxima of NB interleaved blocks (block b: the elements j = b mod NB, so one
                vertical, fully vectorized max pass); the k-th largest of them, thr0, is at most the k-th largest
                |d|, so the top k lie among the elements >= thr0 of the (about k) blocks whose maximum is >= thr0,
                which go through a running set of k values and its smallest */
        T top[NMR_KMAX];
        int kept = 0, at = 0;
        T thr = 0;
        const int64_t nb = n < NMR_NB ? n : NMR_NB, full = n / nb * nb;
        T bm[NMR_NB];
        for (int64_t b = 0; b < nb; ++b) bm[b] = 0;
        for (int64_t j0 = 0; j0 < full; j0 += nb) {
            _Pragma("omp simd")
            for (int64_t b = 0; b < nb; ++b) { const T a = nmr_fabs(xr[j0 + b] - mu); bm[b] = a > bm[b] ? a : bm[b]; }
        }
        for (int64_t j = full; j < n; ++j) { const T a = nmr_fabs(xr[j] - mu); bm[j - full] = a > bm[j - full] ? a : bm[j - full]; }
        T thr0 = 0;
        if (nb > k) { /* the k-th largest block maximum, by the same running set */
            for (int64_t b = 0; b < nb; ++b) {
                const T a = bm[b];
                if (kept < k) { top[kept++] = a; if (kept < k) continue; }
                else if (a > thr0) top[at] = a;
                else continue;
                at = 0;
                for (int u = 1; u < k; ++u) if (top[u] < top[at]) at = u;
                thr0 = top[at];
            }
            kept = 0; at = 0;
        }
        for (int64_t b = 0; b < nb; ++b) {
            if (!(bm[b] >= thr0)) continue;
            for (int64_t j = b; j < n; j += nb) {
                const T a = nmr_fabs(xr[j] - mu);
                if (!(a >= thr0)) continue;
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

/* 16-bit rows <-> float: bfloat16 by shifts (round to nearest even, NaN kept, as c10::BFloat16), float16 by the
   F16C instructions where the CPU has them (else c10::Half's conversions) */
static inline void nmr_ld16(const c10::BFloat16 *src, float *dst, int64_t n) {
    const uint16_t *s = reinterpret_cast<const uint16_t *>(src);
    _Pragma("omp simd")
    for (int64_t j = 0; j < n; ++j) { union { uint32_t u; float f; } v; v.u = (uint32_t)s[j] << 16; dst[j] = v.f; }
}
static inline void nmr_st16(const float *src, c10::BFloat16 *dst, int64_t n) {
    uint16_t *d = reinterpret_cast<uint16_t *>(dst);
    _Pragma("omp simd")
    for (int64_t j = 0; j < n; ++j) {
        union { uint32_t u; float f; } v; v.f = src[j];
        const uint16_t r = (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
        d[j] = src[j] != src[j] ? (uint16_t)0x7FC0 : r;
    }
}
static inline void nmr_ld16(const c10::Half *src, float *dst, int64_t n) {
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(src + j))));
#endif
    for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}
static inline void nmr_st16(const float *src, c10::Half *dst, int64_t n) {
    int64_t j = 0;
#if defined(__F16C__)
    for (; j + 8 <= n; j += 8)
        _mm_storeu_si128(reinterpret_cast<__m128i *>(dst + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; j < n; ++j) dst[j] = c10::Half(src[j]);
}

/* the row in the compute type: src itself, or (16-bit) converted into buf */
template <typename TS, typename T>
static inline const T *nmr_row(const TS *src, int64_t n, T *buf) {
    if constexpr (std::is_same<TS, T>::value) {
        (void)buf; (void)n;
        return src;
    } else {
        nmr_ld16(src, buf, n);
        return buf;
    }
}

/* where a row's output is computed: dst itself, or (16-bit) buf, then stored by nmr_flush */
template <typename TS, typename T>
static inline T *nmr_out(TS *dst, T *buf) {
    if constexpr (std::is_same<TS, T>::value) { (void)buf; return dst; }
    else { (void)dst; return buf; }
}
template <typename TS, typename T>
static inline void nmr_flush(const T *buf, TS *dst, int64_t n) {
    if constexpr (!std::is_same<TS, T>::value) nmr_st16(buf, dst, n);
    else { (void)buf; (void)dst; (void)n; }
}

/* ∂L/∂x of one range chunk: r · (gh − base − ([x = max] wh − [x = min] wl)) (x <= max, x >= min: >= and <= test
   equality without the branch an == between floats costs the vectorizer) */
template <typename T>
static void nmr_range_out(const T *__restrict__ xc, const T *__restrict__ gc, T *__restrict__ oc, int64_t L, T rs,
                          T base, T h, T l, T wh, T wl) {
    _Pragma("omp simd")
    for (int64_t j = 0; j < L; ++j) {
        const T v = xc[j];
        oc[j] = rs * (gc[j] - base - ((T)(v >= h) * wh - (T)(v <= l) * wl));
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
        std::vector<T> buf(std::is_same<TS, T>::value ? 0 : n), ybuf(buf.size());
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
            T *__restrict__ yr = nmr_out<TS, T>(y + r * n, ybuf.data());
            if (elem) {
                if (w && b) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) yr[j] = (xr[j] - mu) * rs * w[j] + b[j];
                } else if (w) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) yr[j] = (xr[j] - mu) * rs * w[j];
                } else if (b) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) yr[j] = (xr[j] - mu) * rs + b[j];
                } else {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) yr[j] = (xr[j] - mu) * rs;
                }
            } else {
                const int64_t a0 = (r % G) * Cg;
                for (int64_t cg = 0; cg < Cg; ++cg) {
                    const T sc = rs * (w ? w[a0 + cg] : (T)1), bb = b ? b[a0 + cg] : (T)0;
                    const T *xs = xr + cg * S;
                    T *ys = yr + cg * S;
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < S; ++j) ys[j] = (xs[j] - mu) * sc + bb;
                }
            }
            nmr_flush<TS, T>(yr, y + r * n, n);
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
        std::vector<T> xbuf(conv ? n : 0), obuf(conv ? n : 0), gbuf(n), blk(affine_grads && elem ? 2 * n : 0, (T)0);
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
                for (int64_t j = 0; j < n; ++j) { /* branch-free: masks as 0 / 1 values (vectorizes) */
                    const T d = xr[j] - mu, a = nmr_fabs(d), sd = nmr_sign(d);
                    const T gt = (T)(a > tau), eq = (T)(a >= tau) - gt; /* a == tau without a branch */
                    cgt += gt; ceq += eq; sgt += gt * sd; seq += eq * sd;
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
                    for (int64_t j = 0; j < L; ++j) { nh += (T)(xc[j] >= h); nl += (T)(xc[j] <= l); } /* == max, min */
                    hi[ch] = h; lo[ch] = l; whi[ch] = (T)(Qm / nh); wlo[ch] = (T)(Qm / nl);
                }
            }
            const T base = (T)((centered ? (double)Sg / n : 0.0) - P), Qt = (T)Q;
            if (gx) {
                T *__restrict__ out = nmr_out<TS, T>(gx + r * n, obuf.data());
                if (norm == NMR_L2) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) out[j] = rs * (gh[j] - base - Qt * ((xr[j] - mu) * rs));
                } else if (norm == NMR_L1) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) out[j] = rs * (gh[j] - base - Qt * nmr_sign(xr[j] - mu));
                } else if (norm == NMR_LINF || norm == NMR_TOPK) {
                    _Pragma("omp simd")
                    for (int64_t j = 0; j < n; ++j) {
                        const T d = xr[j] - mu, a = nmr_fabs(d);
                        const T gt = (T)(a > tau);
                        const T e = nmr_sign(d) * (gt + ((T)(a >= tau) - gt) * wq);
                        out[j] = rs * (gh[j] - base - Qt * e);
                    }
                } else {
                    const int64_t L = n / m;
                    for (int ch = 0; ch < m; ++ch) {
                        const T h = hi[ch], l = lo[ch], wh = whi[ch], wl = wlo[ch];
                        nmr_range_out<T>(xr + ch * L, gh + ch * L, out + ch * L, L, rs, base, h, l, wh, wl);
                    }
                }
                nmr_flush<TS, T>(out, gx + r * n, n);
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

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC pop_options
#endif
