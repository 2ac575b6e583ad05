#include "stage_averaging.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define STAGE_AVERAGING_X86 1
#endif

/* Separate multiply and add everywhere: a fused multiply-add would round
 * once instead of twice and make results depend on the CPU. */
#pragma clang fp contract(off)

static int force_portable = 0;  /* read and written atomically: tests flip it */

void stage_averaging_force_portable(int force) { __atomic_store_n(&force_portable, force, __ATOMIC_RELAXED); }

static int cpu_has_avx2(void) {
#if STAGE_AVERAGING_X86
    static int cached = -1;  /* every thread computes the same value */
    int known = __atomic_load_n(&cached, __ATOMIC_RELAXED);
    if (known < 0) {
        __builtin_cpu_init();
        known = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
        __atomic_store_n(&cached, known, __ATOMIC_RELAXED);
    }
    return known;
#else
    return 0;
#endif
}

int stage_averaging_uses_avx2(void) { return !__atomic_load_n(&force_portable, __ATOMIC_RELAXED) && cpu_has_avx2(); }

/* The sign position is set when the exponent bits are all ones (NaN or infinity). */
#define NON_FINITE(bits, mask, lowest, top) ((((bits) & (mask)) + (lowest)) & (top))

/* ---- the loops; each is compiled twice: portable, and for AVX2 + F16C ---- */

#define AVERAGE_F32_BODY                                                                  \
    uint32_t non_finite = 0;                                                             \
    for (size_t i = 0; i < count; i++) {                                                 \
        float x = previous[i], y = next[i];                                              \
        non_finite |= NON_FINITE(stage_float_bits(x), 0x7F800000u, 0x00800000u, 0x80000000u)   \
                    | NON_FINITE(stage_float_bits(y), 0x7F800000u, 0x00800000u, 0x80000000u);  \
        out[i] = wp * x + wn * y;                                                        \
    }                                                                                    \
    return non_finite == 0;

#define AVERAGE_BF16_BODY                                                                \
    uint32_t non_finite = 0;                                                             \
    for (size_t i = 0; i < count; i++) {                                                 \
        uint32_t x = previous[i], y = next[i];                                           \
        non_finite |= NON_FINITE(x, 0x7F80u, 0x0080u, 0x8000u) | NON_FINITE(y, 0x7F80u, 0x0080u, 0x8000u); \
        out[i] = stage_float_to_bf16(wp * stage_bits_float(x << 16) + wn * stage_bits_float(y << 16));     \
    }                                                                                    \
    return non_finite == 0;

static int average_f32_portable(const float *previous, const float *next, size_t count, float wp, float wn, float *out) { AVERAGE_F32_BODY }
static int average_bf16_portable(const uint16_t *previous, const uint16_t *next, size_t count, float wp, float wn, uint16_t *out) { AVERAGE_BF16_BODY }

static int average_f16_portable(const uint16_t *previous, const uint16_t *next, size_t count, float wp, float wn, uint16_t *out) {
    uint32_t non_finite = 0;
    for (size_t i = 0; i < count; i++) {
        uint32_t x = previous[i], y = next[i];
        non_finite |= NON_FINITE(x, 0x7C00u, 0x0400u, 0x8000u) | NON_FINITE(y, 0x7C00u, 0x0400u, 0x8000u);
        out[i] = stage_float_to_f16(wp * stage_f16_to_float((uint16_t)x) + wn * stage_f16_to_float((uint16_t)y));
    }
    return non_finite == 0;
}

#if STAGE_AVERAGING_X86
__attribute__((target("avx2")))
static int average_f32_avx2(const float *previous, const float *next, size_t count, float wp, float wn, float *out) { AVERAGE_F32_BODY }
__attribute__((target("avx2")))
static int average_bf16_avx2(const uint16_t *previous, const uint16_t *next, size_t count, float wp, float wn, uint16_t *out) { AVERAGE_BF16_BODY }

/* F16C converts 8 halves at a time, exactly, rounding to nearest even. */
__attribute__((target("avx2,f16c")))
static int average_f16_avx2(const uint16_t *previous, const uint16_t *next, size_t count, float wp, float wn, uint16_t *out) {
    const __m256 vp = _mm256_set1_ps(wp), vn = _mm256_set1_ps(wn);
    const __m128i mask = _mm_set1_epi16(0x7C00);
    __m128i non_finite = _mm_setzero_si128();
    size_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m128i hx = _mm_loadu_si128((const __m128i *)(previous + i));
        __m128i hy = _mm_loadu_si128((const __m128i *)(next + i));
        non_finite = _mm_or_si128(non_finite, _mm_or_si128(_mm_cmpeq_epi16(_mm_and_si128(hx, mask), mask),
                                                           _mm_cmpeq_epi16(_mm_and_si128(hy, mask), mask)));
        __m256 sum = _mm256_add_ps(_mm256_mul_ps(vp, _mm256_cvtph_ps(hx)), _mm256_mul_ps(vn, _mm256_cvtph_ps(hy)));
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(sum, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    int finite = _mm_testz_si128(non_finite, non_finite);
    return average_f16_portable(previous + i, next + i, count - i, wp, wn, out + i) && finite;
}
#else
/* Other CPUs: stage_averaging_uses_avx2() is 0, so these are never called. */
#define average_f32_avx2 average_f32_portable
#define average_bf16_avx2 average_bf16_portable
#define average_f16_avx2 average_f16_portable
#endif

int stage_average_f32(const float *previous, const float *next, size_t count, float wp, float wn, float *out) {
    return stage_averaging_uses_avx2() ? average_f32_avx2(previous, next, count, wp, wn, out) : average_f32_portable(previous, next, count, wp, wn, out);
}

int stage_average_bf16(const uint16_t *previous, const uint16_t *next, size_t count, float wp, float wn, uint16_t *out) {
    return stage_averaging_uses_avx2() ? average_bf16_avx2(previous, next, count, wp, wn, out) : average_bf16_portable(previous, next, count, wp, wn, out);
}

int stage_average_f16(const uint16_t *previous, const uint16_t *next, size_t count, float wp, float wn, uint16_t *out) {
    return stage_averaging_uses_avx2() ? average_f16_avx2(previous, next, count, wp, wn, out) : average_f16_portable(previous, next, count, wp, wn, out);
}
