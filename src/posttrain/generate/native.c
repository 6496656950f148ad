/* Native CPU forward for Llama-family decoders (batch of rows over a KV cache).
 *
 * Why: at batch 1 a decode step reads every weight once, so it is bound by memory
 * bandwidth, yet PyTorch's bf16 matrix-vector product streams at a third of it
 * and the HF forward adds ~7 ms of per-op dispatch per token. This file runs the
 * whole step in one OpenMP region with one weight layout built for streaming.
 *
 * Weights are packed in blocks of 16 output rows so one 512-bit load feeds 16
 * outputs and no horizontal sums are needed:
 *   bf16: [ceil(N/16)][K/2][16][2]   (vdpbf16ps: two k per lane)
 *   fp32: [ceil(N/16)][K][16]
 * Every output row accumulates over k in the same order whatever the number of
 * rows M in the call, and attention for a row reads only its own sequence's cache
 * up to its position, so a row's result does not depend on which other rows share
 * the call: verifying a draft of k tokens gives bit-identical logits to k single
 * steps. That is what makes speculative decoding exactly lossless here.
 *
 * Rows: each row m is (token, seq, pos). K/V of all rows are written first, then
 * each row attends to cache[seq][0..pos]. Logits are computed for `n_out` chosen
 * rows only (the last prompt row at prefill).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    int dtype; /* 0 fp32, 1 bf16: weights, cache and matmul inputs */
    int n_layers, hidden, n_heads, n_kv, head_dim, inter, vocab;
    float eps;
    int max_len, n_seq;
    int n_threads;
    const void *embed;       /* [vocab, hidden] unpacked */
    const float *final_norm; /* [hidden] */
    const void *head;        /* packed [vocab, hidden] */
    const float *const *attn_norm, *const *mlp_norm; /* per layer [hidden] */
    const void *const *wqkv, *const *wo, *const *wgu, *const *wdown; /* packed */
    const float *const *bqkv, *const *bo, *const *bgu, *const *bdown; /* NULL entries: no bias */
    void *const *kcache, *const *vcache; /* per layer K [n_seq, n_kv, head_dim, max_len], V [n_seq, max_len, n_kv, head_dim] */
    const float *cos, *sin;              /* [max_len, head_dim] */
    /* integer weights (dtype must be bf16): wtype 2 int8 (symmetric), 3 int4 (scale and minimum),
     * packed like bf16 but one byte per value (int8) or two values per byte (int4: [N/16][K/2][16],
     * even k in the low nibble); fp16 scales/minimums [N/16][K/group][16]; qgroup 0 = per channel */
    int wtype, head_wtype, qgroup;
    const uint16_t *const *sqkv, *const *so, *const *sgu, *const *sdown; /* scales */
    const uint16_t *const *mqkv, *const *mo, *const *mgu, *const *mdown; /* int4 minimums */
    const uint16_t *head_scale;   /* int8 head: [vocab/16][1][16] */
    const float *embed_scale;     /* int8 embedding rows: [vocab] (NULL: embed is in dtype) */
} Model;

/* ------------------------------------------------------------------ helpers */

static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline void f32x16_to_bf16(uint16_t *p, __m512 v) {
    _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v));
}

/* exp for 16 lanes: range reduction by ln2 and a degree-6 polynomial, ~1 ulp */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-87.3365478515625f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* row of n floats (n % 16 == 0) -> matmul input of the model's dtype */
static inline void store_row(int dt, void *dst, const float *src, int n) {
    if (dt) {
        for (int i = 0; i < n; i += 16) f32x16_to_bf16((uint16_t *)dst + i, _mm512_loadu_ps(src + i));
    } else {
        memcpy(dst, src, sizeof(float) * n);
    }
}

static inline __m512 load16(int dt, const void *p, long i) {
    return dt ? bf16x16_to_f32((const uint16_t *)p + i) : _mm512_loadu_ps((const float *)p + i);
}

/* ------------------------------------------------------------------ matmul */

#define MB 8 /* input rows per pass: each weight vector loaded once feeds MB rows */
#define PREFETCH 2048 /* bytes of weights requested ahead of use: measured best of 0/128/512/2048/8192 */

/* One block of 16 output rows against R input rows, R a compile-time constant so the R
 * accumulators stay in registers. Every row accumulates over k in ascending order,
 * whatever R is: results do not depend on how rows are grouped. */
#define DEFINE_TILES(R)                                                                                   \
    static inline void tile_bf16_##R(const uint16_t *w, const uint32_t *x, int kp, int xs, __m512 *out) { \
        __m512 acc[R];                                                                                    \
        for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();                                         \
        for (int p = 0; p < kp; p++) {                                                                    \
            _mm_prefetch((const char *)(w + (long)p * 32) + PREFETCH, _MM_HINT_T0);                       \
            const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + (long)p * 32);                           \
            for (int i = 0; i < R; i++)                                                                   \
                acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_set1_epi32(x[i * xs + p]));        \
        }                                                                                                 \
        for (int i = 0; i < R; i++) out[i] = acc[i];                                                      \
    }                                                                                                     \
    static inline void tile_f32_##R(const float *w, const float *x, int K, __m512 *out) {                 \
        __m512 acc[R];                                                                                    \
        for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();                                         \
        for (int p = 0; p < K; p++) {                                                                     \
            _mm_prefetch((const char *)(w + (long)p * 16) + PREFETCH, _MM_HINT_T0);                       \
            const __m512 wv = _mm512_loadu_ps(w + (long)p * 16);                                          \
            for (int i = 0; i < R; i++) acc[i] = _mm512_fmadd_ps(wv, _mm512_set1_ps(x[(long)i * K + p]), acc[i]); \
        }                                                                                                 \
        for (int i = 0; i < R; i++) out[i] = acc[i];                                                      \
    }
DEFINE_TILES(1)
DEFINE_TILES(2)
DEFINE_TILES(3)
DEFINE_TILES(4)
DEFINE_TILES(5)
DEFINE_TILES(6)
DEFINE_TILES(7)
DEFINE_TILES(8)

typedef void (*tile_bf16_fn)(const uint16_t *, const uint32_t *, int, int, __m512 *);
typedef void (*tile_f32_fn)(const float *, const float *, int, __m512 *);
static const tile_bf16_fn TILES_BF16[MB + 1] = {NULL, tile_bf16_1, tile_bf16_2, tile_bf16_3, tile_bf16_4,
                                                tile_bf16_5, tile_bf16_6, tile_bf16_7, tile_bf16_8};
static const tile_f32_fn TILES_F32[MB + 1] = {NULL, tile_f32_1, tile_f32_2, tile_f32_3, tile_f32_4,
                                              tile_f32_5, tile_f32_6, tile_f32_7, tile_f32_8};

/* Integer weights, converted to bf16 pairs in registers and fed to the same vdpbf16ps as the
 * bf16 path (int8 and int4 values are exact in bf16). A group's products are summed, then
 * scaled: y += s_g * sum(q x) (+ min_g * sum_g(x) for int4). Rows still accumulate in a fixed
 * order whatever R is. */
static inline __m512bh i8x32_to_bf16(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return _mm512_cvtne2ps_pbh(hi, lo);
}

static inline __m512bh u4x32_to_bf16(const uint8_t *p, __m512i table) {
    const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    /* lane = q_even | q_odd << 16, then each 16-bit index -> bf16(index) */
    const __m512i idx = _mm512_ternarylogic_epi32(v, _mm512_slli_epi32(v, 12), _mm512_set1_epi32(0x000F000F), 0xA8);
    return (__m512bh)_mm512_permutexvar_epi16(idx, table);
}

static inline __m512 f16x16(const uint16_t *p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p)); }

#define DEFINE_QTILES(R)                                                                                   \
    static inline void tile_q_##R(int wt, const uint8_t *w, const uint16_t *sc, const uint16_t *mn,         \
                                  const uint32_t *x, const float *xsum, int kp, int gp, int xs, __m512 *out) { \
        __m512 tot[R];                                                                                     \
        const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,             \
            0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0,         \
            0x4080, 0x4040, 0x4000, 0x3F80, 0x0000);                                                       \
        const int ng = kp / gp, bytes = wt == 2 ? 32 : 16;                                                 \
        for (int i = 0; i < R; i++) tot[i] = _mm512_setzero_ps();                                          \
        for (int g = 0; g < ng; g++) {                                                                     \
            __m512 acc[R];                                                                                 \
            for (int i = 0; i < R; i++) acc[i] = _mm512_setzero_ps();                                      \
            for (int p = g * gp; p < (g + 1) * gp; p++) {                                                  \
                const uint8_t *wp = w + (long)p * bytes;                                                   \
                _mm_prefetch((const char *)wp + PREFETCH, _MM_HINT_T0);                                    \
                const __m512bh wv = wt == 2 ? i8x32_to_bf16((const int8_t *)wp) : u4x32_to_bf16(wp, table); \
                for (int i = 0; i < R; i++)                                                                \
                    acc[i] = _mm512_dpbf16_ps(acc[i], wv, (__m512bh)_mm512_set1_epi32(x[i * xs + p]));     \
            }                                                                                              \
            const __m512 s = f16x16(sc + g * 16);                                                          \
            for (int i = 0; i < R; i++) tot[i] = _mm512_fmadd_ps(acc[i], s, tot[i]);                       \
            if (mn) {                                                                                      \
                const __m512 m = f16x16(mn + g * 16);                                                      \
                for (int i = 0; i < R; i++) tot[i] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[i * ng + g]), m, tot[i]); \
            }                                                                                              \
        }                                                                                                  \
        for (int i = 0; i < R; i++) out[i] = tot[i];                                                       \
    }
DEFINE_QTILES(1)
DEFINE_QTILES(2)
DEFINE_QTILES(3)
DEFINE_QTILES(4)
DEFINE_QTILES(5)
DEFINE_QTILES(6)
DEFINE_QTILES(7)
DEFINE_QTILES(8)
typedef void (*tile_q_fn)(int, const uint8_t *, const uint16_t *, const uint16_t *, const uint32_t *, const float *,
                          int, int, int, __m512 *);
static const tile_q_fn TILES_Q[MB + 1] = {NULL, tile_q_1, tile_q_2, tile_q_3, tile_q_4,
                                          tile_q_5, tile_q_6, tile_q_7, tile_q_8};

typedef struct {
    int wt;              /* 0: the model dtype, 2 int8, 3 int4 */
    int group;           /* inputs per scale, 0 = all K */
    const uint16_t *sc;  /* scales */
    const uint16_t *mn;  /* int4 minimums */
} Quant;

/* sum of each group of bf16 inputs per row (int4 minimums multiply it); xsum [M][K/group] */
static void group_sums(const uint16_t *X, float *xsum, int M, int K, int group) {
    const int ng = K / group;
#pragma omp for schedule(static)
    for (int t = 0; t < M * ng; t++) {
        const int m = t / ng, g = t % ng;
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < group; i += 16) acc = _mm512_add_ps(acc, bf16x16_to_f32(X + (long)m * K + g * group + i));
        xsum[t] = _mm512_reduce_add_ps(acc);
    }
}

/* Y[m, n] (+)= X[m, :] . W[n, :] + bias[n]; X is [M, K] in the model dtype, Y fp32 with row stride ldy.
 * Called inside a parallel region: output blocks are split across threads. */
static void matmul(int dt, const void *W, const float *bias, const void *X, float *Y, int ldy, int M, int N, int K,
                   int accumulate, Quant q, float *xsum) {
    const int nb = (N + 15) / 16;
    const int group = q.group ? q.group : K, ng = K / group;
    if (q.wt == 3) group_sums((const uint16_t *)X, xsum, M, K, group);
#pragma omp for schedule(static)
    for (int b = 0; b < nb; b++) {
        const int valid = N - b * 16 < 16 ? N - b * 16 : 16;
        const __mmask16 mask = (__mmask16)((1u << valid) - 1u);
        const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + b * 16) : _mm512_setzero_ps();
        for (int m0 = 0; m0 < M; m0 += MB) {
            const int mm = M - m0 < MB ? M - m0 : MB;
            __m512 acc[MB];
            if (q.wt)
                TILES_Q[mm](q.wt, (const uint8_t *)W + (long)b * 16 * K / (q.wt == 3 ? 2 : 1), q.sc + (long)b * 16 * ng,
                            q.mn ? q.mn + (long)b * 16 * ng : NULL,
                            (const uint32_t *)((const uint16_t *)X + (long)m0 * K), xsum + (long)m0 * ng, K / 2,
                            group / 2, K / 2, acc);
            else if (dt)
                TILES_BF16[mm]((const uint16_t *)W + (long)b * 16 * K,
                               (const uint32_t *)((const uint16_t *)X + (long)m0 * K), K / 2, K / 2, acc);
            else
                TILES_F32[mm]((const float *)W + (long)b * 16 * K, (const float *)X + (long)m0 * K, K, acc);
            for (int i = 0; i < mm; i++) {
                float *y = Y + (long)(m0 + i) * ldy + b * 16;
                __m512 v = _mm512_add_ps(acc[i], bv);
                if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, y));
                _mm512_mask_storeu_ps(y, mask, v);
            }
        }
    }
}

/* ------------------------------------------------------------------ AMX prefill matmul */

/* On CPUs with AMX every matmul runs here (calls of up to 16 rows in matmul_amx_small, same sums): C[16x16 fp32] += A[16 rows x 32 k] . B[32 k x 16 cols]
 * tiles, two row tiles by two column blocks per pass. Prefill is matrix-matrix work: the
 * vdpbf16ps tiles above reach ~0.18 TFLOP/s on 2 cores, AMX ~10x that; at batch 1 (bound by
 * reading the weights) both run at the same speed on one core, at 100 rows AMX is 4x faster.
 * The packed bf16 layout [N/16][K/2][16][2] is already AMX's B layout (16 k-pairs x 16 columns
 * x 2 per 1 KB tile); integer weights are converted block by block to it (exact in bf16),
 * accumulated per quantization group, then scaled as in tile_q. Rows stay independent: a row's
 * sum runs over the same k tiles in the same order whatever rows share the call, and one path
 * serves every call, so a verified draft matches single steps bit for bit. */
#define AMX_CHUNK 256 /* input rows per pass: the chunk stays in L2 while every weight block streams by */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

#define AMX_TARGET __attribute__((target("amx-tile,amx-bf16")))

#ifndef SYS_arch_prctl
#define SYS_arch_prctl 158
#endif

/* Linux hands out the AMX tile state only on request; 0 when this process may use it */
int pt_amx_init(void) { return (int)syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */); }

/* the 16 x 16 fp32 tile `c` of row tile r and column block j into Y (bias, scale, accumulate) */
static inline void amx_emit(const float *c, float *Y, int ldy, int row0, int rows, int col0, int valid,
                            const float *bias, int accumulate) {
    const __mmask16 mask = (__mmask16)((1u << valid) - 1u);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(mask, bias + col0) : _mm512_setzero_ps();
    for (int i = 0; i < rows; i++) {
        float *y = Y + (long)(row0 + i) * ldy + col0;
        __m512 v = _mm512_add_ps(_mm512_loadu_ps(c + i * 16), bv);
        if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, y));
        _mm512_mask_storeu_ps(y, mask, v);
    }
}

/* tot (+)= c * scale[j] (+ xsum[row, g] * minimum[j]) for one group g of a quantized block */
static inline void amx_scale(float *tot, const float *c, int first, const uint16_t *sc, const uint16_t *mn,
                             const float *xsum, int ng, int g, int row0, int rows) {
    const __m512 s = f16x16(sc);
    for (int i = 0; i < rows; i++) {
        __m512 v = _mm512_mul_ps(_mm512_loadu_ps(c + i * 16), s);
        if (mn) v = _mm512_fmadd_ps(_mm512_set1_ps(xsum[(long)(row0 + i) * ng + g]), f16x16(mn), v);
        if (!first) v = _mm512_add_ps(v, _mm512_loadu_ps(tot + i * 16));
        _mm512_storeu_ps(tot + i * 16, v);
    }
}

/* Y[m, n] (+)= X[m, :] . W[n, :] + bias[n] with AMX; X bf16 [M, K] with at least 32 readable rows
 * past M (their results are dropped), K % 32 == 0; wbuf: this thread's 2 * 16 * K bf16 scratch. */
AMX_TARGET static void matmul_amx(const void *W, const float *bias, const uint16_t *X, float *Y, int ldy, int M,
                                  int N, int K, int accumulate, Quant q, float *xsum, uint16_t *wbuf) {
    const int nb = (N + 15) / 16, group = q.group ? q.group : K, ng = K / group, gt = group / 32;
    const int bytes = q.wt == 2 ? 32 : 16; /* bytes of one k-pair row of 16 columns */
    const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150,
                                           0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080,
                                           0x4040, 0x4000, 0x3F80, 0x0000);
    if (q.wt == 3) group_sums(X, xsum, M, K, group);
    /* Fewer than 16 rows (decode): the A and C tiles hold just the M rows, so loads, stores and
     * scaling skip the padding. Row i of C depends only on row i of A: the same sums either way. */
    if (M <= 0) return; /* every thread alike: no rows, no tiles (a 0-row tile config faults) */
    const int trows = M < 16 ? M : 16;
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = t < 6 ? trows : 16; /* B tiles (6, 7): 16 k-pairs */
    _tile_loadconfig(&cfg);
    float c[4][256], tot[4][256];
    for (int mc = 0; mc < M; mc += AMX_CHUNK) {
        const int mend = M - mc < AMX_CHUNK ? M : mc + AMX_CHUNK;
#pragma omp for schedule(static)
        for (int bp = 0; bp < (nb + 1) / 2; bp++) {
            const int b0 = 2 * bp, two = b0 + 1 < nb;
            const uint16_t *B[2] = {NULL, NULL};
            /* up to 32 rows (decode, short drafts): convert each 32 x 16 k-tile of integer weights
             * right before its use, so the scratch stays a 2 KB L1 buffer; more rows reuse the
             * whole converted block, converted once below. Same bf16 values either way. */
            const int stream = q.wt && mend - mc <= 32;
            const uint8_t *Wq[2] = {NULL, NULL};
            for (int j = 0; j <= two; j++) {
                if (stream) {
                    Wq[j] = (const uint8_t *)W + (long)(b0 + j) * 16 * K / (q.wt == 3 ? 2 : 1);
                    B[j] = wbuf + (long)j * 512;
                    continue;
                }
                if (!q.wt) {
                    B[j] = (const uint16_t *)W + (long)(b0 + j) * 16 * K;
                    continue;
                }
                const uint8_t *w = (const uint8_t *)W + (long)(b0 + j) * 16 * K / (q.wt == 3 ? 2 : 1);
                uint16_t *dst = wbuf + (long)j * 16 * K;
                for (int p = 0; p < K / 2; p++)
                    _mm512_storeu_si512(dst + (long)p * 32, (__m512i)(q.wt == 2 ? i8x32_to_bf16((const int8_t *)w + (long)p * bytes)
                                                                                : u4x32_to_bf16(w + (long)p * bytes, table)));
                B[j] = dst;
            }
            for (int m0 = mc; m0 < mend; m0 += 32) {
                const int two_rows = m0 + 16 < mend;
                for (int g = 0; g < ng; g++) {
                    _tile_zero(0);
                    _tile_zero(1);
                    _tile_zero(2);
                    _tile_zero(3);
                    for (int kt = g * gt; kt < (g + 1) * gt; kt++) {
                        const long bt = stream ? 0 : (long)kt * 512;
                        if (stream)
                            for (int j = 0; j <= two; j++)
                                for (int p = kt * 16; p < kt * 16 + 16; p++)
                                    _mm512_storeu_si512(wbuf + (long)j * 512 + (p - kt * 16) * 32,
                                                        (__m512i)(q.wt == 2 ? i8x32_to_bf16((const int8_t *)Wq[j] + (long)p * bytes)
                                                                            : u4x32_to_bf16(Wq[j] + (long)p * bytes, table)));
                        _tile_loadd(4, X + (long)m0 * K + kt * 32, K * 2);
                        _tile_loadd(6, B[0] + bt, 64);
                        _tile_dpbf16ps(0, 4, 6);
                        if (two_rows) {
                            _tile_loadd(5, X + (long)(m0 + 16) * K + kt * 32, K * 2);
                            _tile_dpbf16ps(2, 5, 6);
                        }
                        if (two) {
                            _tile_loadd(7, B[1] + bt, 64);
                            _tile_dpbf16ps(1, 4, 7);
                            if (two_rows) _tile_dpbf16ps(3, 5, 7);
                        }
                    }
                    _tile_stored(0, c[0], 64);
                    if (two) _tile_stored(1, c[1], 64);
                    if (two_rows) {
                        _tile_stored(2, c[2], 64);
                        if (two) _tile_stored(3, c[3], 64);
                    }
                    if (!q.wt) break;
                    for (int t = 0; t < 4; t++) {
                        const int j = t & 1, b = b0 + j, row0 = m0 + (t >> 1) * 16;
                        if ((j && !two) || ((t >> 1) && !two_rows)) continue;
                        amx_scale(tot[t], c[t], g == 0, q.sc + (long)b * 16 * ng + g * 16,
                                  q.mn ? q.mn + (long)b * 16 * ng + g * 16 : NULL, xsum, ng, g, row0,
                                  mend - row0 < 16 ? mend - row0 : 16);
                    }
                }
                for (int t = 0; t < 4; t++) {
                    const int j = t & 1, r = t >> 1, row0 = m0 + r * 16, col0 = (b0 + j) * 16;
                    if ((j && !two) || (r && !two_rows)) continue;
                    const int rows = mend - row0 < 16 ? mend - row0 : 16;
                    amx_emit(q.wt ? tot[t] : c[t], Y, ldy, row0, rows, col0, N - col0 < 16 ? N - col0 : 16, bias,
                             accumulate);
                }
            }
        }
    }
    _tile_release();
}

/* At most 16 rows (decode steps, SAM drafts): three column blocks per pass (C tiles 0-2, A tile
 * 4, B tiles 5-7), so three independent accumulations hide the tile latency, and integer k-tiles
 * are converted right before their use into a 3 KB L1 scratch. A row's sums run over the same k
 * tiles in the same order, scaled the same way, as in matmul_amx: the same results, bit for bit. */
AMX_TARGET static void matmul_amx_small(const void *W, const float *bias, const uint16_t *X, float *Y, int ldy,
                                        int M, int N, int K, int accumulate, Quant q, float *xsum, uint16_t *wbuf) {
    if (M <= 0) return; /* every thread alike: no rows, no tiles (a 0-row tile config faults) */
    const int nb = (N + 15) / 16, group = q.group ? q.group : K, ng = K / group, gt = group / 32;
    const int bytes = q.wt == 2 ? 32 : 16;
    const __m512i table = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150,
                                           0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080,
                                           0x4040, 0x4000, 0x3F80, 0x0000);
    if (q.wt == 3) group_sums(X, xsum, M, K, group);
    TileConfig cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = t < 5 ? M : 16;
    _tile_loadconfig(&cfg);
    float c[3][256], tot[3][256];
#pragma omp for schedule(static)
    for (int bt = 0; bt < (nb + 2) / 3; bt++) {
        const int b0 = 3 * bt, nj = nb - b0 < 3 ? nb - b0 : 3;
        for (int g = 0; g < ng; g++) {
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            for (int kt = g * gt; kt < (g + 1) * gt; kt++) {
                _tile_loadd(4, X + kt * 32, K * 2);
#define SMALL_BLOCK(J, BT)                                                                                        \
                if (J < nj) {                                                                                   \
                    const uint16_t *bp;                                                                         \
                    if (q.wt) {                                                                                 \
                        const uint8_t *w = (const uint8_t *)W + (long)(b0 + J) * 16 * K / (q.wt == 3 ? 2 : 1);  \
                        for (int p = 0; p < 16; p++)                                                            \
                            _mm512_storeu_si512(wbuf + J * 512 + p * 32,                                        \
                                (__m512i)(q.wt == 2 ? i8x32_to_bf16((const int8_t *)w + (long)(kt * 16 + p) * bytes) \
                                                    : u4x32_to_bf16(w + (long)(kt * 16 + p) * bytes, table)));  \
                        bp = wbuf + J * 512;                                                                    \
                    } else {                                                                                    \
                        bp = (const uint16_t *)W + (long)(b0 + J) * 16 * K + (long)kt * 512;                    \
                    }                                                                                           \
                    _tile_loadd(BT, bp, 64);                                                                     \
                    _tile_dpbf16ps(J, 4, BT);                                                                    \
                }
                SMALL_BLOCK(0, 5)
                SMALL_BLOCK(1, 6)
                SMALL_BLOCK(2, 7)
#undef SMALL_BLOCK
            }
            _tile_stored(0, c[0], 64);
            if (nj > 1) _tile_stored(1, c[1], 64);
            if (nj > 2) _tile_stored(2, c[2], 64);
            if (!q.wt) break;
            for (int j = 0; j < nj; j++)
                amx_scale(tot[j], c[j], g == 0, q.sc + (long)(b0 + j) * 16 * ng + g * 16,
                          q.mn ? q.mn + (long)(b0 + j) * 16 * ng + g * 16 : NULL, xsum, ng, g, 0, M);
        }
        for (int j = 0; j < nj; j++) {
            const int col0 = (b0 + j) * 16;
            amx_emit(q.wt ? tot[j] : c[j], Y, ldy, 0, M, col0, N - col0 < 16 ? N - col0 : 16, bias, accumulate);
        }
    }
    _tile_release();
}

/* ------------------------------------------------------------------ layers */

/* out[m] = x[m] / rms(x[m]) * w, in the model dtype (the next matmul's input) */
static void rmsnorm(int dt, const float *x, const float *w, float eps, void *out, int M, int H, float *tmp) {
#pragma omp for schedule(static)
    for (int m = 0; m < M; m++) {
        const float *xr = x + (long)m * H;
        __m512 ss = _mm512_setzero_ps();
        for (int i = 0; i < H; i += 16) {
            __m512 v = _mm512_loadu_ps(xr + i);
            ss = _mm512_fmadd_ps(v, v, ss);
        }
        const __m512 s = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / H + eps));
        float *t = tmp + (long)m * H;
        for (int i = 0; i < H; i += 16)
            _mm512_storeu_ps(t + i, _mm512_mul_ps(_mm512_mul_ps(_mm512_loadu_ps(xr + i), s), _mm512_loadu_ps(w + i)));
        store_row(dt, dt ? (void *)((uint16_t *)out + (long)m * H) : (void *)((float *)out + (long)m * H), t, H);
    }
}

/* rotate-half RoPE on one head vector in place */
static inline void rope(float *v, const float *c, const float *s, int hd) {
    const int half = hd / 2;
    for (int i = 0; i < half; i += 16) {
        __m512 a = _mm512_loadu_ps(v + i), b = _mm512_loadu_ps(v + half + i);
        __m512 ra = _mm512_fmsub_ps(a, _mm512_loadu_ps(c + i), _mm512_mul_ps(b, _mm512_loadu_ps(s + i)));
        __m512 rb = _mm512_fmadd_ps(b, _mm512_loadu_ps(c + half + i), _mm512_mul_ps(a, _mm512_loadu_ps(s + half + i)));
        _mm512_storeu_ps(v + i, ra);
        _mm512_storeu_ps(v + half + i, rb);
    }
}

static inline long cache_off(const Model *md, int seq, int pos) {
    return ((long)seq * md->max_len + pos) * md->n_kv * md->head_dim;
}

/* K is cached transposed, [n_seq][n_kv][head_dim][max_len]: 16 keys' scores are 16 lanes of
 * one FMA per head dimension, no horizontal sums */
static inline long kt_off(const Model *md, int seq, int g) {
    return ((long)seq * md->n_kv + g) * md->head_dim * md->max_len;
}

static inline __m512 load16_masked(int dt, const void *p, long i, __mmask16 mask) {
    if (dt)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, (const uint16_t *)p + i)), 16));
    return _mm512_maskz_loadu_ps(mask, (const float *)p + i);
}

/* qkv [M, (Hq + 2 Hkv) * hd] fp32 -> RoPE on k, K/V into the cache for every row */
static void store_kv(const Model *md, int l, float *qkv, const int *seq, const int *pos, int M) {
    const int hd = md->head_dim, q_w = md->n_heads * hd, kv_w = md->n_kv * hd, row = q_w + 2 * kv_w;
#pragma omp for schedule(static)
    for (int t = 0; t < M * md->n_kv; t++) {
        const int m = t / md->n_kv, g = t % md->n_kv;
        float *k = qkv + (long)m * row + q_w + g * hd;
        const float *v = qkv + (long)m * row + q_w + kv_w + g * hd;
        rope(k, md->cos + (long)pos[m] * hd, md->sin + (long)pos[m] * hd, hd);
        const long off = cache_off(md, seq[m], pos[m]) + g * hd, kt = kt_off(md, seq[m], g) + pos[m];
        if (md->dtype) {
            uint16_t kb[256];
            store_row(1, kb, k, hd);
            for (int d = 0; d < hd; d++) ((uint16_t *)md->kcache[l])[kt + (long)d * md->max_len] = kb[d];
            store_row(1, (uint16_t *)md->vcache[l] + off, v, hd);
        } else {
            for (int d = 0; d < hd; d++) ((float *)md->kcache[l])[kt + (long)d * md->max_len] = k[d];
            memcpy((float *)md->vcache[l] + off, v, sizeof(float) * hd);
        }
    }
}

/* softmax(q k^T / sqrt(hd)) v over cache[seq][0..pos] for every (row, head); out [M, Hq*hd] fp32 */
static void attention(const Model *md, int l, float *qkv, const int *seq, const int *pos, int M, float *out,
                      float *scores_all) {
    const int hd = md->head_dim, q_w = md->n_heads * hd, kv_w = md->n_kv * hd, row = q_w + 2 * kv_w;
    const int group = md->n_heads / md->n_kv;
    const float scale = 1.0f / sqrtf((float)hd);
    float *scores = scores_all + (long)omp_get_thread_num() * md->max_len;
#pragma omp for schedule(static)
    for (int t = 0; t < M * md->n_heads; t++) {
        const int m = t / md->n_heads, h = t % md->n_heads, g = h / group, n = pos[m] + 1;
        float *q = qkv + (long)m * row + h * hd;
        rope(q, md->cos + (long)pos[m] * hd, md->sin + (long)pos[m] * hd, hd);
        const void *kc = md->kcache[l], *vc = md->vcache[l];
        const long base = cache_off(md, seq[m], 0) + g * hd, stride = (long)md->n_kv * hd;
        const long kt = kt_off(md, seq[m], g);
        float mx = -INFINITY;
        /* scores of 64 keys at a time: four independent FMA chains over the head dimensions,
         * each lane summing d = 0..hd-1 in order (the same for every row, whatever its neighbours) */
        for (int j0 = 0; j0 < n; j0 += 64) {
            __mmask16 mask[4];
            __m512 acc[4];
            for (int b = 0; b < 4; b++) {
                const int valid = n - j0 - 16 * b;
                mask[b] = valid >= 16 ? (__mmask16)0xFFFF : valid > 0 ? (__mmask16)((1u << valid) - 1u) : 0;
                acc[b] = _mm512_setzero_ps();
            }
            for (int d = 0; d < hd; d++) {
                const __m512 qd = _mm512_set1_ps(q[d]);
                const long r = kt + (long)d * md->max_len + j0;
                for (int b = 0; b < 4; b++)
                    acc[b] = _mm512_fmadd_ps(qd, load16_masked(md->dtype, kc, r + 16 * b, mask[b]), acc[b]);
            }
            for (int b = 0; b < 4 && mask[b]; b++) {
                const __m512 sc = _mm512_mul_ps(acc[b], _mm512_set1_ps(scale));
                _mm512_mask_storeu_ps(scores + j0 + 16 * b, mask[b], sc);
                const float bm = _mm512_mask_reduce_max_ps(mask[b], sc);
                mx = bm > mx ? bm : mx;
            }
        }
        __m512 sum = _mm512_setzero_ps();
        int j = 0;
        for (; j + 16 <= n; j += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(scores + j), _mm512_set1_ps(mx)));
            _mm512_storeu_ps(scores + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (j < n) {
            const __mmask16 mask = (__mmask16)((1u << (n - j)) - 1u);
            __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, scores + j), _mm512_set1_ps(mx)));
            e = _mm512_maskz_mov_ps(mask, e);
            _mm512_mask_storeu_ps(scores + j, mask, e);
            sum = _mm512_add_ps(sum, e);
        }
        const float inv = 1.0f / _mm512_reduce_add_ps(sum);
        float *o = out + (long)m * q_w + h * hd;
        __m512 acc[16]; /* hd / 16 independent chains (hd <= 256), each over the keys in order */
        for (int c = 0; c < hd / 16; c++) acc[c] = _mm512_setzero_ps();
        for (int jj = 0; jj < n; jj++) {
            const __m512 w = _mm512_set1_ps(scores[jj]);
            for (int c = 0; c < hd / 16; c++)
                acc[c] = _mm512_fmadd_ps(w, load16(md->dtype, vc, base + jj * stride + 16 * c), acc[c]);
        }
        for (int c = 0; c < hd / 16; c++) _mm512_storeu_ps(o + 16 * c, _mm512_mul_ps(acc[c], _mm512_set1_ps(inv)));
    }
}

/* act[m, i] = silu(gate) * up from gu [M, 2I] fp32 -> model dtype [M, I] */
static void swiglu(int dt, const float *gu, void *act, int M, int I) {
#pragma omp for schedule(static)
    for (int t = 0; t < M * (I / 16); t++) {
        const int m = t / (I / 16), i = (t % (I / 16)) * 16;
        const __m512 g = _mm512_loadu_ps(gu + (long)m * 2 * I + i), u = _mm512_loadu_ps(gu + (long)m * 2 * I + I + i);
        const __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        const __m512 v = _mm512_mul_ps(_mm512_mul_ps(g, sig), u);
        if (dt)
            f32x16_to_bf16((uint16_t *)act + (long)m * I + i, v);
        else
            _mm512_storeu_ps((float *)act + (long)m * I + i, v);
    }
}

/* rows of fp32 [M, n] -> model dtype */
static void to_input(int dt, const float *src, void *dst, int M, int n) {
#pragma omp for schedule(static)
    for (int m = 0; m < M; m++)
        store_row(dt, dt ? (void *)((uint16_t *)dst + (long)m * n) : (void *)((float *)dst + (long)m * n), src + (long)m * n, n);
}

/* ------------------------------------------------------------------ forward */

#define QUANT(name) ((Quant){md->wtype, md->qgroup, md->wtype ? md->s##name[l] : NULL, \
                              md->wtype == 3 ? md->m##name[l] : NULL})

/* amx: run the matmuls with AMX (the caller checked pt_amx_init; ignored unless dtype is bf16) */
int pt_forward(const Model *md, int M, const int64_t *tokens, const int *seq, const int *pos, int n_out,
               const int *out_rows, float *logits, int amx) {
    const int H = md->hidden, I = md->inter, hd = md->head_dim, dt = md->dtype;
    const int q_w = md->n_heads * hd, qkv_w = q_w + 2 * md->n_kv * hd;
    const size_t es = dt ? 2 : 4;
    for (int m = 0; m < M; m++) {
        if (tokens[m] < 0 || tokens[m] >= md->vocab) return 1;
        if (seq[m] < 0 || seq[m] >= md->n_seq || pos[m] < 0 || pos[m] >= md->max_len) return 2;
    }
    for (int r = 0; r < n_out; r++)
        if (out_rows[r] < 0 || out_rows[r] >= M) return 3;
    const int wide = 2 * I > qkv_w ? 2 * I : qkv_w;
    const int in_w = I > q_w ? (I > H ? I : H) : (q_w > H ? q_w : H);
    float *x = malloc(sizeof(float) * (size_t)M * H);
    float *tmp = malloc(sizeof(float) * (size_t)M * (H > q_w ? H : q_w));
    float *big = malloc(sizeof(float) * (size_t)M * wide);
    void *in = calloc((size_t)(M + 32) * in_w, es); /* AMX reads whole 16-row tiles past M */
    int nt = md->n_threads > 0 ? md->n_threads : 1;
    float *scores = malloc(sizeof(float) * (size_t)nt * md->max_len);
    float *xo = malloc(sizeof(float) * (size_t)(n_out > 0 ? n_out : 1) * H);
    /* int4 group sums: the widest input (I) over the smallest group */
    float *xsum = malloc(sizeof(float) * (size_t)(M + 32) * (md->qgroup ? in_w / md->qgroup + 1 : 1));
    amx = amx && dt;
    /* per thread: two converted 16-column blocks of the widest input, at least 3 k-tiles (matmul_amx_small) */
    const long wbuf_n = 2 * 16 * in_w > 3 * 512 ? 2 * 16 * in_w : 3 * 512;
    uint16_t *wbuf = amx ? malloc(sizeof(uint16_t) * (size_t)nt * wbuf_n) : NULL;
    if (!x || !tmp || !big || !in || !scores || !xo || !xsum || (amx && !wbuf)) {
        free(x); free(tmp); free(big); free(in); free(scores); free(xo); free(xsum); free(wbuf);
        return 4;
    }
#define MATMUL(W, b, X, Y, ldy, M_, N, K, acc, q)                                                              \
    do {                                                                                                       \
        if (amx && (M_) <= 16)                                                                                 \
            matmul_amx_small(W, b, (const uint16_t *)(X), Y, ldy, M_, N, K, acc, q, xsum,                       \
                             wbuf + (long)omp_get_thread_num() * wbuf_n);                               \
        else if (amx)                                                                                          \
            matmul_amx(W, b, (const uint16_t *)(X), Y, ldy, M_, N, K, acc, q, xsum,                             \
                       wbuf + (long)omp_get_thread_num() * wbuf_n);                                     \
        else                                                                                                   \
            matmul(dt, W, b, X, Y, ldy, M_, N, K, acc, q, xsum);                                               \
    } while (0)
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) {
            float *xr = x + (long)m * H;
            if (md->embed_scale) {
                const int8_t *e = (const int8_t *)md->embed + tokens[m] * (long)H;
                const __m512 s = _mm512_set1_ps(md->embed_scale[tokens[m]]);
                for (int i = 0; i < H; i += 16)
                    _mm512_storeu_ps(xr + i, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                        _mm_loadu_si128((const __m128i *)(e + i)))), s));
            } else {
                for (int i = 0; i < H; i += 16) _mm512_storeu_ps(xr + i, load16(dt, md->embed, tokens[m] * (long)H + i));
            }
        }
        for (int l = 0; l < md->n_layers; l++) {
            rmsnorm(dt, x, md->attn_norm[l], md->eps, in, M, H, tmp);
            MATMUL(md->wqkv[l], md->bqkv[l], in, big, qkv_w, M, qkv_w, H, 0, QUANT(qkv));
            store_kv(md, l, big, seq, pos, M);
            attention(md, l, big, seq, pos, M, tmp, scores);
            to_input(dt, tmp, in, M, q_w);
            MATMUL(md->wo[l], md->bo[l], in, x, H, M, H, q_w, 1, QUANT(o));
            rmsnorm(dt, x, md->mlp_norm[l], md->eps, in, M, H, tmp);
            MATMUL(md->wgu[l], md->bgu[l], in, big, 2 * I, M, 2 * I, H, 0, QUANT(gu));
            swiglu(dt, big, in, M, I);
            MATMUL(md->wdown[l], md->bdown[l], in, x, H, M, H, I, 1, QUANT(down));
        }
#pragma omp for schedule(static)
        for (int r = 0; r < n_out; r++) memcpy(xo + (long)r * H, x + (long)out_rows[r] * H, sizeof(float) * H);
        rmsnorm(dt, xo, md->final_norm, md->eps, in, n_out, H, tmp);
        const Quant hq = {md->head_wtype, 0, md->head_scale, NULL};
        MATMUL(md->head, NULL, in, logits, md->vocab, n_out, md->vocab, H, 0, hq);
    }
    free(x); free(tmp); free(big); free(in); free(scores); free(xo); free(xsum); free(wbuf);
    return 0;
}
