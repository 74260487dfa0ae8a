/* Compiled dequantization kernel of the int8 codec, loaded with ctypes
 * (kv3d_codec_int8/kernels.py); the numpy kernels in codec.py are the fallback and the
 * reference: this gives their bits exactly, for every scale.
 *
 *   out[g*group + j] = float16 bits of codes[g*group + j] * scale[g] / F16_SHIFT
 *
 * where scale[] are float32 values already multiplied by F16_SHIFT (see
 * kv3d_core/kv/quant_kernels.py): the product of |code| and the scale is ONE float32
 * multiply (exact: a 7-bit code times an 11-bit float16 mantissa), its bits shifted
 * right by 13 and cut to 16 bits are the float16 magnitude, and a negative code sets
 * bit 15. Plain C that compilers vectorize; an AVX2 build of the same loop is picked at
 * run time where the CPU has it. The bits do not depend on which one runs (one IEEE
 * multiply per value, nothing to contract into an FMA). No Python API: a plain shared
 * library, so it builds without the Python headers.
 */
#include <stdint.h>
#include <string.h>

/* One value: the float16 bits of |q| * s (one float32 multiply), cut to 16 bits, sign from q. */
static inline uint16_t bits1(int32_t q, float s) {
    const float y = (float)(q < 0 ? -q : q) * s;
    uint32_t b;
    memcpy(&b, &y, sizeof b);
    return (uint16_t)((b >> 13) | (q < 0 ? 0x8000u : 0u));
}

static void dequant_generic(const int8_t *codes, const float *scale, int64_t n_groups, int64_t group,
                            uint16_t *out) {
    for (int64_t g = 0; g < n_groups; g++)
        for (int64_t j = 0; j < group; j++)
            out[g * group + j] = bits1(codes[g * group + j], scale[g]);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>

/* 8 codes -> 8 int32 holding the float16 bits (low 16 bits; the mask keeps exactly
 * what bits1's cast to uint16 keeps). */
__attribute__((target("avx2")))
static inline __m256i bits8(const int8_t *c, __m256 s) {
    const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)c));
    const __m256 y = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_abs_epi32(q)), s);
    __m256i b = _mm256_and_si256(_mm256_srli_epi32(_mm256_castps_si256(y), 13), _mm256_set1_epi32(0xFFFF));
    const __m256i neg = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_setzero_si256(), q), _mm256_set1_epi32(0x8000));
    return _mm256_or_si256(b, neg);
}

__attribute__((target("avx2")))
static void dequant_avx2(const int8_t *codes, const float *scale, int64_t n_groups, int64_t group,
                         uint16_t *out) {
    for (int64_t g = 0; g < n_groups; g++) {
        const int8_t *c = codes + g * group;
        uint16_t *o = out + g * group;
        const __m256 s = _mm256_set1_ps(scale[g]);
        int64_t j = 0;
        for (; j + 16 <= group; j += 16) {
            const __m256i lo = bits8(c + j, s), hi = bits8(c + j + 8, s);
            /* packus works per 128-bit lane: reorder the 64-bit quarters back */
            const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(lo, hi), 0xD8);
            _mm256_storeu_si256((__m256i *)(o + j), packed);
        }
        for (; j < group; j++)
            o[j] = bits1(c[j], scale[g]);
    }
}
#endif

/* The kernel; returns 0. Every value of out[0 .. n_groups*group) is written. */
int kv3d_int8_dequant(const int8_t *codes, const float *scale, int64_t n_groups, int64_t group,
                      uint16_t *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2")) {
        dequant_avx2(codes, scale, n_groups, group, out);
        return 0;
    }
#endif
    dequant_generic(codes, scale, n_groups, group, out);
    return 0;
}

/* Which build runs here: 2 = AVX2, 1 = generic. */
int kv3d_int8_kernel_level(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx2"))
        return 2;
#endif
    return 1;
}
