/* The CPU kernels of optadvisor's smaller optimizer state, loaded by kernels/_native.py: 8-bit Adam/AdamW
 * (adam8bit; the math in torch ops is kernels/_q8math.py) and Adam/AdamW with bfloat16 state (adam_bf16state;
 * kernels/_bf16state.py). The tests hold both to plain references; this file must compute the same bits.
 *
 * adam8bit: One pass over the buffers: each
 * block of B elements is dequantized, updated, written back to the parameters, and requantized with the
 * block's new scale while it is still in L1, so parameters, gradients and codes are each read once and
 * written once (16 bytes per fp32 parameter against fp32 Adam's 28).
 *
 * Built with -ffp-contract=off and without -ffast-math: every operation rounds as torch's op-by-op
 * float32 arithmetic does, in the same order, so the result is bit-identical to the torch-op path.
 *
 * Codes: first moment int8 c in [-127, 127], m = sign(c) (c/127)^2 absmax_m; second moment uint8 c in
 * [0, 255], v = ((c+1)/256)^2 absmax_v (square-root companding: more levels near zero, where most moments
 * are; the second moment's levels exclude 0 so no denominator collapses to eps). absmax is the block's
 * largest finite magnitude; a non-finite moment is stored as code 0 (the parameter itself has become
 * NaN/inf in that step, as with torch's Adam), so it never spreads to its block or to other blocks. */
#include <math.h>
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define MAX_BLOCK 4096

#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_load(const uint16_t *x, int64_t i) {
    uint32_t u = (uint32_t)x[i] << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

INLINE uint16_t bf16_round(float f) { /* round to nearest even, as torch's cast; NaN stays a quiet NaN */
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x0040u;
    return (uint16_t)(f != f ? nan : rounded);
}

/* One block: branch-free so that the compiler vectorizes both loops; the flags are constants in each
 * specialization below. */
INLINE void block(void *param, const void *grad, const int bf16, const int maximize, const int wd_mode,
                  int8_t *cm, uint8_t *cv, float *sm, float *sv, int64_t b, int64_t lo, int64_t len,
                  const float *hp, float *restrict mb, float *restrict vb) {
    const float step = hp[0], omb1 = hp[1], b2 = hp[2], omb2 = hp[3], wd = hp[4], decay = hp[5],
                inv_bc2 = hp[6], eps = hp[7], inv_m = hp[8];
    const float s_m = sm[b] * inv_m, s_v = sv[b] * (1.0f / 65536.0f); /* 2^-16: exact */
    int32_t am_bits = 0, av_bits = 0; /* maxima as bit patterns: non-negative floats order as integers */
    int64_t i0 = 0;
#ifdef __AVX2__
    if (!bf16) { /* float32: 8 at a time, the same operations in the same order as the loop below */
        const __m256 v_step = _mm256_set1_ps(step), v_omb1 = _mm256_set1_ps(omb1), v_b2 = _mm256_set1_ps(b2),
                     v_omb2 = _mm256_set1_ps(omb2), v_wd = _mm256_set1_ps(wd), v_decay = _mm256_set1_ps(decay),
                     v_inv_bc2 = _mm256_set1_ps(inv_bc2), v_eps = _mm256_set1_ps(eps), v_sm = _mm256_set1_ps(s_m),
                     v_sv = _mm256_set1_ps(s_v), v_one = _mm256_set1_ps(1.0f), v_inf = _mm256_set1_ps(INFINITY),
                     sign = _mm256_set1_ps(-0.0f);
        __m256 vam = _mm256_setzero_ps(), vav = _mm256_setzero_ps();
        float *pp = (float *)param + lo;
        const float *gp = (const float *)grad + lo;
        for (; i0 + 8 <= len; i0 += 8) {
            __m256 gi = _mm256_loadu_ps(gp + i0), pi = _mm256_loadu_ps(pp + i0);
            if (maximize) gi = _mm256_xor_ps(gi, sign);
            if (wd_mode == 1) gi = _mm256_add_ps(gi, _mm256_mul_ps(v_wd, pi));
            if (wd_mode == 2) pi = _mm256_mul_ps(pi, v_decay);
            const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(cm + lo + i0))));
            const __m256 mo = _mm256_mul_ps(_mm256_mul_ps(q, _mm256_andnot_ps(sign, q)), v_sm);
            const __m256 t = _mm256_add_ps(
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(cv + lo + i0)))), v_one);
            const __m256 vo = _mm256_mul_ps(_mm256_mul_ps(t, t), v_sv);
            const __m256 mn = _mm256_add_ps(mo, _mm256_mul_ps(v_omb1, _mm256_sub_ps(gi, mo)));
            const __m256 vn = _mm256_add_ps(_mm256_mul_ps(vo, v_b2), _mm256_mul_ps(v_omb2, _mm256_mul_ps(gi, gi)));
            const __m256 root = _mm256_sqrt_ps(vn);
            const __m256 denom = _mm256_add_ps(_mm256_mul_ps(root, v_inv_bc2), v_eps);
            _mm256_storeu_ps(pp + i0, _mm256_sub_ps(pi, _mm256_div_ps(_mm256_mul_ps(v_step, mn), denom)));
            _mm256_storeu_ps(mb + i0, mn);
            _mm256_storeu_ps(vb + i0, root);
            const __m256 a = _mm256_andnot_ps(sign, mn);
            vam = _mm256_max_ps(vam, _mm256_and_ps(a, _mm256_cmp_ps(a, v_inf, _CMP_LT_OQ)));
            vav = _mm256_max_ps(vav, _mm256_and_ps(vn, _mm256_cmp_ps(vn, v_inf, _CMP_LT_OQ)));
        }
        float lanes[16];
        _mm256_storeu_ps(lanes, vam);
        _mm256_storeu_ps(lanes + 8, vav);
        for (int j = 0; j < 8; j++) {
            int32_t ab, wb;
            memcpy(&ab, lanes + j, 4);
            memcpy(&wb, lanes + 8 + j, 4);
            am_bits = ab > am_bits ? ab : am_bits;
            av_bits = wb > av_bits ? wb : av_bits;
        }
    }
#endif
    for (int64_t i = i0; i < len; i++) {
        float gi = bf16 ? bf16_load((const uint16_t *)grad, lo + i) : ((const float *)grad)[lo + i];
        float pi = bf16 ? bf16_load((const uint16_t *)param, lo + i) : ((float *)param)[lo + i];
        if (maximize) gi = -gi;
        if (wd_mode == 1) gi = gi + wd * pi;
        if (wd_mode == 2) pi = pi * decay;
        const float q = (float)cm[lo + i];
        const float mo = (q * fabsf(q)) * s_m;
        const float t = (float)cv[lo + i] + 1.0f;
        const float vo = (t * t) * s_v;
        const float mn = mo + omb1 * (gi - mo);
        const float vn = vo * b2 + omb2 * (gi * gi);
        const float root = sqrtf(vn);
        const float denom = root * inv_bc2 + eps;
        const float pn = pi - (step * mn) / denom;
        if (bf16) ((uint16_t *)param)[lo + i] = bf16_round(pn);
        else ((float *)param)[lo + i] = pn;
        mb[i] = mn;
        vb[i] = root; /* reused by the second moment's code */
        const float a = fabsf(mn) < INFINITY ? fabsf(mn) : 0.0f; /* NaN and inf are left out */
        const float w = vn < INFINITY ? vn : 0.0f;             /* (w >= 0: vn is a sum of squares) */
        int32_t ab, wb;
        memcpy(&ab, &a, 4);
        memcpy(&wb, &w, 4);
        am_bits = ab > am_bits ? ab : am_bits;
        av_bits = wb > av_bits ? wb : av_bits;
    }
    float am, av;
    memcpy(&am, &am_bits, 4);
    memcpy(&av, &av_bits, 4);
    sm[b] = am;
    sv[b] = av;
    /* per block: the codes' factors 127/sqrt(absmax_m) and 256/sqrt(absmax_v) (0 for an all-zero block) */
    const float km = am > 0.0f ? 127.0f / sqrtf(am) : 0.0f, kv = av > 0.0f ? 256.0f / sqrtf(av) : 0.0f;
    int64_t i = 0;
#ifdef __AVX2__
    /* 32 elements at a time, codes packed to bytes with saturating packs (the compiler's own conversion
     * to bytes cost more than the rest of the kernel). _mm256_cvtps_epi32 rounds half to even, as rintf
     * and torch.round; a NaN/inf converts to INT_MIN and is then masked to 0, as in the scalar loop. */
    const __m256 vkm = _mm256_set1_ps(km), vkv = _mm256_set1_ps(kv), vinf = _mm256_set1_ps(INFINITY),
                 sign = _mm256_set1_ps(-0.0f);
    const __m256i c127 = _mm256_set1_epi32(127), c255 = _mm256_set1_epi32(255), one = _mm256_set1_epi32(1),
                  zero = _mm256_setzero_si256(), order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (; i + 32 <= len; i += 32) {
        __m256i cs[4], ds[4];
        for (int j = 0; j < 4; j++) {
            const __m256 mn = _mm256_loadu_ps(mb + i + 8 * j), root = _mm256_loadu_ps(vb + i + 8 * j);
            const __m256 a = _mm256_andnot_ps(sign, mn);
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sqrt_ps(a), vkm));
            c = _mm256_min_epi32(c, c127);
            c = _mm256_and_si256(c, _mm256_castps_si256(_mm256_cmp_ps(a, vinf, _CMP_LT_OQ)));
            const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(mn, _mm256_setzero_ps(), _CMP_LT_OQ));
            cs[j] = _mm256_blendv_epi8(c, _mm256_sub_epi32(zero, c), neg);
            __m256i d = _mm256_sub_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(root, vkv)), one);
            d = _mm256_min_epi32(_mm256_max_epi32(d, zero), c255);
            ds[j] = _mm256_and_si256(d, _mm256_castps_si256(_mm256_cmp_ps(root, vinf, _CMP_LT_OQ)));
        }
        const __m256i c16 = _mm256_packs_epi16(_mm256_packs_epi32(cs[0], cs[1]), _mm256_packs_epi32(cs[2], cs[3]));
        const __m256i d16 = _mm256_packus_epi16(_mm256_packs_epi32(ds[0], ds[1]), _mm256_packs_epi32(ds[2], ds[3]));
        _mm256_storeu_si256((__m256i *)(cm + lo + i), _mm256_permutevar8x32_epi32(c16, order));
        _mm256_storeu_si256((__m256i *)(cv + lo + i), _mm256_permutevar8x32_epi32(d16, order));
    }
#endif
    for (; i < len; i++) {
        const float mn = mb[i], root = vb[i];
        float c = rintf(sqrtf(fabsf(mn)) * km);
        c = c < 127.0f ? c : 127.0f;            /* an ulp above 127 at the block's maximum; NaN/inf: 127 */
        c = fabsf(mn) < INFINITY ? c : 0.0f;
        c = mn < 0.0f ? -c : c;
        cm[lo + i] = (int8_t)(int32_t)c;
        float d = rintf(root * kv) - 1.0f;
        d = d < 0.0f ? 0.0f : (d < 255.0f ? d : 255.0f);
        d = root < INFINITY ? d : 0.0f;
        cv[lo + i] = (uint8_t)(int32_t)d;
    }
}

#define SPECIALIZE(NAME, BF16, MAX, WD)                                                                     \
    static void NAME(void *param, const void *grad, int8_t *cm, uint8_t *cv, float *sm, float *sv,        \
                     int64_t n, int64_t B, const float *hp, int nthreads) {                                \
        const int64_t nblocks = (n + B - 1) / B;                                                           \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)")               \
        for (int64_t b = 0; b < nblocks; b++) {                                                            \
            float mb[MAX_BLOCK], vb[MAX_BLOCK];                                                            \
            const int64_t lo = b * B;                                                                      \
            block(param, grad, BF16, MAX, WD, cm, cv, sm, sv, b, lo, n - lo < B ? n - lo : B, hp, mb, vb);  \
        }                                                                                                  \
    }

SPECIALIZE(k_f0, 0, 0, 0) SPECIALIZE(k_f1, 0, 0, 1) SPECIALIZE(k_f2, 0, 0, 2)
SPECIALIZE(k_fm0, 0, 1, 0) SPECIALIZE(k_fm1, 0, 1, 1) SPECIALIZE(k_fm2, 0, 1, 2)
SPECIALIZE(k_b0, 1, 0, 0) SPECIALIZE(k_b1, 1, 0, 1) SPECIALIZE(k_b2, 1, 0, 2)
SPECIALIZE(k_bm0, 1, 1, 0) SPECIALIZE(k_bm1, 1, 1, 1) SPECIALIZE(k_bm2, 1, 1, 2)

typedef void (*kernel_t)(void *, const void *, int8_t *, uint8_t *, float *, float *, int64_t, int64_t,
                         const float *, int);
static const kernel_t KERNELS[2][2][3] = {{{k_f0, k_f1, k_f2}, {k_fm0, k_fm1, k_fm2}},
                                          {{k_b0, k_b1, k_b2}, {k_bm0, k_bm1, k_bm2}}};

/* hp: step_size, one_minus_beta1, beta2, one_minus_beta2, weight_decay, decay_factor, 1/bc2_sqrt, eps,
 *     1/127^2 (in float32); products by reciprocals, as torch's CPU division by a scalar computes.
 * wd_mode: 0 none, 1 L2 (added to the gradient), 2 decoupled. */
void adam8bit(void *param, const void *grad, int bf16, int8_t *cm, uint8_t *cv, float *sm, float *sv,
              int64_t n, int64_t B, const float *hp, int maximize, int wd_mode, int nthreads) {
    KERNELS[bf16 != 0][maximize != 0][wd_mode](param, grad, cm, cv, sm, sv, n, B, hp, nthreads);
}

/* ---- bfloat16 state for float32 parameters, stored with stochastic rounding ------------------------------- */
INLINE uint32_t hash32(uint64_t index, uint64_t step) { /* kernels/_bf16state.py's random_bits */
    uint32_t x = (uint32_t)(index + step * 0x9E3779BULL);
    x ^= x >> 16;
    x *= 0x7FEB352Du;
    x ^= x >> 15;
    x *= 0x2C1B3C6Du;
    x ^= x >> 16;
    return x;
}

INLINE uint16_t bf16_stochastic(float f, uint32_t r) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint32_t kept = (u + r) >> 16;
    return fabsf(f) < INFINITY ? (uint16_t)kept : bf16_round(f); /* NaN/inf: to nearest */
}

INLINE void bf16state(float *restrict p, const float *restrict g, uint16_t *restrict m, uint16_t *restrict v,
                      const int maximize, const int wd_mode, int64_t lo, int64_t len, int64_t start,
                      int64_t step, const float *hp) {
    const float step_size = hp[0], omb1 = hp[1], b2 = hp[2], omb2 = hp[3], wd = hp[4], decay = hp[5],
                inv_bc2 = hp[6], eps = hp[7];
    for (int64_t i = lo; i < lo + len; i++) {
        float gi = g[i], pi = p[i];
        if (maximize) gi = -gi;
        if (wd_mode == 1) gi = gi + wd * pi;
        if (wd_mode == 2) pi = pi * decay;
        const float mf = bf16_load(m, i);
        const float mn = mf + omb1 * (gi - mf);
        const float vn = bf16_load(v, i) * b2 + omb2 * (gi * gi);
        const float denom = sqrtf(vn) * inv_bc2 + eps;
        p[i] = pi - (step_size * mn) / denom;
        const uint32_t bits = hash32((uint64_t)(start + i), (uint64_t)step); /* low half for m, high for v */
        m[i] = bf16_stochastic(mn, bits & 0xFFFFu);
        v[i] = bf16_stochastic(vn, bits >> 16);
    }
}

#define CHUNK 16384
#define SPECIALIZE_BF16(NAME, MAX, WD)                                                                      \
    static void NAME(float *p, const float *g, uint16_t *m, uint16_t *v, int64_t n, int64_t start,          \
                     int64_t step, const float *hp, int nthreads) {                                        \
        const int64_t chunks = (n + CHUNK - 1) / CHUNK;                                                    \
        _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)")               \
        for (int64_t c = 0; c < chunks; c++) {                                                             \
            const int64_t lo = c * CHUNK;                                                                  \
            bf16state(p, g, m, v, MAX, WD, lo, n - lo < CHUNK ? n - lo : CHUNK, start, step, hp);          \
        }                                                                                                  \
    }

SPECIALIZE_BF16(s_0, 0, 0) SPECIALIZE_BF16(s_1, 0, 1) SPECIALIZE_BF16(s_2, 0, 2)
SPECIALIZE_BF16(s_m0, 1, 0) SPECIALIZE_BF16(s_m1, 1, 1) SPECIALIZE_BF16(s_m2, 1, 2)

typedef void (*bf16_kernel_t)(float *, const float *, uint16_t *, uint16_t *, int64_t, int64_t, int64_t,
                              const float *, int);
static const bf16_kernel_t BF16_KERNELS[2][3] = {{s_0, s_1, s_2}, {s_m0, s_m1, s_m2}};

/* hp as adam8bit's (its last entry unused); start: the position of p[0] in its buffer (the random bits'
 * index), step: the step count. */
void adam_bf16state(float *p, const float *g, uint16_t *m, uint16_t *v, int64_t n, int64_t start, int64_t step,
                    const float *hp, int maximize, int wd_mode, int nthreads) {
    BF16_KERNELS[maximize != 0][wd_mode](p, g, m, v, n, start, step, hp, nthreads);
}
