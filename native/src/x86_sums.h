/* x86_sums.h: horizontal integer sums shared by x86.c and x86_q8a.c (AVX2). */
#ifndef EL_X86_SUMS_H
#define EL_X86_SUMS_H
#if defined(__x86_64__) || defined(_M_X64)

#include <immintrin.h>

/* the sum of v's eight int32 lanes */
static inline __attribute__((target("avx2"))) int32_t hsum_i32x8(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}

#endif
#endif
