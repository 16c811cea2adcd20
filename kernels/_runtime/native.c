/* The CPU kernels of optadvisor's smaller optimizer state, loaded by kernels/_runtime/native.py: 8-bit Adam/AdamW,
 * SGD and RMSprop (q8_step; the math in torch ops is kernels/precision/q8math.py) and Adam/AdamW with bfloat16 state
 * (adam_bf16state; kernels/precision/bf16.py). The tests hold both to plain references; this file must compute
 * the same bits.
 *
 * q8_step: One pass over the buffers: each
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

/* ---- shared pieces of the 8-bit kernels --------------------------------------------------------------------
 * A block's codes are decoded, updated in float32 (parameters written back), and the new moments kept in
 * stack arrays while the block's new absmax is found; then they are requantized while still in L1. */
INLINE float load_param(const void *x, const int bf16, int64_t i) {
    return bf16 ? bf16_load((const uint16_t *)x, i) : ((const float *)x)[i];
}

INLINE void store_param(void *x, const int bf16, int64_t i, float v) {
    if (bf16) ((uint16_t *)x)[i] = bf16_round(v);
    else ((float *)x)[i] = v;
}

INLINE float dec_signed(int8_t c, float scale) { /* sign(c) (c/127)^2 absmax, scale = absmax/127^2 */
    const float q = (float)c;
    return (q * fabsf(q)) * scale;
}

INLINE float dec_unsigned(uint8_t c, float scale) { /* ((c+1)/256)^2 absmax, scale = absmax/2^16 */
    const float t = (float)c + 1.0f;
    return (t * t) * scale;
}

INLINE int32_t max_bits(float a, int32_t bits) { /* running max of finite non-negative a (NaN, inf left out) */
    const float f = a < INFINITY ? a : 0.0f;
    int32_t b;
    memcpy(&b, &f, 4);
    return b > bits ? b : bits;
}

INLINE float from_bits(int32_t bits) {
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#ifdef __AVX2__
#define SIGN_PS _mm256_set1_ps(-0.0f)
INLINE __m256 dec_signed8(const int8_t *c, __m256 scale) {
    const __m256 q = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)c)));
    return _mm256_mul_ps(_mm256_mul_ps(q, _mm256_andnot_ps(SIGN_PS, q)), scale);
}

INLINE __m256 dec_unsigned8(const uint8_t *c, __m256 scale) {
    const __m256 t = _mm256_add_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)c))),
                                   _mm256_set1_ps(1.0f));
    return _mm256_mul_ps(_mm256_mul_ps(t, t), scale);
}

INLINE __m256 max_finite(__m256 acc, __m256 a) { /* a >= 0; NaN and inf are left out */
    return _mm256_max_ps(acc, _mm256_and_ps(a, _mm256_cmp_ps(a, _mm256_set1_ps(INFINITY), _CMP_LT_OQ)));
}

INLINE int32_t max_lanes(__m256 acc, int32_t bits) {
    float lanes[8];
    _mm256_storeu_ps(lanes, acc);
    for (int j = 0; j < 8; j++) bits = max_bits(lanes[j], bits);
    return bits;
}

/* 32 codes packed to bytes with saturating packs (the compiler's own conversion to bytes cost more than the
 * rest of the kernel). _mm256_cvtps_epi32 rounds half to even, as rintf and torch.round; a NaN/inf
 * converts to INT_MIN and is then masked to 0, as in the scalar loops. */
INLINE __m256i pack_bytes(const __m256i *x, const int is_unsigned) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i lo = _mm256_packs_epi32(x[0], x[1]), hi = _mm256_packs_epi32(x[2], x[3]);
    return _mm256_permutevar8x32_epi32(is_unsigned ? _mm256_packus_epi16(lo, hi) : _mm256_packs_epi16(lo, hi), order);
}
#endif

/* Codes of a block's new signed moments mb[0..len) whose absmax is am: c = rint(127 sqrt(|m|/am)) */
INLINE void encode_signed(const float *restrict mb, int64_t len, float am, int8_t *restrict out) {
    const float km = am > 0.0f ? 127.0f / sqrtf(am) : 0.0f; /* 0 for an all-zero block */
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 vkm = _mm256_set1_ps(km), vinf = _mm256_set1_ps(INFINITY);
    const __m256i c127 = _mm256_set1_epi32(127), zero = _mm256_setzero_si256();
    for (; i + 32 <= len; i += 32) {
        __m256i cs[4];
        for (int j = 0; j < 4; j++) {
            const __m256 mn = _mm256_loadu_ps(mb + i + 8 * j), a = _mm256_andnot_ps(SIGN_PS, mn);
            __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sqrt_ps(a), vkm));
            c = _mm256_min_epi32(c, c127);
            c = _mm256_and_si256(c, _mm256_castps_si256(_mm256_cmp_ps(a, vinf, _CMP_LT_OQ)));
            const __m256i neg = _mm256_castps_si256(_mm256_cmp_ps(mn, _mm256_setzero_ps(), _CMP_LT_OQ));
            cs[j] = _mm256_blendv_epi8(c, _mm256_sub_epi32(zero, c), neg);
        }
        _mm256_storeu_si256((__m256i *)(out + i), pack_bytes(cs, 0));
    }
#endif
    for (; i < len; i++) {
        const float mn = mb[i];
        float c = rintf(sqrtf(fabsf(mn)) * km);
        c = c < 127.0f ? c : 127.0f; /* an ulp above 127 at the block's maximum; NaN/inf: 127 */
        c = fabsf(mn) < INFINITY ? c : 0.0f;
        c = mn < 0.0f ? -c : c;
        out[i] = (int8_t)(int32_t)c;
    }
}

/* Codes of a block's new non-negative moments, given their square roots rb[0..len), whose absmax is av:
 * d = rint(256 sqrt(v/av)) - 1 in [0, 255] */
INLINE void encode_unsigned(const float *restrict rb, int64_t len, float av, uint8_t *restrict out) {
    const float kv = av > 0.0f ? 256.0f / sqrtf(av) : 0.0f;
    int64_t i = 0;
#ifdef __AVX2__
    const __m256 vkv = _mm256_set1_ps(kv), vinf = _mm256_set1_ps(INFINITY);
    const __m256i c255 = _mm256_set1_epi32(255), one = _mm256_set1_epi32(1), zero = _mm256_setzero_si256();
    for (; i + 32 <= len; i += 32) {
        __m256i ds[4];
        for (int j = 0; j < 4; j++) {
            const __m256 root = _mm256_loadu_ps(rb + i + 8 * j);
            __m256i d = _mm256_sub_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(root, vkv)), one);
            d = _mm256_min_epi32(_mm256_max_epi32(d, zero), c255);
            ds[j] = _mm256_and_si256(d, _mm256_castps_si256(_mm256_cmp_ps(root, vinf, _CMP_LT_OQ)));
        }
        _mm256_storeu_si256((__m256i *)(out + i), pack_bytes(ds, 1));
    }
#endif
    for (; i < len; i++) {
        const float root = rb[i];
        float d = rintf(root * kv) - 1.0f;
        d = d < 0.0f ? 0.0f : (d < 255.0f ? d : 255.0f);
        d = root < INFINITY ? d : 0.0f;
        out[i] = (uint8_t)(int32_t)d;
    }
}

/* The gradient after maximize and L2 weight decay, and the parameter after decoupled decay, as
 * kernels/precision/q8math.py's decayed() orders them (wd_mode 0 none, 1 L2, 2 decoupled) */
#define DECAYED(gi, pi, maximize, wd_mode, wd, decay) \
    do {                                              \
        if (maximize) gi = -gi;                       \
        if ((wd_mode) == 1) gi = gi + wd * pi;        \
        if ((wd_mode) == 2) pi = pi * decay;          \
    } while (0)
#ifdef __AVX2__
#define DECAYED8(gi, pi, maximize, wd_mode, v_wd, v_decay)                      \
    do {                                                                        \
        if (maximize) gi = _mm256_xor_ps(gi, SIGN_PS);                          \
        if ((wd_mode) == 1) gi = _mm256_add_ps(gi, _mm256_mul_ps(v_wd, pi));    \
        if ((wd_mode) == 2) pi = _mm256_mul_ps(pi, v_decay);                    \
    } while (0)
#endif

/* ---- Adam/AdamW: exp_avg signed (cm, sm), exp_avg_sq unsigned (cv, sv) --------------------------------------
 * hp: step_size, one_minus_beta1, beta2, one_minus_beta2, weight_decay, decay_factor, 1/bc2_sqrt, eps, 1/127^2 */
INLINE void adam_block(void *param, const void *grad, const int bf16, const int maximize, const int wd_mode,
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
                     v_sv = _mm256_set1_ps(s_v);
        __m256 vam = _mm256_setzero_ps(), vav = _mm256_setzero_ps();
        float *pp = (float *)param + lo;
        const float *gp = (const float *)grad + lo;
        for (; i0 + 8 <= len; i0 += 8) {
            __m256 gi = _mm256_loadu_ps(gp + i0), pi = _mm256_loadu_ps(pp + i0);
            DECAYED8(gi, pi, maximize, wd_mode, v_wd, v_decay);
            const __m256 mo = dec_signed8(cm + lo + i0, v_sm), vo = dec_unsigned8(cv + lo + i0, v_sv);
            const __m256 mn = _mm256_add_ps(mo, _mm256_mul_ps(v_omb1, _mm256_sub_ps(gi, mo)));
            const __m256 vn = _mm256_add_ps(_mm256_mul_ps(vo, v_b2), _mm256_mul_ps(v_omb2, _mm256_mul_ps(gi, gi)));
            const __m256 root = _mm256_sqrt_ps(vn);
            const __m256 denom = _mm256_add_ps(_mm256_mul_ps(root, v_inv_bc2), v_eps);
            _mm256_storeu_ps(pp + i0, _mm256_sub_ps(pi, _mm256_div_ps(_mm256_mul_ps(v_step, mn), denom)));
            _mm256_storeu_ps(mb + i0, mn);
            _mm256_storeu_ps(vb + i0, root);
            vam = max_finite(vam, _mm256_andnot_ps(SIGN_PS, mn));
            vav = max_finite(vav, vn);
        }
        am_bits = max_lanes(vam, am_bits);
        av_bits = max_lanes(vav, av_bits);
    }
#endif
    for (int64_t i = i0; i < len; i++) {
        float gi = load_param(grad, bf16, lo + i), pi = load_param(param, bf16, lo + i);
        DECAYED(gi, pi, maximize, wd_mode, wd, decay);
        const float mo = dec_signed(cm[lo + i], s_m), vo = dec_unsigned(cv[lo + i], s_v);
        const float mn = mo + omb1 * (gi - mo);
        const float vn = vo * b2 + omb2 * (gi * gi);
        const float root = sqrtf(vn);
        const float denom = root * inv_bc2 + eps;
        store_param(param, bf16, lo + i, pi - (step * mn) / denom);
        mb[i] = mn;
        vb[i] = root; /* reused by the second moment's code */
        am_bits = max_bits(fabsf(mn), am_bits);
        av_bits = max_bits(vn, av_bits); /* vn >= 0: a sum of squares */
    }
    sm[b] = from_bits(am_bits);
    sv[b] = from_bits(av_bits);
    encode_signed(mb, len, sm[b], cm + lo);
    encode_unsigned(vb, len, sv[b], cv + lo);
}

/* ---- SGD with momentum: momentum_buffer signed (cb, sb) ----------------------------------------------------
 * hp: lr, weight_decay, momentum_now (0 on the buffer's first step), keep (1 - dampening; 1 on the first
 * step), momentum (Nesterov's), first (unused), 1/127^2. b_t = momentum_now b + keep g (on the first step
 * b = 0 and this is g exactly); the update is g + momentum b_t with Nesterov, else b_t. */
INLINE void sgd_block(void *param, const void *grad, const int bf16, const int maximize, const int decay,
                      const int nesterov, int8_t *cb, float *sb, int64_t b, int64_t lo, int64_t len,
                      const float *hp, float *restrict mb) {
    const float lr = hp[0], wd = hp[1], mom_now = hp[2], keep = hp[3], mom = hp[4], inv_m = hp[6];
    const float s_b = sb[b] * inv_m;
    int32_t am_bits = 0;
    int64_t i0 = 0;
#ifdef __AVX2__
    if (!bf16) {
        const __m256 v_lr = _mm256_set1_ps(lr), v_wd = _mm256_set1_ps(wd), v_now = _mm256_set1_ps(mom_now),
                     v_keep = _mm256_set1_ps(keep), v_mom = _mm256_set1_ps(mom), v_sb = _mm256_set1_ps(s_b);
        __m256 vam = _mm256_setzero_ps();
        float *pp = (float *)param + lo;
        const float *gp = (const float *)grad + lo;
        for (; i0 + 8 <= len; i0 += 8) {
            __m256 gi = _mm256_loadu_ps(gp + i0), pi = _mm256_loadu_ps(pp + i0);
            DECAYED8(gi, pi, maximize, decay, v_wd, v_wd);
            const __m256 bo = dec_signed8(cb + lo + i0, v_sb);
            const __m256 bn = _mm256_add_ps(_mm256_mul_ps(v_now, bo), _mm256_mul_ps(v_keep, gi));
            const __m256 u = nesterov ? _mm256_add_ps(gi, _mm256_mul_ps(v_mom, bn)) : bn;
            _mm256_storeu_ps(pp + i0, _mm256_sub_ps(pi, _mm256_mul_ps(v_lr, u)));
            _mm256_storeu_ps(mb + i0, bn);
            vam = max_finite(vam, _mm256_andnot_ps(SIGN_PS, bn));
        }
        am_bits = max_lanes(vam, am_bits);
    }
#endif
    for (int64_t i = i0; i < len; i++) {
        float gi = load_param(grad, bf16, lo + i), pi = load_param(param, bf16, lo + i);
        DECAYED(gi, pi, maximize, decay, wd, wd);
        const float bn = mom_now * dec_signed(cb[lo + i], s_b) + keep * gi;
        const float u = nesterov ? gi + mom * bn : bn;
        store_param(param, bf16, lo + i, pi - lr * u);
        mb[i] = bn;
        am_bits = max_bits(fabsf(bn), am_bits);
    }
    sb[b] = from_bits(am_bits);
    encode_signed(mb, len, sb[b], cb + lo);
}

/* ---- RMSprop (not centered): square_avg unsigned (cv, sv), momentum_buffer signed (cb, sb) if momentum ------
 * hp: lr, alpha, one_minus_alpha, eps, weight_decay, momentum, 1/127^2. v = alpha v + (1-alpha) g^2,
 * d = sqrt(v) + eps; with momentum b = momentum b + g/d and the step lr b, else lr (g/d). */
INLINE void rmsprop_block(void *param, const void *grad, const int bf16, const int maximize, const int decay,
                          const int use_mom, uint8_t *cv, float *sv, int8_t *cb, float *sb, int64_t b, int64_t lo,
                          int64_t len, const float *hp, float *restrict mb, float *restrict vb) {
    const float lr = hp[0], alpha = hp[1], oma = hp[2], eps = hp[3], wd = hp[4], mom = hp[5], inv_m = hp[6];
    const float s_v = sv[b] * (1.0f / 65536.0f), s_b = use_mom ? sb[b] * inv_m : 0.0f;
    int32_t av_bits = 0, am_bits = 0;
    int64_t i0 = 0;
#ifdef __AVX2__
    if (!bf16) {
        const __m256 v_lr = _mm256_set1_ps(lr), v_alpha = _mm256_set1_ps(alpha), v_oma = _mm256_set1_ps(oma),
                     v_eps = _mm256_set1_ps(eps), v_wd = _mm256_set1_ps(wd), v_mom = _mm256_set1_ps(mom),
                     v_sv = _mm256_set1_ps(s_v), v_sb = _mm256_set1_ps(s_b);
        __m256 vav = _mm256_setzero_ps(), vam = _mm256_setzero_ps();
        float *pp = (float *)param + lo;
        const float *gp = (const float *)grad + lo;
        for (; i0 + 8 <= len; i0 += 8) {
            __m256 gi = _mm256_loadu_ps(gp + i0), pi = _mm256_loadu_ps(pp + i0);
            DECAYED8(gi, pi, maximize, decay, v_wd, v_wd);
            const __m256 vn = _mm256_add_ps(_mm256_mul_ps(dec_unsigned8(cv + lo + i0, v_sv), v_alpha),
                                            _mm256_mul_ps(v_oma, _mm256_mul_ps(gi, gi)));
            const __m256 root = _mm256_sqrt_ps(vn);
            const __m256 q = _mm256_div_ps(gi, _mm256_add_ps(root, v_eps));
            if (use_mom) {
                const __m256 bn = _mm256_add_ps(_mm256_mul_ps(dec_signed8(cb + lo + i0, v_sb), v_mom), q);
                _mm256_storeu_ps(pp + i0, _mm256_sub_ps(pi, _mm256_mul_ps(v_lr, bn)));
                _mm256_storeu_ps(mb + i0, bn);
                vam = max_finite(vam, _mm256_andnot_ps(SIGN_PS, bn));
            } else {
                _mm256_storeu_ps(pp + i0, _mm256_sub_ps(pi, _mm256_mul_ps(v_lr, q)));
            }
            _mm256_storeu_ps(vb + i0, root);
            vav = max_finite(vav, vn);
        }
        av_bits = max_lanes(vav, av_bits);
        am_bits = max_lanes(vam, am_bits);
    }
#endif
    for (int64_t i = i0; i < len; i++) {
        float gi = load_param(grad, bf16, lo + i), pi = load_param(param, bf16, lo + i);
        DECAYED(gi, pi, maximize, decay, wd, wd);
        const float vn = dec_unsigned(cv[lo + i], s_v) * alpha + oma * (gi * gi);
        const float root = sqrtf(vn);
        const float q = gi / (root + eps);
        if (use_mom) {
            const float bn = dec_signed(cb[lo + i], s_b) * mom + q;
            store_param(param, bf16, lo + i, pi - lr * bn);
            mb[i] = bn;
            am_bits = max_bits(fabsf(bn), am_bits);
        } else {
            store_param(param, bf16, lo + i, pi - lr * q);
        }
        vb[i] = root;
        av_bits = max_bits(vn, av_bits);
    }
    sv[b] = from_bits(av_bits);
    encode_unsigned(vb, len, sv[b], cv + lo);
    if (use_mom) {
        sb[b] = from_bits(am_bits);
        encode_signed(mb, len, sb[b], cb + lo);
    }
}

/* One function per combination of flags (constants inside, so each loop is branch-free and vectorizes):
 * F(name, bf16, a, b, c). The blocks of a call are split over nthreads OpenMP threads. */
#define OPENMP_BLOCKS(BODY)                                                                                 \
    const int64_t nblocks = (n + B - 1) / B;                                                               \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)")                   \
    for (int64_t b = 0; b < nblocks; b++) {                                                                \
        float mb[MAX_BLOCK], vb[MAX_BLOCK];                                                                \
        const int64_t lo = b * B, len = n - lo < B ? n - lo : B;                                           \
        (void)vb;                                                                                          \
        BODY;                                                                                              \
    }

typedef void (*q8_kernel_t)(void *, const void *, void *, float *, void *, float *, int64_t, int64_t,
                            const float *, int);

#define ADAM(NAME, BF16, MAX, WD, UNUSED)                                                                   \
    static void NAME(void *p, const void *g, void *c1, float *s1, void *c2, float *s2, int64_t n, int64_t B,  \
                     const float *hp, int nthreads) {                                                      \
        OPENMP_BLOCKS(adam_block(p, g, BF16, MAX, WD, c1, c2, s1, s2, b, lo, len, hp, mb, vb))             \
    }
#define SGD(NAME, BF16, MAX, WD, NESTEROV)                                                                  \
    static void NAME(void *p, const void *g, void *c1, float *s1, void *c2, float *s2, int64_t n, int64_t B,  \
                     const float *hp, int nthreads) {                                                      \
        (void)c2, (void)s2;                                                                                \
        OPENMP_BLOCKS(sgd_block(p, g, BF16, MAX, WD, NESTEROV, c1, s1, b, lo, len, hp, mb))                \
    }
#define RMSPROP(NAME, BF16, MAX, WD, MOM)                                                                   \
    static void NAME(void *p, const void *g, void *c1, float *s1, void *c2, float *s2, int64_t n, int64_t B,  \
                     const float *hp, int nthreads) {                                                      \
        OPENMP_BLOCKS(rmsprop_block(p, g, BF16, MAX, WD, MOM, c1, s1, c2, s2, b, lo, len, hp, mb, vb))     \
    }

/* every combination: bf16 (2) x maximize (2) x weight decay mode (3) x the optimizer's own flag (2) */
#define ALL(F, P)                                                                                           \
    F(P##_f000, 0, 0, 0, 0) F(P##_f001, 0, 0, 0, 1) F(P##_f010, 0, 0, 1, 0) F(P##_f011, 0, 0, 1, 1)         \
    F(P##_f020, 0, 0, 2, 0) F(P##_f021, 0, 0, 2, 1) F(P##_f100, 0, 1, 0, 0) F(P##_f101, 0, 1, 0, 1)         \
    F(P##_f110, 0, 1, 1, 0) F(P##_f111, 0, 1, 1, 1) F(P##_f120, 0, 1, 2, 0) F(P##_f121, 0, 1, 2, 1)         \
    F(P##_b000, 1, 0, 0, 0) F(P##_b001, 1, 0, 0, 1) F(P##_b010, 1, 0, 1, 0) F(P##_b011, 1, 0, 1, 1)         \
    F(P##_b020, 1, 0, 2, 0) F(P##_b021, 1, 0, 2, 1) F(P##_b100, 1, 1, 0, 0) F(P##_b101, 1, 1, 0, 1)         \
    F(P##_b110, 1, 1, 1, 0) F(P##_b111, 1, 1, 1, 1) F(P##_b120, 1, 1, 2, 0) F(P##_b121, 1, 1, 2, 1)
#define TABLE(P)                                                                                            \
    {{{{P##_f000, P##_f001}, {P##_f010, P##_f011}, {P##_f020, P##_f021}},                                  \
      {{P##_f100, P##_f101}, {P##_f110, P##_f111}, {P##_f120, P##_f121}}},                                 \
     {{{P##_b000, P##_b001}, {P##_b010, P##_b011}, {P##_b020, P##_b021}},                                  \
      {{P##_b100, P##_b101}, {P##_b110, P##_b111}, {P##_b120, P##_b121}}}}

ALL(ADAM, adam) ALL(SGD, sgd) ALL(RMSPROP, rmsprop)
static const q8_kernel_t KERNELS[3][2][2][3][2] = {TABLE(adam), TABLE(sgd), TABLE(rmsprop)};

/* One 8-bit step over n elements of parameters (float32, or bfloat16 when bf16) in blocks of B.
 * kind: 0 Adam/AdamW (c1, s1: exp_avg; c2, s2: exp_avg_sq; extra unused), 1 SGD (c1, s1: momentum_buffer;
 * extra: nesterov), 2 RMSprop (c1, s1: square_avg; c2, s2: momentum_buffer when extra = momentum on).
 * wd_mode: 0 none, 1 L2 (added to the gradient), 2 decoupled (SGD and RMSprop use 0 and 1). hp: the kind's
 * scalars in float32 (products by reciprocals, as torch's CPU division by a scalar computes).
 * Returns 0, or -1 (nothing written) for a kind or wd_mode outside the table. */
int q8_step(int kind, void *param, const void *grad, int bf16, void *c1, float *s1, void *c2, float *s2,
            int64_t n, int64_t B, const float *hp, int maximize, int wd_mode, int extra, int nthreads) {
    if (kind < 0 || kind > 2 || wd_mode < 0 || wd_mode > 2) return -1;
    KERNELS[kind][bf16 != 0][maximize != 0][wd_mode][extra != 0](param, grad, c1, s1, c2, s2, n, B, hp, nthreads);
    return 0;
}

/* ---- bfloat16 state for float32 parameters, stored with stochastic rounding ------------------------------- */
INLINE uint32_t hash32(uint64_t index, uint64_t step) { /* kernels/precision/bf16.py's random_bits */
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
 * index), step: the step count. Returns 0, or -1 (nothing written) for a wd_mode outside the table. */
int adam_bf16state(float *p, const float *g, uint16_t *m, uint16_t *v, int64_t n, int64_t start, int64_t step,
                   const float *hp, int maximize, int wd_mode, int nthreads) {
    if (wd_mode < 0 || wd_mode > 2) return -1;
    BF16_KERNELS[maximize != 0][wd_mode](p, g, m, v, n, start, step, hp, nthreads);
    return 0;
}

/* ---- SGD and RMSprop with bfloat16 state: kernels/optim/sgd.py's and _rmsprop.py's float32 fused updates on the
 * state read as float32, each new state stored with stochastic rounding. The random bits of state j (in the
 * order square_avg, momentum_buffer, grad_avg of those present) are the low (even j) or high (odd j) half
 * of hash32(position, step + (j / 2) 2^30), as kernels/precision/bf16.py's bf16_state_update. */
INLINE float lerp32(float a, float b, float w) { /* torch.lerp's formula */
    return w < 0.5f ? a + w * (b - a) : b - (b - a) * (1.0f - w);
}

/* hp: lr, weight_decay, momentum_now (0 on the first step), keep (1 - dampening; 1 on the first step),
 * momentum, first */
INLINE void sgd_bf16(float *restrict p, const float *restrict g, uint16_t *restrict buf, const int maximize,
                     const int decay, const int nesterov, int64_t lo, int64_t len, int64_t start, int64_t step,
                     const float *hp) {
    const float lr = hp[0], wd = hp[1], now = hp[2], keep = hp[3], mom = hp[4];
    for (int64_t i = lo; i < lo + len; i++) {
        float gi = g[i];
        const float pi = p[i];
        if (maximize) gi = -gi;
        if (decay) gi = gi + wd * pi;
        const float b = bf16_load(buf, i) * now + gi * keep;
        const float u = nesterov ? gi + mom * b : b;
        p[i] = pi - lr * u;
        buf[i] = bf16_stochastic(b, hash32((uint64_t)(start + i), (uint64_t)step) & 0xFFFFu);
    }
}

/* hp: lr, alpha, one_minus_alpha, eps, weight_decay, momentum */
INLINE void rmsprop_bf16(float *restrict p, const float *restrict g, uint16_t *restrict sa, uint16_t *restrict mb,
                         uint16_t *restrict ga, const int maximize, const int decay, const int use_mom,
                         const int centered, int64_t lo, int64_t len, int64_t start, int64_t step, const float *hp) {
    const float lr = hp[0], alpha = hp[1], oma = hp[2], eps = hp[3], wd = hp[4], mom = hp[5];
    for (int64_t i = lo; i < lo + len; i++) {
        float gi = g[i];
        const float pi = p[i];
        if (maximize) gi = -gi;
        if (decay) gi = gi + wd * pi;
        const float sq = bf16_load(sa, i) * alpha + (oma * gi) * gi;
        const uint32_t h = hash32((uint64_t)(start + i), (uint64_t)step);
        float avg;
        if (centered) {
            const float a = lerp32(bf16_load(ga, i), gi, oma);
            avg = sqrtf(sq - a * a) + eps;
            const uint32_t bits = use_mom ? hash32((uint64_t)(start + i), (uint64_t)step + (1ULL << 30)) & 0xFFFFu
                                          : h >> 16;
            ga[i] = bf16_stochastic(a, bits);
        } else {
            avg = sqrtf(sq) + eps;
        }
        if (use_mom) {
            const float b = bf16_load(mb, i) * mom + gi / avg;
            p[i] = pi - lr * b;
            mb[i] = bf16_stochastic(b, h >> 16);
        } else {
            p[i] = pi - (lr * gi) / avg;
        }
        sa[i] = bf16_stochastic(sq, h & 0xFFFFu);
    }
}

#define CHUNKED(BODY)                                                                                       \
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;                                                        \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)")                   \
    for (int64_t c = 0; c < chunks; c++) {                                                                 \
        const int64_t lo = c * CHUNK, len = n - lo < CHUNK ? n - lo : CHUNK;                               \
        BODY;                                                                                              \
    }
#define SGD_BF16(NAME, MAX, DECAY, NESTEROV)                                                                \
    static void NAME(float *p, const float *g, uint16_t *buf, int64_t n, int64_t start, int64_t step,       \
                     const float *hp, int nthreads) {                                                      \
        CHUNKED(sgd_bf16(p, g, buf, MAX, DECAY, NESTEROV, lo, len, start, step, hp))                       \
    }
SGD_BF16(sb_000, 0, 0, 0) SGD_BF16(sb_001, 0, 0, 1) SGD_BF16(sb_010, 0, 1, 0) SGD_BF16(sb_011, 0, 1, 1)
SGD_BF16(sb_100, 1, 0, 0) SGD_BF16(sb_101, 1, 0, 1) SGD_BF16(sb_110, 1, 1, 0) SGD_BF16(sb_111, 1, 1, 1)
typedef void (*sgd_bf16_t)(float *, const float *, uint16_t *, int64_t, int64_t, int64_t, const float *, int);
static const sgd_bf16_t SGD_BF16_KERNELS[2][2][2] = {{{sb_000, sb_001}, {sb_010, sb_011}},
                                                     {{sb_100, sb_101}, {sb_110, sb_111}}};

void sgd_bf16state(float *p, const float *g, uint16_t *buf, int64_t n, int64_t start, int64_t step,
                   const float *hp, int maximize, int decay, int nesterov, int nthreads) {
    SGD_BF16_KERNELS[maximize != 0][decay != 0][nesterov != 0](p, g, buf, n, start, step, hp, nthreads);
}

#define RMSPROP_BF16(NAME, MAX, DECAY, MOM, CENTERED)                                                       \
    static void NAME(float *p, const float *g, uint16_t *sa, uint16_t *mb, uint16_t *ga, int64_t n,         \
                     int64_t start, int64_t step, const float *hp, int nthreads) {                         \
        CHUNKED(rmsprop_bf16(p, g, sa, mb, ga, MAX, DECAY, MOM, CENTERED, lo, len, start, step, hp))       \
    }
RMSPROP_BF16(rb_0000, 0, 0, 0, 0) RMSPROP_BF16(rb_0001, 0, 0, 0, 1) RMSPROP_BF16(rb_0010, 0, 0, 1, 0)
RMSPROP_BF16(rb_0011, 0, 0, 1, 1) RMSPROP_BF16(rb_0100, 0, 1, 0, 0) RMSPROP_BF16(rb_0101, 0, 1, 0, 1)
RMSPROP_BF16(rb_0110, 0, 1, 1, 0) RMSPROP_BF16(rb_0111, 0, 1, 1, 1) RMSPROP_BF16(rb_1000, 1, 0, 0, 0)
RMSPROP_BF16(rb_1001, 1, 0, 0, 1) RMSPROP_BF16(rb_1010, 1, 0, 1, 0) RMSPROP_BF16(rb_1011, 1, 0, 1, 1)
RMSPROP_BF16(rb_1100, 1, 1, 0, 0) RMSPROP_BF16(rb_1101, 1, 1, 0, 1) RMSPROP_BF16(rb_1110, 1, 1, 1, 0)
RMSPROP_BF16(rb_1111, 1, 1, 1, 1)
typedef void (*rmsprop_bf16_t)(float *, const float *, uint16_t *, uint16_t *, uint16_t *, int64_t, int64_t,
                               int64_t, const float *, int);
static const rmsprop_bf16_t RMSPROP_BF16_KERNELS[2][2][2][2] = {
    {{{rb_0000, rb_0001}, {rb_0010, rb_0011}}, {{rb_0100, rb_0101}, {rb_0110, rb_0111}}},
    {{{rb_1000, rb_1001}, {rb_1010, rb_1011}}, {{rb_1100, rb_1101}, {rb_1110, rb_1111}}}};

/* sa: square_avg; mb: momentum_buffer (unused without momentum); ga: grad_avg (unused unless centered) */
void rmsprop_bf16state(float *p, const float *g, uint16_t *sa, uint16_t *mb, uint16_t *ga, int64_t n,
                       int64_t start, int64_t step, const float *hp, int maximize, int decay, int momentum,
                       int centered, int nthreads) {
    RMSPROP_BF16_KERNELS[maximize != 0][decay != 0][momentum != 0][centered != 0](p, g, sa, mb, ga, n, start, step,
                                                                                   hp, nthreads);
}

/* Gradients that are tensors of their own (after torch's default zero_grad()) into the flat gradient buffer
 * `dst` of `total` bytes: gradient i (src[i], nbytes[idx[i]] bytes, idx NULL: i) goes to byte offset
 * offsets[idx[i]]. One memcpy each, in one call: torch._foreach_copy_ on the CPU copies tensor by tensor
 * through the dispatcher (~1.5 us each; 3 ms for 2,000 gradients of 1k, against ~0.7 ms of memory traffic).
 * The caller has checked that each is a contiguous, dense CPU tensor of the buffer's dtype. Returns 1, having
 * copied nothing, if a source lies inside the buffer (a gradient that views it: the caller copies with torch,
 * which handles overlap), else 0. */
int gather_copy(char *dst, int64_t total, const int64_t *src, const int64_t *idx, const int64_t *offsets,
                const int64_t *nbytes, int64_t n, int nthreads) {
    const uintptr_t lo = (uintptr_t)dst, hi = lo + (uintptr_t)total;
    for (int64_t i = 0; i < n; i++) {
        const uintptr_t s = (uintptr_t)src[i], len = (uintptr_t)nbytes[idx ? idx[i] : i];
        if (len > 0 && s < hi && s + len > lo)
            return 1;
    }
    _Pragma("omp parallel for schedule(dynamic, 64) num_threads(nthreads) if (nthreads > 1)")
    for (int64_t i = 0; i < n; i++) {
        const int64_t j = idx ? idx[i] : i;
        if (nbytes[j] > 0)
            memcpy(dst + offsets[j], (const void *)(uintptr_t)src[i], (size_t)nbytes[j]);
    }
    return 0;
}
