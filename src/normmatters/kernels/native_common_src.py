"""C99 source shared by both native kernel families (:mod:`.native_src` channel kernels, :mod:`.native_rows_src`
rows kernels): the norm codes and sizes, non-temporal stores of a finished block, the bfloat16 load/store
(round to nearest even, NaN kept, as c10::BFloat16) and the running-buffer update for bfloat16 buffers.
Prepended to :data:`.native_src.SOURCE`; the generated source is one translation unit.
"""

#: the includes, defines and type-independent helpers that precede the per-type kernel macros
COMMON_SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define NM_MEAN 0
#define NM_L2 1
#define NM_L1 2
#define NM_LINF 3
#define NM_RANGE 4
#define NM_TOPK 5 /* k <= NM_KMAX */
#define NM_KMAX 64
#define NM_BLK 1024
#define NM_CBMAX 64 /* most channels in one block of the channel kernels */

/* non-temporal stores of a finished block: the output is not read again by this kernel, so streaming it
   skips the read-for-ownership of every written line (a third of the DRAM traffic of a pass) */
#if defined(__AVX__)
#include <immintrin.h>
static inline void nm_stream_f32(float *restrict dst, const float *restrict src, int64_t n) {
    int64_t j = 0;
    for (; j < n && ((uintptr_t)(dst + j) & 31); ++j) dst[j] = src[j];
    for (; j + 8 <= n; j += 8) _mm256_stream_ps(dst + j, _mm256_loadu_ps(src + j));
    for (; j < n; ++j) dst[j] = src[j];
}
static inline void nm_stream_f64(double *restrict dst, const double *restrict src, int64_t n) {
    int64_t j = 0;
    for (; j < n && ((uintptr_t)(dst + j) & 31); ++j) dst[j] = src[j];
    for (; j + 4 <= n; j += 4) _mm256_stream_pd(dst + j, _mm256_loadu_pd(src + j));
    for (; j < n; ++j) dst[j] = src[j];
}
static inline void nm_stream_bf16(uint16_t *restrict dst, const uint16_t *restrict src, int64_t n) {
    int64_t j = 0;
    for (; j < n && ((uintptr_t)(dst + j) & 31); ++j) dst[j] = src[j];
    for (; j + 16 <= n; j += 16)
        _mm256_stream_si256((__m256i *)(dst + j), _mm256_loadu_si256((const __m256i *)(src + j)));
    for (; j < n; ++j) dst[j] = src[j];
}
#define NM_SFENCE() _mm_sfence()
#else
static inline void nm_stream_f32(float *restrict dst, const float *restrict src, int64_t n) {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
}
static inline void nm_stream_f64(double *restrict dst, const double *restrict src, int64_t n) {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
}
static inline void nm_stream_bf16(uint16_t *restrict dst, const uint16_t *restrict src, int64_t n) {
    for (int64_t j = 0; j < n; ++j) dst[j] = src[j];
}
#define NM_SFENCE() ((void)0)
#endif

/* element storage <-> compute type. bfloat16 is stored as uint16_t and computed in float (the accumulation
   dtype, as nn.BatchNorm and the reference path); float -> bfloat16 rounds to nearest even, NaN stays NaN
   (as c10::BFloat16). */
static inline float nm_ld_bf16(uint16_t v) {
    union { uint32_t u; float f; } r; r.u = (uint32_t)v << 16; return r.f;
}
static inline uint16_t nm_st_bf16(float f) {
    union { uint32_t u; float f; } r; r.f = f;
    if (f != f) return 0x7FC0;
    return (uint16_t)((r.u + 0x7FFFu + ((r.u >> 16) & 1u)) >> 16);
}
#define NM_ID(v) (v)

/* functional.update_running_stats for bfloat16 buffers and float32 statistics, rounding to bfloat16 after
   each tensor op as the reference does (buf + (new.to(bf16) - buf) * momentum, new for the variance computed
   in float32 first). Returns the "statistics are finite" flag; buffers (NULL: absent) unchanged when 0. */
static int nm_update_running_bf16buf(const float *restrict mean, const float *restrict raw, int64_t C,
                                     int norm, double cn, uint16_t *restrict run_mean,
                                     uint16_t *restrict run_var, int64_t *restrict nbt, double momentum,
                                     double unbias) {
    const float ct = (float)cn, mom = (float)momentum, unb = (float)unbias;
    int ok = 1;
    for (int64_t c = 0; c < C; ++c) {
        if (!isfinite(mean[c])) ok = 0;
        if (norm != NM_MEAN && !isfinite(ct * raw[c])) ok = 0;
    }
    if (!ok) return 0;
    /* finite statistics whose running_var would overflow bfloat16 (σ̂²·n/(n−1) > max): every buffer unchanged, 2 */
    if (run_var && norm != NM_MEAN) for (int64_t c = 0; c < C; ++c) {
        const float sigma = ct * raw[c], b = nm_ld_bf16(run_var[c]);
        const float d = nm_ld_bf16(nm_st_bf16(nm_ld_bf16(nm_st_bf16((sigma * sigma) * unb)) - b));
        if (!isfinite(nm_ld_bf16(nm_st_bf16(b + nm_ld_bf16(nm_st_bf16(d * mom)))))) return 2;
    }
    for (int64_t c = 0; c < C; ++c) {
        if (run_mean) {
            const float b = nm_ld_bf16(run_mean[c]);
            const float d = nm_ld_bf16(nm_st_bf16(nm_ld_bf16(nm_st_bf16(mean[c])) - b));
            run_mean[c] = nm_st_bf16(b + nm_ld_bf16(nm_st_bf16(d * mom)));
        }
        if (run_var && norm != NM_MEAN) {
            const float sigma = ct * raw[c], b = nm_ld_bf16(run_var[c]);
            const float d = nm_ld_bf16(nm_st_bf16(nm_ld_bf16(nm_st_bf16((sigma * sigma) * unb)) - b));
            run_var[c] = nm_st_bf16(b + nm_ld_bf16(nm_st_bf16(d * mom)));
        }
    }
    if (nbt) *nbt += 1;
    return 1;
}

"""
