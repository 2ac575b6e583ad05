#ifndef SNAPSHOTD_STAGE_AVERAGING_H
#define SNAPSHOTD_STAGE_AVERAGING_H
/* CheckFree's inner loops: out[i] = wp*previous[i] + wn*next[i] computed in
 * fp32 (no fused multiply-add, so every machine gives the same bits) and
 * rounded to nearest even. Each returns 1 when every input element is finite,
 * 0 when one is NaN or infinite (the output is then meaningless). On CPUs
 * with AVX2 and F16C a vectorized version runs; elsewhere a portable one. */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* Bit-level conversions (exact, round to nearest even, branch-free), shared
 * by the loops and by Swift (StageAveraging.float16Bits and friends). */

static inline uint32_t stage_float_bits(float value) { uint32_t bits; memcpy(&bits, &value, 4); return bits; }
static inline float stage_bits_float(uint32_t bits) { float value; memcpy(&value, &bits, 4); return value; }

static inline float stage_bf16_to_float(uint16_t h) { return stage_bits_float((uint32_t)h << 16); }

/* Overflow carries into infinity; NaN inputs are not handled (the loops refuse them). */
static inline uint16_t stage_float_to_bf16(float value) {
    uint32_t bits = stage_float_bits(value);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

static inline float stage_f16_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t magnitude = h & 0x7FFFu;
    uint32_t exponent = magnitude & 0x7C00u;
    float normal = stage_bits_float((magnitude << 13) + (112u << 23));
    float subnormal = (float)(int32_t)magnitude * stage_bits_float(0x33800000u); /* mantissa × 2^-24 */
    float special = stage_bits_float(0x7F800000u | (magnitude & 0x03FFu) << 13);
    float value = exponent == 0 ? subnormal : (exponent == 0x7C00u ? special : normal);
    return stage_bits_float(stage_float_bits(value) | sign);
}

static inline uint16_t stage_float_to_f16(float value) {
    uint32_t bits = stage_float_bits(value);
    uint16_t sign = (uint16_t)((bits >> 16) & 0x8000u);
    uint32_t magnitude = bits & 0x7FFFFFFFu;
    uint16_t overflow = magnitude > 0x7F800000u ? 0x7E00 : 0x7C00;
    uint16_t subnormal = (uint16_t)(stage_float_bits(stage_bits_float(magnitude) + 0.5f) - 0x3F000000u);
    uint32_t odd = (magnitude >> 13) & 1u;
    uint16_t normal = (uint16_t)((magnitude - (112u << 23) + 0x0FFFu + odd) >> 13);
    uint16_t result = magnitude >= 0x47800000u ? overflow : (magnitude < 0x38800000u ? subnormal : normal);
    return result | sign;
}


int stage_average_f32(const float *previous, const float *next, size_t count, float wp, float wn, float *out);
int stage_average_bf16(const uint16_t *previous, const uint16_t *next, size_t count, float wp, float wn, uint16_t *out);
int stage_average_f16(const uint16_t *previous, const uint16_t *next, size_t count, float wp, float wn, uint16_t *out);

/* Tests: 1 forces the portable versions, 0 lets the CPU decide. */
void stage_averaging_force_portable(int force);
/* 1 when the vectorized versions run. */
int stage_averaging_uses_avx2(void);
#endif
