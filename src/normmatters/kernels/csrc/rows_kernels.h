// Channels-innermost layout (channels_last 4-d/5-d, or (N, C)): x is (R, C) contiguous, R = N·spatial rows.
// Every pass walks the rows in memory order, one contiguous range per thread, vectorized across the C
// channels of a row; outputs of native.STREAM_BYTES or more are written with non-temporal stores, row by
// row (consecutive rows are adjacent, so the write-combining buffers see whole lines). Per-thread partials
// (summed in T over blocks of NM_ROWBLK rows, then in double) go to ``scratch`` and are combined per
// channel between passes. Forward: Σx (range: max, min) → μ; l1/l2/linf:
// Σ|d|, Σd², max|d|, the top-k |d| → raw; then y. Backward: the channel sums → nm_coefs → ∂L/∂x.
// Scratch sizes (set by native.py): forward 4·nt·C doubles and (1 + 3·nt)·C T; backward 6·nt·C doubles and
// (10 + 6·nt)·C T, nt = nthreads. In place (forward: y = x; backward: bv, the bias, given) the backward
// rebuilds d = (y − b)/scale and linf/range thresholds from y (no in-place top-k here).
#pragma once
#include "channel_kernels.h"
#include "topk_net.h"

#define NM_ROWBLK 64

template <typename TS, bool INPL, typename T = typename NmElem<TS>::acc, typename E = NmElem<TS>>
static void nm_backward_rows_variant(const TS *__restrict__ g, const TS *__restrict__ x, TS *__restrict__ gx,
                            const T *__restrict__ w, const T *__restrict__ mean, const T *__restrict__ rawv,
                            const T *__restrict__ hiv, const T *__restrict__ lov, T *__restrict__ gw, T *__restrict__ gb,
                            int64_t R, int64_t C, int norm, double cn, double eps, int nthreads,
                            double *__restrict__ scratch, T *__restrict__ tscratch, int stream, int topk,
                            const T *__restrict__ bv)
{
    const double n = (double)R;
    /* shared per channel: the coefficients of nm_coefs and τ (linf: max|d|; range: max x); after the
       per-thread blocks, the element the formulas see, (x − sb)·ml with μ = mu: x itself (sb = 0, ml = 1,
       mu = mean), or in place (bv: the bias) d rebuilt from the output y as (y − b)/scale with mu = 0; and
       the min the range comparisons use */
    T *__restrict__ At = tscratch, *__restrict__ Bt = At + C, *__restrict__ Kt = Bt + C, *__restrict__ Kbt = Kt + C,
      *__restrict__ Wq = Kbt + C, *__restrict__ tau = Wq + C;
    T *__restrict__ sbv = tscratch + (int64_t)(6 + 6 * nthreads) * C, *__restrict__ mlv = sbv + C,
      *__restrict__ muv = mlv + C, *__restrict__ lov2 = muv + C;
    for (int64_t c = 0; c < C; ++c) {
        tau[c] = norm == NM_RANGE || norm == NM_TOPK ? (hiv ? hiv[c] : 0) : rawv[c];
        lov2[c] = lov ? lov[c] : 0;
        if (INPL) { sbv[c] = bv[c]; mlv[c] = (T)1 / nm_scale<T>(norm, cn, eps, w[c], rawv[c]); muv[c] = 0; }
        else { sbv[c] = 0; mlv[c] = 1; muv[c] = mean[c]; }
    }
    /* what the passes read: the parameters themselves unless in place */
    const T *__restrict__ mean_ = INPL ? muv : mean, *__restrict__ lov_ = INPL ? lov2 : lov;
    _Pragma("omp parallel num_threads(nthreads)")
    {
        const int t_ = omp_get_thread_num(), nt_ = omp_get_num_threads();
        const int64_t r0 = R * t_ / nt_, r1 = R * (t_ + 1) / nt_;
        if (INPL && (norm == NM_LINF || norm == NM_RANGE)) {
            /* in place: the thresholds from the rebuilt d (linf max |d|, range max and min d), per thread, then
               combined per channel */
            double *__restrict__ ph = scratch + (int64_t)t_ * 6 * C, *__restrict__ pl = ph + C;
            for (int64_t c = 0; c < C; ++c) { ph[c] = norm == NM_LINF ? 0.0 : -INFINITY; pl[c] = INFINITY; }
            for (int64_t r = r0; r < r1; ++r) {
                const TS *xr = x + r * C;
                if (norm == NM_LINF) {
                    _Pragma("omp simd")
                    for (int64_t c = 0; c < C; ++c) {
                        const double a = (double)E::abs((INPL ? (E::ld(xr[c]) - sbv[c]) * mlv[c] : E::ld(xr[c])));
                        ph[c] = a > ph[c] ? a : ph[c];
                    }
                } else {
                    _Pragma("omp simd")
                    for (int64_t c = 0; c < C; ++c) {
                        const double v = (double)((INPL ? (E::ld(xr[c]) - sbv[c]) * mlv[c] : E::ld(xr[c])));
                        ph[c] = v > ph[c] ? v : ph[c]; pl[c] = v < pl[c] ? v : pl[c];
                    }
                }
            }
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t c = 0; c < C; ++c) {
                double h = norm == NM_LINF ? 0.0 : -INFINITY, l = INFINITY;
                for (int u = 0; u < nt_; ++u) {
                    const double *q = scratch + (int64_t)u * 6 * C;
                    h = q[c] > h ? q[c] : h; l = q[C + c] < l ? q[C + c] : l;
                }
                tau[c] = (T)h; lov2[c] = (T)l;
            }
        }
        /* per thread, per channel: Σg, Σg·d, then l1: Σ sign d; linf: Σ sign and # over |d| > τ and over
           |d| = τ; range: # (x = max), # (x = min) */
        double *__restrict__ p = scratch + (int64_t)t_ * 6 * C;
        T *__restrict__ b1 = tscratch + (int64_t)(6 + 6 * t_) * C, *__restrict__ b2 = b1 + C, *__restrict__ b3 = b2 + C,
          *__restrict__ b4 = b3 + C, *__restrict__ b5 = b4 + C, *__restrict__ b6 = b5 + C;
        for (int64_t c = 0; c < 6 * C; ++c) p[c] = 0.0;
        for (int64_t rb = r0; rb < r1; rb += NM_ROWBLK) {
            const int64_t re = rb + NM_ROWBLK < r1 ? rb + NM_ROWBLK : r1;
            for (int64_t c = 0; c < 6 * C; ++c) b1[c] = 0;
            for (int64_t r = rb; r < re; ++r) {
                const TS *xr = x + r * C, *gr = g + r * C;
                if (norm == NM_L1) {
                    _Pragma("omp simd")
                    for (int64_t c = 0; c < C; ++c) {
                        const T d = (INPL ? (E::ld(xr[c]) - sbv[c]) * mlv[c] : E::ld(xr[c])) - mean_[c], gj = E::ld(gr[c]);
                        b1[c] += gj; b2[c] += gj * d; b3[c] += (T)(d > 0) - (T)(d < 0);
                    }
                } else if (norm == NM_LINF || norm == NM_TOPK) {
                    _Pragma("omp simd")
                    for (int64_t c = 0; c < C; ++c) {
                        const T d = (INPL ? (E::ld(xr[c]) - sbv[c]) * mlv[c] : E::ld(xr[c])) - mean_[c];
                        const T gj = E::ld(gr[c]), a = E::abs(d);
                        const T sd = (T)(d > 0) - (T)(d < 0);
                        b1[c] += gj; b2[c] += gj * d;
                        b3[c] += a > tau[c] ? sd : (T)0; b4[c] += a == tau[c] ? sd : (T)0;
                        b5[c] += (T)(a > tau[c]); b6[c] += (T)(a == tau[c]);
                    }
                } else if (norm == NM_RANGE) {
                    _Pragma("omp simd")
                    for (int64_t c = 0; c < C; ++c) {
                        const T v = (INPL ? (E::ld(xr[c]) - sbv[c]) * mlv[c] : E::ld(xr[c])), gj = E::ld(gr[c]);
                        b1[c] += gj; b2[c] += gj * (v - mean_[c]);
                        b3[c] += (T)(v == tau[c]); b4[c] += (T)(v == lov_[c]);
                    }
                } else {
                    _Pragma("omp simd")
                    for (int64_t c = 0; c < C; ++c) {
                        const T gj = E::ld(gr[c]);
                        b1[c] += gj; b2[c] += gj * ((INPL ? (E::ld(xr[c]) - sbv[c]) * mlv[c] : E::ld(xr[c])) - mean_[c]);
                    }
                }
            }
            for (int64_t c = 0; c < 6 * C; ++c) p[c] += (double)b1[c];
        }
        _Pragma("omp barrier")
        _Pragma("omp for schedule(static)")
        for (int64_t c = 0; c < C; ++c) {
            double q[6] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
            for (int u = 0; u < nt_; ++u)
                for (int k = 0; k < 6; ++k) q[k] += scratch[(int64_t)u * 6 * C + k * C + c];
            const int linf = norm == NM_LINF || norm == NM_TOPK, rng = norm == NM_RANGE;
            nm_coefs<T>(norm, topk, n, cn, eps, (double)w[c], (double)rawv[c], q[0], q[1],
                           norm == NM_L1 ? q[2] : 0.0, linf ? q[2] : 0.0, linf ? q[3] : 0.0,
                           linf ? q[4] : rng ? q[2] : 0.0, linf ? q[5] : rng ? q[3] : 0.0,
                           gw ? gw + c : NULL, gb ? gb + c : NULL, At + c, Bt + c, Kt + c, Kbt + c, Wq + c);
        }
        TS buf[NM_BLK] __attribute__((aligned(64)));
        if (gx) for (int64_t r = r0; r < r1; ++r) for (int64_t c0 = 0; c0 < C; c0 += NM_BLK) {
            const int64_t L = C - c0 < NM_BLK ? C - c0 : NM_BLK;
            const TS *xr = x + r * C + c0, *gr = g + r * C + c0;
            const T *A = At + c0, *B = Bt + c0, *K = Kt + c0, *Kb = Kbt + c0, *W = Wq + c0, *tu = tau + c0;
            const T *mu = mean_ + c0, *lo = lov_ ? lov_ + c0 : NULL, *sb = sbv + c0, *ml = mlv + c0;
            TS *out = stream ? buf : gx + r * C + c0;
            if (norm == NM_L2) {
                _Pragma("omp simd")
                for (int64_t c = 0; c < L; ++c)
                    out[c] = E::st(A[c] * E::ld(gr[c]) + B[c]
                                + K[c] * ((INPL ? (E::ld(xr[c]) - sb[c]) * ml[c] : E::ld(xr[c])) - mu[c]));
            } else if (norm == NM_L1) {
                _Pragma("omp simd")
                for (int64_t c = 0; c < L; ++c) {
                    const T d = (INPL ? (E::ld(xr[c]) - sb[c]) * ml[c] : E::ld(xr[c])) - mu[c];
                    out[c] = E::st(A[c] * E::ld(gr[c]) + B[c] + K[c] * ((T)(d > 0) - (T)(d < 0)));
                }
            } else if (norm == NM_LINF || norm == NM_TOPK) {
                _Pragma("omp simd")
                for (int64_t c = 0; c < L; ++c) {
                    const T d = (INPL ? (E::ld(xr[c]) - sb[c]) * ml[c] : E::ld(xr[c])) - mu[c], a = E::abs(d);
                    const T sd = (T)(d > 0) - (T)(d < 0);
                    const T e = a > tu[c] ? sd : (a == tu[c] ? sd * W[c] : (T)0);
                    out[c] = E::st(A[c] * E::ld(gr[c]) + B[c] + K[c] * e);
                }
            } else if (norm == NM_RANGE) {
                _Pragma("omp simd")
                for (int64_t c = 0; c < L; ++c) {
                    const T v = (INPL ? (E::ld(xr[c]) - sb[c]) * ml[c] : E::ld(xr[c]));
                    out[c] = E::st(A[c] * E::ld(gr[c]) + B[c] + (v == tu[c] ? K[c] : (T)0)
                                - (v == lo[c] ? Kb[c] : (T)0));
                }
            } else {
                _Pragma("omp simd")
                for (int64_t c = 0; c < L; ++c) out[c] = E::st(A[c] * E::ld(gr[c]) + B[c]);
            }
            if (stream) E::stream(gx + r * C + c0, buf, L);
        }
        if (gx && stream) NM_SFENCE();
    }
}

template <typename TS, typename T = typename NmElem<TS>::acc, typename E = NmElem<TS>>
int nm_forward_rows(const TS *x, TS *y, const T *__restrict__ w, const T *__restrict__ b,
                          T *__restrict__ mean_out, T *__restrict__ raw_out, T *__restrict__ hi_out,
                          T *__restrict__ lo_out, int64_t R, int64_t C, int norm, double cn, double eps,
                          int nthreads, double *__restrict__ scratch, T *__restrict__ tscratch,
                          T *__restrict__ run_mean, T *__restrict__ run_var, int64_t *__restrict__ nbt,
                          double momentum, double unbias, int buf_bf16, int stream, int topk,
                          T *__restrict__ tops, int32_t *__restrict__ topi)
{
    const double n = (double)R;
    T *__restrict__ scale = tscratch;
    _Pragma("omp parallel num_threads(nthreads)")
    {
        const int t_ = omp_get_thread_num(), nt_ = omp_get_num_threads();
        const int64_t r0 = R * t_ / nt_, r1 = R * (t_ + 1) / nt_;
        double *__restrict__ ps = scratch + (int64_t)t_ * 4 * C;
        T *__restrict__ blk = tscratch + (int64_t)(1 + 3 * t_) * C, *__restrict__ th = blk + C, *__restrict__ tl = th + C;
        for (int64_t c = 0; c < C; ++c) { ps[c] = 0.0; th[c] = -INFINITY; tl[c] = INFINITY; }
        for (int64_t rb = r0; rb < r1; rb += NM_ROWBLK) {
            const int64_t re = rb + NM_ROWBLK < r1 ? rb + NM_ROWBLK : r1;
            for (int64_t c = 0; c < C; ++c) blk[c] = 0;
            for (int64_t r = rb; r < re; ++r) {
                const TS *xr = x + r * C;
                if (norm == NM_RANGE) {
                    _Pragma("omp simd")
                    for (int64_t c = 0; c < C; ++c) {
                        const T v = E::ld(xr[c]);
                        blk[c] += v; th[c] = v > th[c] ? v : th[c]; tl[c] = v < tl[c] ? v : tl[c];
                    }
                } else {
                    _Pragma("omp simd")
                    for (int64_t c = 0; c < C; ++c) blk[c] += E::ld(xr[c]);
                }
            }
            for (int64_t c = 0; c < C; ++c) ps[c] += (double)blk[c];
        }
        _Pragma("omp barrier")
        _Pragma("omp for schedule(static)")
        for (int64_t c = 0; c < C; ++c) {
            double sum = 0.0;
            T hi = -INFINITY, lo = INFINITY;
            for (int u = 0; u < nt_; ++u) {
                const T *q = tscratch + (int64_t)(1 + 3 * u) * C;
                sum += scratch[(int64_t)u * 4 * C + c];
                hi = q[C + c] > hi ? q[C + c] : hi; lo = q[2 * C + c] < lo ? q[2 * C + c] : lo;
            }
            mean_out[c] = (T)(sum / n);
            if (norm == NM_RANGE) { hi_out[c] = hi; lo_out[c] = lo; raw_out[c] = hi - lo; }
            else if (norm == NM_MEAN) raw_out[c] = mean_out[c];
        }
        if (norm == NM_L1 || norm == NM_L2 || norm == NM_LINF) {
            for (int64_t c = 0; c < C; ++c) ps[c] = 0.0;
            for (int64_t rb = r0; rb < r1; rb += NM_ROWBLK) {
                const int64_t re = rb + NM_ROWBLK < r1 ? rb + NM_ROWBLK : r1;
                for (int64_t c = 0; c < C; ++c) blk[c] = 0;
                for (int64_t r = rb; r < re; ++r) {
                    const TS *xr = x + r * C;
                    if (norm == NM_L1) {
                        _Pragma("omp simd")
                        for (int64_t c = 0; c < C; ++c) blk[c] += E::abs(E::ld(xr[c]) - mean_out[c]);
                    } else if (norm == NM_L2) {
                        _Pragma("omp simd")
                        for (int64_t c = 0; c < C; ++c) {
                            const T d = E::ld(xr[c]) - mean_out[c]; blk[c] += d * d;
                        }
                    } else {
                        _Pragma("omp simd")
                        for (int64_t c = 0; c < C; ++c) {
                            const T a = E::abs(E::ld(xr[c]) - mean_out[c]); blk[c] = a > blk[c] ? a : blk[c];
                        }
                    }
                }
                if (norm == NM_L2) for (int64_t c = 0; c < C; ++c) if (!isfinite(blk[c])) {
                    /* d² overflowed T (|d| > ~1.8e19 in float): this channel's rows again in double */
                    double s2 = 0.0;
                    for (int64_t r = rb; r < re; ++r) {
                        const double d = (double)E::ld(x[r * C + c]) - mean_out[c]; s2 += d * d;
                    }
                    ps[c] += s2; blk[c] = 0;
                }
                for (int64_t c = 0; c < C; ++c)
                    ps[c] = norm != NM_LINF ? ps[c] + (double)blk[c]
                                            : ((double)blk[c] > ps[c] ? (double)blk[c] : ps[c]);
            }
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t c = 0; c < C; ++c) {
                double acc = 0.0;
                for (int u = 0; u < nt_; ++u) {
                    const double v = scratch[(int64_t)u * 4 * C + c];
                    acc = norm == NM_LINF ? (v > acc ? v : acc) : acc + v;
                }
                raw_out[c] = (T)(norm == NM_L1 ? acc / n : norm == NM_L2 ? sqrt(acc / n) : acc);
                if (norm == NM_L2 && !isfinite(raw_out[c]) && isfinite(mean_out[c])) /* Σd² overflowed */
                    raw_out[c] = (T)nm_l2_rescaled<TS, E>(x + c, R, C, 1, 1, (double)mean_out[c], n);
            }
        }
        if (norm == NM_TOPK) {
            /* per thread and channel, the topk largest |d| of its rows (tops: C·topk values, then C thresholds;
               topi: C counts, then C positions of the smallest kept); 64 channels of a row are looked at element
               by element only if one's |d| beats (or, NaN, does not trail) that channel's threshold */
            T *__restrict__ tv = tops + (int64_t)t_ * C * (topk + 1), *__restrict__ thr = tv + C * topk;
            int32_t *__restrict__ cnt = topi + (int64_t)t_ * 2 * C, *__restrict__ at = cnt + C;
            /* sorted lists from the insertion network where it applies (topk_net.h; every thread alike) */
            const int net = nt_ <= 256 && nm_topk_rows_net<TS, T>(x, mean_out, r0, r1, C, topk, tv, cnt);
            if (!net) for (int64_t c = 0; c < C; ++c) { cnt[c] = 0; at[c] = 0; thr[c] = -1; }
            if (!net) for (int64_t r = r0; r < r1; ++r) for (int64_t c0 = 0; c0 < C; c0 += 64) {
                const TS *xr = x + r * C;
                const int64_t c1 = C - c0 < 64 ? C : c0 + 64;
                int hit = 0;
                _Pragma("omp simd reduction(|:hit)")
                for (int64_t c = c0; c < c1; ++c) hit |= !(E::abs(E::ld(xr[c]) - mean_out[c]) <= thr[c]);
                if (!hit) continue;
                for (int64_t c = c0; c < c1; ++c) {
                    const T a = E::abs(E::ld(xr[c]) - mean_out[c]);
                    T *__restrict__ top = tv + c * topk;
                    if (cnt[c] < topk) { top[cnt[c]++] = a; if (cnt[c] < topk) continue; }
                    else if (a > thr[c]) top[at[c]] = a;
                    else continue;
                    int m = 0; /* (re)locate the smallest kept value: the new threshold */
                    for (int u = 1; u < topk; ++u) if (top[u] < top[m]) m = u;
                    at[c] = m; thr[c] = top[m];
                }
            }
            _Pragma("omp barrier")
            _Pragma("omp for schedule(static)")
            for (int64_t c = 0; c < C; ++c) { /* merge the threads' candidates as the channel kernel keeps them */
                if (net) {
                    double acc;
                    T th;
                    nm_topk_merge_sorted<T>(tops, C * (topk + 1), topi, 2 * C, nt_, c, topk, &acc, &th);
                    /* μ not finite: |d| has NaN, which the network does not order; the statistic is NaN */
                    const int fin = isfinite(mean_out[c]);
                    raw_out[c] = fin ? (T)(acc / topk) : (T)NAN;
                    hi_out[c] = fin ? th : (T)NAN;
                    continue;
                }
                T top[NM_KMAX];
                int kept = 0, m = 0;
                T th = 0;
                for (int u = 0; u < nt_; ++u) {
                    const T *uv = tops + (int64_t)u * C * (topk + 1) + c * topk;
                    const int32_t un = topi[(int64_t)u * 2 * C + c];
                    for (int32_t i = 0; i < un; ++i) {
                        const T a = uv[i];
                        if (kept < topk) { top[kept++] = a; if (kept < topk) continue; }
                        else if (a > th) top[m] = a;
                        else continue;
                        m = 0;
                        for (int v = 1; v < topk; ++v) if (top[v] < top[m]) m = v;
                        th = top[m];
                    }
                }
                double acc = 0.0;
                for (int v = 0; v < kept; ++v) acc += (double)top[v];
                raw_out[c] = (T)(acc / topk);
                hi_out[c] = th; /* τ, the k-th largest |d| */
            }
        }
        _Pragma("omp for schedule(static)")
        for (int64_t c = 0; c < C; ++c) scale[c] = nm_scale<T>(norm, cn, eps, w[c], raw_out[c]);
        TS buf[NM_BLK] __attribute__((aligned(64)));
        for (int64_t r = r0; r < r1; ++r) for (int64_t c0 = 0; c0 < C; c0 += NM_BLK) {
            const int64_t L = C - c0 < NM_BLK ? C - c0 : NM_BLK;
            const TS *xr = x + r * C + c0;
            const T *mr = mean_out + c0, *sr = scale + c0, *br = b + c0;
            TS *yr = stream ? buf : y + r * C + c0;
            _Pragma("omp simd")
            for (int64_t c = 0; c < L; ++c) yr[c] = E::st((E::ld(xr[c]) - mr[c]) * sr[c] + br[c]);
            if (stream) E::stream(y + r * C + c0, buf, L);
        }
        if (stream) NM_SFENCE();
    }
    return nm_update<T>(mean_out, raw_out, C, norm, cn, run_mean, run_var, nbt, momentum, unbias,
                           buf_bf16);
}


template <typename TS, typename T = typename NmElem<TS>::acc, typename E = NmElem<TS>>
void nm_backward_rows(const TS *__restrict__ g, const TS *__restrict__ x, TS *__restrict__ gx,
                            const T *__restrict__ w, const T *__restrict__ mean, const T *__restrict__ rawv,
                            const T *__restrict__ hiv, const T *__restrict__ lov, T *__restrict__ gw, T *__restrict__ gb,
                            int64_t R, int64_t C, int norm, double cn, double eps, int nthreads,
                            double *__restrict__ scratch, T *__restrict__ tscratch, int stream, int topk,
                            const T *__restrict__ bv)
{
    if (bv)
        nm_backward_rows_variant<TS, true, T>(g, x, gx, w, mean, rawv, hiv, lov, gw, gb, R, C, norm, cn, eps, nthreads,
                                    scratch, tscratch, stream, topk, bv);
    else
        nm_backward_rows_variant<TS, false, T>(g, x, gx, w, mean, rawv, hiv, lov, gw, gb, R, C, norm, cn, eps, nthreads,
                                     scratch, tscratch, stream, topk, bv);
}
