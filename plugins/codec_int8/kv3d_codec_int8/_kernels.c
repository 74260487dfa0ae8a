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
 *
 * kv3d_int8_decode_chunks decodes whole chunks of a payload in one call: each chunk's
 * two zstd frames (high and low nibbles of its codes) are decompressed into small
 * buffers, joined, and dequantized straight into the caller's output arrays. zstd comes in as two function pointers (ZSTD_decompressDCtx,
 * ZSTD_isError of the system's libzstd, resolved by kernels.py), so this file needs no
 * zstd headers and links nothing. ctypes releases the GIL for the call: a restore's
 * chunks decode on several cores at once.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
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

/* 16 codes -> 16 float16 bits: the same steps on 16 lanes; the narrowing store keeps the
 * low 16 bits of each lane (what bits1's cast keeps), the sign comes in by mask. */
__attribute__((target("avx512f,avx512bw")))
static void dequant_avx512(const int8_t *codes, const float *scale, int64_t n_groups, int64_t group,
                           uint16_t *out) {
    const __m512i sign = _mm512_set1_epi32(0x8000);
    for (int64_t g = 0; g < n_groups; g++) {
        const int8_t *c = codes + g * group;
        uint16_t *o = out + g * group;
        const __m512 s = _mm512_set1_ps(scale[g]);
        int64_t j = 0;
        for (; j + 16 <= group; j += 16) {
            const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(c + j)));
            const __m512 y = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_abs_epi32(q)), s);
            const __m512i b = _mm512_srli_epi32(_mm512_castps_si512(y), 13);
            const __m512i r = _mm512_mask_or_epi32(b, _mm512_cmplt_epi32_mask(q, _mm512_setzero_si512()), b, sign);
            _mm256_storeu_si256((__m256i *)(o + j), _mm512_cvtepi32_epi16(r));
        }
        for (; j < group; j++)
            o[j] = bits1(c[j], scale[g]);
    }
}
#endif

/* Which build runs here: 3 = AVX-512, 2 = AVX2, 1 = generic. */
int kv3d_int8_kernel_level(void) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw"))
        return 3;
    if (__builtin_cpu_supports("avx2"))
        return 2;
#endif
    return 1;
}

/* Every value of out[0 .. n_groups*group) on the build of that level (the CPU runs it). */
static void dequant_level(int level, const int8_t *codes, const float *scale, int64_t n_groups, int64_t group,
                          uint16_t *out) {
#if defined(__x86_64__) && defined(__GNUC__)
    if (level == 3)
        dequant_avx512(codes, scale, n_groups, group, out);
    else if (level == 2)
        dequant_avx2(codes, scale, n_groups, group, out);
    else
#endif
        dequant_generic(codes, scale, n_groups, group, out);
}

/* The kernel of one build (level as above; tests compare them); returns 0, or -1 when
 * this CPU cannot run that build. */
int kv3d_int8_dequant_at(int level, const int8_t *codes, const float *scale, int64_t n_groups, int64_t group,
                         uint16_t *out) {
    if (level < 1 || level > kv3d_int8_kernel_level())
        return -1;
    dequant_level(level, codes, scale, n_groups, group, out);
    return 0;
}

/* The kernel, on the best build this CPU runs; returns 0. */
int kv3d_int8_dequant(const int8_t *codes, const float *scale, int64_t n_groups, int64_t group,
                      uint16_t *out) {
    static int level = 0;           /* benign race: every thread computes the same value */
    if (level == 0)
        level = kv3d_int8_kernel_level();
    dequant_level(level, codes, scale, n_groups, group, out);
    return 0;
}

/* ---- encoder: the quantizer ------------------------------------------------------------
 * kv3d_int8_quantize gives, bit for bit, what codec._quantize (numpy) gives:
 *   am = max |x| over the group (float32), t = am / 127 in double,
 *   s  = the smallest float16 >= t, or the largest <= t where 127*s would pass 65504,
 *   q  = clamp(rint(x / s), -127, 127) with one float32 division (0 where s = 0).
 * Every step is one IEEE operation (conversions exact, rint half to even), so the
 * AVX2/F16C loop and the plain one agree with numpy. */

/* float16 bits -> float (exact; subnormals, inf and NaN too). */
static inline float h2f(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    uint32_t f;
    if (e == 0) {
        float v = (float)m * (1.0f / 16777216.0f);      /* m * 2**-24, exact */
        memcpy(&f, &v, sizeof f);
        f |= sign;
    } else if (e == 31) {
        f = sign | 0x7F800000u | (m << 13);
    } else {
        f = sign | ((e + 112u) << 23) | (m << 13);
    }
    float r;
    memcpy(&r, &f, sizeof r);
    return r;
}

/* The smallest float16 >= t (0 <= t <= 65504), as bits. */
static uint16_t f16_ceil(double t) {
    uint16_t h;
    if (t < 6.103515625e-05) {                     /* below 2**-14: subnormal steps of 2**-24 */
        h = (uint16_t)(t * 16777216.0);
    } else {
        int e;
        const double m = frexp(t, &e);             /* t = m * 2**e, 0.5 <= m < 1 */
        h = (uint16_t)(((e + 14) << 10) | ((uint16_t)((m * 2.0 - 1.0) * 1024.0) & 0x3FFu));
    }
    while (h < 0x7BFFu && (double)h2f(h) < t)      /* the guess truncates: step up to t */
        h++;
    while (h > 0 && (double)h2f((uint16_t)(h - 1)) >= t)
        h--;
    return h;
}

/* The scale of a group whose largest magnitude is am (bits; 0 for a zero group). */
static inline uint16_t scale_of(float am) {
    if (am == 0.0f)
        return 0;
    const double t = (double)am / 127.0;
    uint16_t h = f16_ceil(t);
    if ((double)h2f(h) * 127.0 > 65504.0 && (double)h2f(h) != t)
        h--;                                       /* the largest float16 <= t */
    return h;
}

static inline int8_t code1(float x, float s) {
    float q = rintf(x / s);
    q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
    return (int8_t)q;
}

static int64_t quantize_generic(const uint16_t *x, int64_t n_groups, int64_t group, int8_t *codes,
                                uint16_t *scale) {
    for (int64_t g = 0; g < n_groups; g++) {
        const uint16_t *xg = x + g * group;
        float am = 0.0f;
        for (int64_t j = 0; j < group; j++) {
            if ((xg[j] & 0x7C00u) == 0x7C00u)
                return -1 - g;
            const float a = fabsf(h2f(xg[j]));
            am = a > am ? a : am;
        }
        scale[g] = scale_of(am);
        const float s = h2f(scale[g]);
        for (int64_t j = 0; j < group; j++)
            codes[g * group + j] = s > 0.0f ? code1(h2f(xg[j]), s) : 0;
    }
    return 0;
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,f16c")))
static int64_t quantize_avx2(const uint16_t *x, int64_t n_groups, int64_t group, int8_t *codes,
                             uint16_t *scale) {
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256 hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
    const __m256i exp16 = _mm256_set1_epi32(0x7C00);
    for (int64_t g = 0; g < n_groups; g++) {
        const uint16_t *xg = x + g * group;
        __m256 m = _mm256_setzero_ps();
        __m256i bad = _mm256_setzero_si256();
        for (int64_t j = 0; j < group; j += 8) {
            const __m128i h = _mm_loadu_si128((const __m128i *)(xg + j));
            const __m256i e = _mm256_and_si256(_mm256_cvtepu16_epi32(h), exp16);
            bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(e, exp16));
            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_cvtph_ps(h), absmask));
        }
        if (!_mm256_testz_si256(bad, bad))
            return -1 - g;
        float lanes[8];
        _mm256_storeu_ps(lanes, m);
        float am = 0.0f;
        for (int k = 0; k < 8; k++)
            am = lanes[k] > am ? lanes[k] : am;
        scale[g] = scale_of(am);
        const float s1 = h2f(scale[g]);
        int8_t *cg = codes + g * group;
        if (s1 == 0.0f) {
            memset(cg, 0, (size_t)group);
            continue;
        }
        const __m256 s = _mm256_set1_ps(s1);
        for (int64_t j = 0; j < group; j += 8) {
            const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(xg + j)));
            __m256 q = _mm256_round_ps(_mm256_div_ps(v, s), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            q = _mm256_min_ps(_mm256_max_ps(q, lo), hi);
            const __m256i qi = _mm256_cvtps_epi32(q);
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(qi), _mm256_extracti128_si256(qi, 1));
            _mm_storel_epi64((__m128i *)(cg + j), _mm_packs_epi16(w, w));
        }
    }
    return 0;
}
#endif

/* Codes (int8, n_groups*group) and scales (float16 bits, n_groups) of n_groups groups of
 * float16 values (bits); 0, or -1 - g when group g holds an inf or a NaN. */
/* The quantizer of one build (1 = plain C, 2 = AVX2/F16C; tests compare them); -2 when
 * this CPU or group size cannot run it. */
int64_t kv3d_int8_quantize_at(int level, const uint16_t *x, int64_t n_groups, int64_t group, int8_t *codes,
                              uint16_t *scale) {
    if (level == 1)
        return quantize_generic(x, n_groups, group, codes, scale);
#if defined(__x86_64__) && defined(__GNUC__)
    if (level == 2 && group % 8 == 0 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        return quantize_avx2(x, n_groups, group, codes, scale);
#endif
    return -2;
}

/* The best quantizer this CPU and group size run. */
int64_t kv3d_int8_quantize(const uint16_t *x, int64_t n_groups, int64_t group, int8_t *codes, uint16_t *scale) {
    const int64_t rc = kv3d_int8_quantize_at(2, x, n_groups, group, codes, scale);
    return rc == -2 ? quantize_generic(x, n_groups, group, codes, scale) : rc;
}

/* The codes of one chunk from its two nibble streams (see codec.py): byte k of hi holds
 * the high nibbles of codes 2k (in its high nibble) and 2k+1, byte k of lo their low
 * nibbles. n codes are written. */
static void join_nibbles(const uint8_t *hi, const uint8_t *lo, int64_t n, uint8_t *codes) {
    int64_t k = 0;
    for (; 2 * k + 1 < n; k++) {
        codes[2 * k] = (uint8_t)((hi[k] & 0xF0u) | (lo[k] >> 4));
        codes[2 * k + 1] = (uint8_t)((hi[k] << 4) | (lo[k] & 0x0Fu));
    }
    if (2 * k < n)
        codes[2 * k] = (uint8_t)((hi[k] & 0xF0u) | (lo[k] >> 4));
}

/* The inverse, for the encoder: hi/lo (ceil(n/2) bytes each) from n codes; an odd last
 * code is paired with 0. */
void kv3d_int8_split_nibbles(const uint8_t *codes, int64_t n, uint8_t *hi, uint8_t *lo) {
    int64_t k = 0;
    for (; 2 * k + 1 < n; k++) {
        const uint8_t e = codes[2 * k], o = codes[2 * k + 1];
        hi[k] = (uint8_t)((e & 0xF0u) | (o >> 4));
        lo[k] = (uint8_t)((e << 4) | (o & 0x0Fu));
    }
    if (2 * k < n) {
        hi[k] = (uint8_t)(codes[2 * k] & 0xF0u);
        lo[k] = (uint8_t)(codes[2 * k] << 4);
    }
}

typedef size_t (*zstd_decompress_fn)(void *dctx, void *dst, size_t capacity, const void *src, size_t size);
typedef unsigned (*zstd_is_error_fn)(size_t code);

/* Chunks [first, last) of a payload, straight into the output arrays.
 *
 *   chunk i                          groups [i*chunk_groups, min(n_groups, (i+1)*chunk_groups))
 *   frame f: payload + starts[f] .. ends[f]
 *       with decompress given:       frames 2i and 2i+1 are chunk i's zstd frames of the high
 *                                    and the low nibbles (ceil(codes/2) bytes each)
 *       else:                        frame i is chunk i's raw codes
 *   scale[g]                         group g's float32 scale (times F16_SHIFT)
 *   targets[t], spans[t]..spans[t+1] output array t (uint16) holds the groups
 *                                    [spans[t], spans[t+1]) of the flat buffer
 *
 * The caller has checked the layout: frames inside the payload, spans[0] = 0,
 * spans[n_targets] = n_groups. dctx is a ZSTD_DCtx of this caller's thread alone.
 * Returns 0, or -1 - i when chunk i is damaged (zstd error, checksum mismatch, or a frame
 * of another size than the layout's); -1 - first when the buffers cannot be allocated. */
int64_t kv3d_int8_decode_chunks(zstd_decompress_fn decompress, zstd_is_error_fn is_error, void *dctx,
                                const uint8_t *payload, const int64_t *starts, const int64_t *ends, int64_t first, int64_t last,
                                int64_t chunk_groups, int64_t n_groups, int64_t group, const float *scale,
                                const int64_t *spans, const uint64_t *targets, int64_t n_targets) {
    uint8_t *buf = NULL;
    const int64_t most = chunk_groups * group, half_most = (most + 1) / 2;
    if (decompress != NULL && last > first) {
        buf = (uint8_t *)malloc((size_t)(most + 2 * half_most));
        if (buf == NULL)
            return -1 - first;
    }
    int64_t t = 0;
    for (int64_t i = first; i < last; i++) {
        const int64_t ca = i * chunk_groups, cb = ca + chunk_groups < n_groups ? ca + chunk_groups : n_groups;
        const int64_t need = (cb - ca) * group, half = (need + 1) / 2;
        const int8_t *codes;
        if (decompress != NULL) {
            uint8_t *hi = buf + most, *lo = hi + half_most;
            for (int s = 0; s < 2; s++) {
                const int64_t f = 2 * i + s;
                const size_t got = decompress(dctx, s ? lo : hi, (size_t)half, payload + starts[f],
                                                                    (size_t)(ends[f] - starts[f]));
                if (is_error(got) || got != (size_t)half) {
                    free(buf);
                    return -1 - i;
                }
            }
            join_nibbles(hi, lo, need, buf);
            codes = (const int8_t *)buf;
        } else {
            if (ends[i] - starts[i] != need)
                return -1 - i;
            codes = (const int8_t *)(payload + starts[i]);
        }
        for (int64_t g = ca; g < cb;) {                 /* the chunk's part in each target */
            while (t < n_targets && spans[t + 1] <= g)
                t++;
            if (t >= n_targets) {
                free(buf);
                return -1 - i;
            }
            const int64_t stop = spans[t + 1] < cb ? spans[t + 1] : cb;
            kv3d_int8_dequant(codes + (g - ca) * group, scale + g, stop - g, group,
                              (uint16_t *)(uintptr_t)targets[t] + (g - spans[t]) * group);
            g = stop;
        }
    }
    free(buf);
    return 0;
}
