/* cluster_search: the search of retrieval/index_cluster.py (ClusterIndex) for every kv head of one
 * layer in one call, heads spread over the thread pool, plus the estimate of the attention on the
 * keys a search did not return (ClusterIndex.estimate_rest). The Python code in ClusterIndex is the
 * reference this follows step by step; retrieval/cluster_batch.py calls it and documents the
 * arguments. Per head:
 *
 *   1. tail keys (not clustered yet) are scored exactly: q . (key - m);
 *   2. with two levels, the super-clusters are ranked by the group bound and the best ones holding
 *      ceil(oversample * b) keys are opened (b = budget - tail keys): their clusters are the
 *      candidates; with one level every cluster is a candidate;
 *   3. candidate clusters are ranked by the group bound (raw + w |q| r, rows compared on a shared
 *      log-softmax-like scale) and taken best first until they hold b keys;
 *   4. their keys (contiguous rows, centred) are scored exactly and each query row keeps its top k
 *      (in no particular order);
 *   5. estimate (optional): every candidate cluster stands for its members that row did not attend
 *      (centroid score + log(count left), mean value), every unopened super-cluster for all its
 *      keys, every tail key not attended for itself; one softmax over these units gives an output
 *      row and its log-sum-exp, to be merged with the exact parts.
 *
 * Scores are fp32 dot products of fp32 queries with the stored rows (bf16 rows widened exactly).
 * Ranking ties are broken by the lower index (a total order), so the result does not depend on
 * the thread count. The GIL is released; a head that cannot allocate its scratch sets `failed`.
 */
#include "common.h"

/* Addresses of one head's tables, in this order (retrieval/cluster_batch.py builds the rows). */
enum {
    P_KEYS,         /* [Nk, D] clustered keys - m, grouped by cluster (bf16 or fp32) */
    P_KEY_POS,      /* [Nk] int64 their positions */
    P_CENT,         /* [C, D] centroid - m */
    P_RADIUS,       /* [C] fp32 */
    P_START,        /* [C] int64 first row of each cluster */
    P_SIZE,         /* [C] int64 rows of each cluster */
    P_TAIL,         /* [P, D] fp32 keys not clustered yet (not centred) */
    P_TAIL_POS,     /* [P] int64 */
    P_TAIL_VAL,     /* [P, D] fp32 their values (estimate) */
    P_CENTER,       /* [D] fp32 m */
    P_SUP,          /* [S, D] super centroid - m */
    P_SUP_RADIUS,   /* [S] fp32 */
    P_SUP_FIRST,    /* [S] int64 first cluster */
    P_SUP_CLUSTERS, /* [S] int64 clusters */
    P_SUP_KEYS,     /* [S] int64 keys */
    P_VMEAN,        /* [C, D] mean value per cluster (estimate) */
    P_SUP_VMEAN,    /* [S, D] mean value per super-cluster (estimate) */
    P_CENT_SCALE,   /* [C] fp32 row scales of P_CENT when the summaries are int8 (else any valid address) */
    P_SUP_SCALE,    /* [S] fp32 row scales of P_SUP */
    P_VMEAN_SCALE,  /* [C] fp32 row scales of P_VMEAN */
    P_SUP_VMEAN_SCALE, /* [S] fp32 row scales of P_SUP_VMEAN */
    P_COUNT
};
enum { N_KEYS, N_CLUSTERS, N_TAIL, N_SUPERS, N_COUNT };

typedef struct {
    const float *q;        /* [H, R, D] */
    const int64_t *ptrs;   /* [H, P_COUNT] */
    const int64_t *counts; /* [H, N_COUNT] */
    int64_t *out_pos;      /* [H, R, k]: each row's top k, any order (-1 past the keys scanned) */
    int64_t *out_scanned;  /* [H] keys scored exactly */
    float *est_out;        /* [H, R, D] (estimate) */
    float *est_lse;        /* [H, R] (estimate) */
    const int64_t *budget; /* [H] keys each head may score exactly (its index's scan budget) */
    Py_ssize_t R, D, k;
    double oversample;
    int formats; /* bit 0: keys and summaries bf16 (else fp32); bit 1: summaries (centroids, super
                  * centroids, mean values) int8 codes with an fp32 scale per row */
    int two_level, estimate;
    float bound_weight, group_scale, est_scale;
    int failed;
} search_args;

/* An unsigned key that orders scores as floats do: larger score, larger key (-0 as +0; callers map
 * NaN to -inf). Ranking is by key, ties broken by the lower index: a total order. */
static ALWAYS_INLINE uint32_t order_key(float s) {
    uint32_t u;
    memcpy(&u, &s, sizeof u);
    u = u == 0x80000000u ? 0u : u;
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

#define COMPACT_MIN 2048 /* compaction paid on the 3072 candidate clusters, not on the 1024 keys scanned */

/* The least m such that the m best of n entries (by key, ties by the lower index) have weights
 * (w[x], or 1 each where w is NULL) summing to at least `target` (all n if they fall short);
 * their indices, increasing, into sel[0..m). The same set as sorting best first and cutting where
 * the running sum reaches the target. The cut key t is found by bisection over the key range, each
 * step one branch-free (vectorised) pass over the entries still in the range: a step that leaves
 * at most half of them copies those into a scratch array (the later steps are short), where a
 * quickselect's data-dependent branches cost more on n of a few thousand. Then one pass takes every
 * key above t and the keys equal to t in index order until the target is reached. `target` <= 0
 * selects nothing. */
static ALWAYS_INLINE Py_ssize_t take_best(const uint32_t *key, const int32_t *w, Py_ssize_t n, int64_t target,
                                          int32_t *sel) {
    if (target <= 0 || n <= 0) return 0;
    uint32_t lo = UINT32_MAX, hi = 0;
    int64_t total = 0;
    for (Py_ssize_t x = 0; x < n; x++) {
        lo = key[x] < lo ? key[x] : lo;
        hi = key[x] > hi ? key[x] : hi;
        total += w ? w[x] : 1;
    }
    if (total < target) {
        for (Py_ssize_t x = 0; x < n; x++) sel[x] = (int32_t)x;
        return n;
    }
    /* t = the largest key with (weight of the keys >= t) >= target: lo always qualifies. The
     * entries (k, wv)[0..m) hold every key in [lo, hi] (and maybe others); `dropped` is the weight
     * of the keys above hi that a compaction left out of them. */
    uint32_t *ck = n >= COMPACT_MIN ? malloc((size_t)n * sizeof *ck) : NULL; /* NULL: no compaction, the same result */
    int32_t *cw = w && ck ? malloc((size_t)n * sizeof *cw) : NULL;
    const int compact = n >= COMPACT_MIN && ck && (!w || cw), narrow = total <= INT32_MAX;
    const uint32_t *k = key;
    const int32_t *wv = w;
    Py_ssize_t m = n;
    int64_t dropped = 0;
    while (lo < hi) {
        const uint32_t mid = lo + (uint32_t)(((uint64_t)hi - lo + 1) / 2);
        int64_t s = 0;
        int32_t cnt = 0; /* entries >= mid */
        if (!wv) {
            for (Py_ssize_t x = 0; x < m; x++) cnt += k[x] >= mid;
            s = cnt;
        } else if (narrow) {
            int32_t c = 0;
            for (Py_ssize_t x = 0; x < m; x++) {
                c += k[x] >= mid ? wv[x] : 0;
                cnt += k[x] >= mid;
            }
            s = c;
        } else {
            for (Py_ssize_t x = 0; x < m; x++) {
                s += k[x] >= mid ? wv[x] : 0;
                cnt += k[x] >= mid;
            }
        }
        Py_ssize_t keep; /* at most this many entries of k are in the new range */
        if (dropped + s >= target) {
            lo = mid;
            keep = cnt;
        } else {
            hi = mid - 1;
            keep = m - cnt;
        }
        if (compact && 2 * keep <= m) {
            Py_ssize_t j = 0; /* branch-free: every entry written, the kept ones advance j */
            if (wv)
                for (Py_ssize_t x = 0; x < m; x++) {
                    const uint32_t kx = k[x];
                    const int32_t wx = wv[x];
                    dropped += kx > hi ? wx : 0;
                    ck[j] = kx;
                    cw[j] = wx;
                    j += kx >= lo && kx <= hi;
                }
            else
                for (Py_ssize_t x = 0; x < m; x++) {
                    const uint32_t kx = k[x];
                    dropped += kx > hi;
                    ck[j] = kx;
                    j += kx >= lo && kx <= hi;
                }
            k = ck;
            wv = wv ? cw : NULL;
            m = j;
        }
    }
    free(ck);
    free(cw);
    const uint32_t t = lo;
    int64_t above = 0;
    for (Py_ssize_t x = 0; x < n; x++) above += key[x] > t ? (w ? w[x] : 1) : 0;
    Py_ssize_t last = -1;
    for (Py_ssize_t x = 0; x < n && above < target; x++)
        if (key[x] == t) {
            above += w ? w[x] : 1;
            last = x;
        }
    Py_ssize_t c = 0;
    for (Py_ssize_t x = 0; x < n; x++)
        if (key[x] > t || (key[x] == t && x <= last)) sel[c++] = (int32_t)x;
    return c;
}

typedef int32_t v16i __attribute__((vector_size(64)));

/* Row formats: K_F32, K_BF16 (widened exactly), K_I8 (int8 codes widened to exact fp32 integers;
 * the row's fp32 scale is applied by the caller, once per row and not per value).
 *
 * An int8 row is stored in chunks of 64 values, each chunk 16 int32 lanes whose bytes hold values
 * (from the highest byte down) i, 16 + i, 32 + i and 48 + i of the chunk (a row padded with zeros
 * to a multiple of 64 values; retrieval/buffer.py: Int8Rows packs it). So 16 consecutive values are
 * one 64-byte load, a left shift by 0, 8, 16 or 24 bits and an arithmetic right shift by 24: plain
 * vector operations in every ISA's clone (GCC 12 widens a 16-byte int8 vector lane by lane). */
enum { K_F32 = 0, K_BF16 = 1, K_I8 = 2 };

/* Bytes of one row of d values of `kind`. */
static ALWAYS_INLINE size_t row_stride(int kind, Py_ssize_t d) {
    return kind == K_I8 ? (size_t)((d + 63) / 64) * 64 : (size_t)d * (kind == K_BF16 ? 2 : 4);
}

/* 16 values of a row of `kind` from element i (a multiple of 16; the branch is hoisted out of the loops). */
static ALWAYS_INLINE v16f load16(const void *row, Py_ssize_t i, int kind) {
    if (kind == K_I8) {
        v16i w;
        memcpy(&w, (const int8_t *)row + (i / 64) * 64, sizeof w);
        const int up = (int)(8 * ((i % 64) / 16));
        return __builtin_convertvector((w << up) >> 24, v16f);
    }
    return kind == K_BF16 ? load_bf16x16((const uint16_t *)row + i) : load_f32x16((const float *)row + i);
}

static ALWAYS_INLINE float load1(const void *row, Py_ssize_t i, int kind) {
    if (kind == K_I8) return (float)((const int8_t *)row)[(i / 64) * 64 + 4 * (i % 16) + 3 - (i % 64) / 16];
    return kind == K_BF16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
}

/* q . row in fp32 (row bf16, widened exactly, or fp32; int8: q . codes, unscaled). */
static ALWAYS_INLINE float dot_any_row(const float *restrict q, const void *row, Py_ssize_t d, int bf16) {
    Py_ssize_t i = 0;
    float t = 0.f;
    if (d >= 16) {
        v16f a0 = {0}, a1 = {0};
        for (; i + 32 <= d; i += 32) {
            a0 += load_f32x16(q + i) * load16(row, i, bf16);
            a1 += load_f32x16(q + i + 16) * load16(row, i + 16, bf16);
        }
        for (; i + 16 <= d; i += 16) a0 += load_f32x16(q + i) * load16(row, i, bf16);
        t = hsum16_tree(a0 + a1);
    }
    for (; i < d; i++) t += q[i] * load1(row, i, bf16);
    return t;
}

static ALWAYS_INLINE float dot_row(const float *q, const void *table, int64_t row, Py_ssize_t d, int bf16) {
    return dot_any_row(q, (const char *)table + (size_t)row * row_stride(bf16, d), d, bf16);
}

#define ROW_VECS 16 /* rows of up to 256 values are widened once into registers / L1 */
#define PREFETCH_ROWS 12 /* table rows fetched ahead of the one being scored (~DRAM latency / time per row) */

/* Asks for the `bytes` at p to be brought into the caches (the rows scanned are scattered clusters:
 * the hardware prefetcher cannot guess the next one). */
static ALWAYS_INLINE void prefetch_bytes(const void *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 3);
}

/* The same into the L2 cache only: for a block of rows asked for at once, which would crowd the L1's
 * fill buffers and evict the rows being read (the value pass: 341 -> 281 kcycles per head). */
static ALWAYS_INLINE void prefetch_l2(const void *p, size_t bytes) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, 2);
}

/* Widens row `row` of `table` ([*, d] of kind `bf16`) into v[d / 16] (d a multiple of 16, <= 256). */
static ALWAYS_INLINE void load_row(const void *table, int64_t row, Py_ssize_t d, int bf16, v16f *v) {
    const char *p = (const char *)table + (size_t)row * row_stride(bf16, d);
    for (Py_ssize_t c = 0; c < d / 16; c++) v[c] = load16(p, 16 * c, bf16);
}

/* o += w * base[row] (a row of kind `bf16`, d values). */
static ALWAYS_INLINE void axpy_any(float *o, float w, const void *base, int64_t row, Py_ssize_t d, int bf16) {
    const char *v = (const char *)base + (size_t)row * row_stride(bf16, d);
    Py_ssize_t i = 0;
    for (; i + 16 <= d; i += 16) {
        v16f y = load_f32x16(o + i) + w * load16(v, i, bf16);
        memcpy(o + i, &y, sizeof y);
    }
    for (; i < d; i++) o[i] += w * load1(v, i, bf16);
}

/* The lane sums of four vectors, each in hsum16_tree's order (so each equals hsum16_tree of its
 * vector to the bit), with the shuffles shared: [sum v0, sum v1, sum v2, sum v3]. */
static ALWAYS_INLINE v4f hsum16_tree4(v16f v0, v16f v1, v16f v2, v16f v3) {
#define HALVES(v) (__builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + \
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15))
    const v8f h0 = HALVES(v0), h1 = HALVES(v1), h2 = HALVES(v2), h3 = HALVES(v3);
#undef HALVES
    const v8f p01 = __builtin_shufflevector(h0, h1, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(h0, h1, 4, 5, 6, 7, 12, 13, 14, 15);  /* [f0 | f1] */
    const v8f p23 = __builtin_shufflevector(h2, h3, 0, 1, 2, 3, 8, 9, 10, 11) +
                    __builtin_shufflevector(h2, h3, 4, 5, 6, 7, 12, 13, 14, 15);  /* [f2 | f3] */
    const v8f g = __builtin_shufflevector(p01, p23, 0, 1, 4, 5, 8, 9, 12, 13) +
                  __builtin_shufflevector(p01, p23, 2, 3, 6, 7, 10, 11, 14, 15);  /* f[0]+f[2], f[1]+f[3] */
    return __builtin_shufflevector(g, g, 0, 2, 4, 6) + __builtin_shufflevector(g, g, 1, 3, 5, 7);
}

/* q_r . v over d / 16 widened chunks, accumulated as dots_widened does (even chunks, odd chunks). */
#define DOT_ACC(qr, d, v, a0, a1)                                          \
    do {                                                                    \
        Py_ssize_t c_ = 0;                                                  \
        for (; c_ + 2 <= (d) / 16; c_ += 2) {                               \
            a0 += load_f32x16((qr) + 16 * c_) * (v)[c_];                    \
            a1 += load_f32x16((qr) + 16 * c_ + 16) * (v)[c_ + 1];           \
        }                                                                   \
        if (c_ < (d) / 16) a0 += load_f32x16((qr) + 16 * c_) * (v)[c_];     \
    } while (0)

/* q_r . v for the R query rows (q [R, d]), v a widened row; out[r * stride]. Rows four at a time
 * share the horizontal sums (each row's result is the same as alone). */
static ALWAYS_INLINE void dots_widened(const float *q, Py_ssize_t R, Py_ssize_t d, const v16f *v, float *out,
                                      Py_ssize_t stride) {
    Py_ssize_t r = 0;
    for (; r + 4 <= R; r += 4) {
        const float *q0 = q + r * d, *q1 = q0 + d, *q2 = q1 + d, *q3 = q2 + d;
        v16f a00 = {0}, a01 = {0}, a10 = {0}, a11 = {0}, a20 = {0}, a21 = {0}, a30 = {0}, a31 = {0};
        Py_ssize_t c = 0;
        for (; c + 2 <= d / 16; c += 2) {
            const v16f ve = v[c], vo = v[c + 1];
            a00 += load_f32x16(q0 + 16 * c) * ve;
            a01 += load_f32x16(q0 + 16 * c + 16) * vo;
            a10 += load_f32x16(q1 + 16 * c) * ve;
            a11 += load_f32x16(q1 + 16 * c + 16) * vo;
            a20 += load_f32x16(q2 + 16 * c) * ve;
            a21 += load_f32x16(q2 + 16 * c + 16) * vo;
            a30 += load_f32x16(q3 + 16 * c) * ve;
            a31 += load_f32x16(q3 + 16 * c + 16) * vo;
        }
        if (c < d / 16) {
            const v16f ve = v[c];
            a00 += load_f32x16(q0 + 16 * c) * ve;
            a10 += load_f32x16(q1 + 16 * c) * ve;
            a20 += load_f32x16(q2 + 16 * c) * ve;
            a30 += load_f32x16(q3 + 16 * c) * ve;
        }
        const v4f t = hsum16_tree4(a00 + a01, a10 + a11, a20 + a21, a30 + a31);
        out[r * stride] = t[0];
        out[(r + 1) * stride] = t[1];
        out[(r + 2) * stride] = t[2];
        out[(r + 3) * stride] = t[3];
    }
    for (; r < R; r++) {
        v16f a0 = {0}, a1 = {0};
        DOT_ACC(q + r * d, d, v, a0, a1);
        out[r * stride] = hsum16_tree(a0 + a1);
    }
}

/* out[r * n + e] = q_r . table[rows[e]] for the R query rows (rows == NULL: row e itself); each
 * table row is read (and widened) once for all query rows. An int8 table (kind K_I8) scores
 * scale[row] * (q_r . codes): the dequantized row's score up to fp32 rounding. */
static ALWAYS_INLINE void score_rows(const float *q, Py_ssize_t R, Py_ssize_t d, const void *table, int bf16,
                                     const float *scale, const int64_t *rows, Py_ssize_t n, float *out) {
    if (d % 16 == 0 && d <= 16 * ROW_VECS) {
        v16f v[ROW_VECS];
        const size_t row_bytes = row_stride(bf16, d);
        for (Py_ssize_t e = 0; e < n; e++) {
            if (rows && e + PREFETCH_ROWS < n)
                prefetch_bytes((const char *)table + rows[e + PREFETCH_ROWS] * row_bytes, row_bytes);
            const int64_t row = rows ? rows[e] : e;
            load_row(table, row, d, bf16, v);
            dots_widened(q, R, d, v, out + e, n);
            if (bf16 == K_I8)
                for (Py_ssize_t r = 0; r < R; r++) out[r * n + e] *= scale[row];
        }
        return;
    }
    for (Py_ssize_t e = 0; e < n; e++) {
        int64_t row = rows ? rows[e] : e;
        for (Py_ssize_t r = 0; r < R; r++)
            out[r * n + e] = dot_row(q + r * d, table, row, d, bf16) * (bf16 == K_I8 ? scale[row] : 1.f);
    }
}

#define UNIT_BLOCK 64 /* units whose value rows are accumulated together (their rows stay in L1) */

/* A[r][c] += w[r][x] * row_x[c] for NR rows and NC 16-value chunks from chunk c0, over n units,
 * the accumulators in registers (NR, NC compile-time after inlining). Each (row, value) sums the
 * units in order, one multiply-add each: the same operations as one unit at a time. */
static ALWAYS_INLINE void accumulate_block(const int NR, const int NC, float *acc, const float *us, Py_ssize_t U,
                                           Py_ssize_t D, const void *const *rows, const float *rscale,
                                           Py_ssize_t x0, Py_ssize_t n, Py_ssize_t r0, Py_ssize_t c0, int bf16) {
    v16f A[4][4];
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < NC; c++) A[r][c] = load_f32x16(acc + (r0 + r) * D + 16 * (c0 + c));
    for (Py_ssize_t x = 0; x < n; x++) {
        v16f v[4];
        for (int c = 0; c < NC; c++) v[c] = load16(rows[x], 16 * (c0 + c), bf16);
        for (int r = 0; r < NR; r++) {
            const float w = bf16 == K_I8 ? us[(r0 + r) * U + x0 + x] * rscale[x] : us[(r0 + r) * U + x0 + x];
            for (int c = 0; c < NC; c++) A[r][c] = A[r][c] + w * v[c];
        }
    }
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < NC; c++) memcpy(acc + (r0 + r) * D + 16 * (c0 + c), &A[r][c], sizeof(v16f));
}

/* acc[r] += sum over units x0 .. x0+n of us[r * U + x] * rows[x - x0] for the R query rows (D a
 * multiple of 16): blocks of up to 4 rows x 64 values held in registers. int8 rows (kind K_I8):
 * the weight times the row's scale rscale[x - x0] multiplies the codes. */
static ALWAYS_INLINE void accumulate_units(float *acc, const float *us, Py_ssize_t U, Py_ssize_t R, Py_ssize_t D,
                                           const void *const *rows, const float *rscale, Py_ssize_t x0, Py_ssize_t n,
                                           int bf16) {
    const Py_ssize_t chunks = D / 16;
    for (Py_ssize_t c0 = 0; c0 < chunks; c0 += 4) {
        const Py_ssize_t nc = chunks - c0 < 4 ? chunks - c0 : 4;
        for (Py_ssize_t r0 = 0; r0 < R; r0 += 4) {
            const Py_ssize_t nr = R - r0 < 4 ? R - r0 : 4;
#define ACC_CASE(a_, b_) \
    if (nr == a_ && nc == b_) { accumulate_block(a_, b_, acc, us, U, D, rows, rscale, x0, n, r0, c0, bf16); continue; }
            ACC_CASE(4, 4) ACC_CASE(4, 2) ACC_CASE(4, 1) ACC_CASE(4, 3)
            ACC_CASE(1, 4) ACC_CASE(1, 2) ACC_CASE(1, 1) ACC_CASE(1, 3)
            ACC_CASE(2, 4) ACC_CASE(2, 2) ACC_CASE(2, 1) ACC_CASE(2, 3)
            ACC_CASE(3, 4) ACC_CASE(3, 2) ACC_CASE(3, 1) ACC_CASE(3, 3)
#undef ACC_CASE
        }
    }
}

/* No fused multiply-adds in a function (GCC; others compile the baseline's plain operations). */
#if defined(__GNUC__) && !defined(__clang__)
#define NO_CONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define NO_CONTRACT
#endif

static const float NEG_INF16[16] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY,
                                    -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};

/* Lane-wise z > m ? z : m (NaN in z never taken). */
static ALWAYS_INLINE v16f max_keep(v16f z, v16f m) {
    const v16i gt = z > m;
    return (v16f)(((v16i)z & gt) | ((v16i)m & ~gt));
}

/* bound = raw + wq * radius, then scaled: scale * bound (w == 0: scale * raw). */
#define GROUP_Z(rw, rp, e, wq) ((w) != 0.f ? scale * ((rw)[e] + (wq) * (rp)[e]) : scale * (rw)[e])

/* The group's score of each of n entries (ClusterIndex._group_bound), as its order_key into out:
 * bound = raw + w |q_r| radius; one row: its bound; several: max over rows of scale * bound - (the
 * row's max of it). Compiled for each target but without fused multiply-adds: each row's best
 * entry must score exactly 0 (z - max z), the tie the reference breaks by index, and a fused
 * multiply-add would leave its rounding error instead. The maxima run over 16 lanes (max is exact
 * in any order). */
MULTIVERSION NO_CONTRACT
static int group_scores(const float *raw, Py_ssize_t R, Py_ssize_t n, const float *radius, const int64_t *rows,
                        const float *qn, float w, float scale, uint32_t *out, float *zmax) {
    /* the entries' radii gathered once into a contiguous array and the scores kept in one, so that
     * the loops below are plain streams (each element's operations are unchanged) */
    float *rad = NULL, *best = malloc((size_t)(n > 0 ? n : 1) * sizeof *best);
    if (!best) return -1;
    const float *rp = radius;
    if (rows && w != 0.f) {
        rad = malloc((size_t)(n > 0 ? n : 1) * sizeof *rad);
        if (!rad) {
            free(best);
            return -1;
        }
        for (Py_ssize_t e = 0; e < n; e++) rad[e] = radius[rows[e]];
        rp = rad;
    }
    if (R == 1) {
        const float wq = w * qn[0];
        for (Py_ssize_t e = 0; e < n; e++) {
            float b = raw[e];
            if (w != 0.f) b = b + wq * rp[e];
            best[e] = b == b ? b : -INFINITY;
        }
    } else {
        const v16f ninf = load_f32x16(NEG_INF16);
        for (Py_ssize_t r = 0; r < R; r++) {
            const float *rw = raw + r * n, wq = w * qn[r];
            v16f m = ninf;
            Py_ssize_t e = 0;
            for (; e + 16 <= n; e += 16) {
                const v16f z = w != 0.f ? scale * (load_f32x16(rw + e) + wq * load_f32x16(rp + e)) : scale * load_f32x16(rw + e);
                m = max_keep(z, m);
            }
            float zr = -INFINITY;
            for (int l = 0; l < 16; l++) zr = m[l] > zr ? m[l] : zr;
            for (; e < n; e++) {
                const float z = GROUP_Z(rw, rp, e, wq);
                zr = z > zr ? z : zr;
            }
            zmax[r] = zr;
        }
        for (Py_ssize_t r = 0; r < R; r++) {
            const float *rw = raw + r * n, wq = w * qn[r], zr = zmax[r];
            Py_ssize_t e = 0;
            for (; e + 16 <= n; e += 16) {
                const v16f z = w != 0.f ? scale * (load_f32x16(rw + e) + wq * load_f32x16(rp + e)) : scale * load_f32x16(rw + e);
                const v16f g = z - zr, old = r ? load_f32x16(best + e) : ninf;
                const v16f y = max_keep(g, old);
                memcpy(best + e, &y, sizeof y);
            }
            for (; e < n; e++) {
                const float g = GROUP_Z(rw, rp, e, wq) - zr, old = r ? best[e] : -INFINITY;
                best[e] = g > old ? g : old;
            }
        }
    }
    for (Py_ssize_t e = 0; e < n; e++) out[e] = order_key(best[e]);
    free(rad);
    free(best);
    return 0;
}

#undef GROUP_Z

#define SCAN_AHEAD 4 /* clusters prefetched ahead of the one scanned */

#define LOG_TABLE 1024
static float log_table[LOG_TABLE]; /* log_table[n] = logf(n) */

__attribute__((constructor)) static void fill_log_table(void) {
    log_table[0] = -INFINITY;
    for (int n = 1; n < LOG_TABLE; n++) log_table[n] = logf((float)n);
}

static inline float log_count(int64_t n) { return n < LOG_TABLE ? log_table[n] : logf((float)n); }

#define TAB(T, i) ((T)(uintptr_t)pt[i])

/* One head; 0 on success, -1 when out of memory. D: the head dimension, R: query rows (constants
 * where search_head's common cases inline it). */
static ALWAYS_INLINE int search_body(const search_args *a, Py_ssize_t h, const Py_ssize_t D, const Py_ssize_t R) {
    const Py_ssize_t K = a->k;
    const int64_t *pt = a->ptrs + h * P_COUNT, *cnt = a->counts + h * N_COUNT;
    const Py_ssize_t C = cnt[N_CLUSTERS], P = cnt[N_TAIL], S = cnt[N_SUPERS];
    const float *q = a->q + h * R * D;
    const int bf = a->formats & 1, sk = a->formats & 2 ? K_I8 : bf; /* keys, summaries */
    const float *cent_scale = TAB(const float *, P_CENT_SCALE), *sup_scale = TAB(const float *, P_SUP_SCALE);
    const void *keys = TAB(const void *, P_KEYS), *cent = TAB(const void *, P_CENT), *sup = TAB(const void *, P_SUP);
    const int64_t *key_pos = TAB(const int64_t *, P_KEY_POS), *start = TAB(const int64_t *, P_START);
    const int64_t *size = TAB(const int64_t *, P_SIZE), *tail_pos = TAB(const int64_t *, P_TAIL_POS);
    const int64_t *sup_first = TAB(const int64_t *, P_SUP_FIRST), *sup_clusters = TAB(const int64_t *, P_SUP_CLUSTERS);
    const int64_t *sup_keys = TAB(const int64_t *, P_SUP_KEYS);
    const float *radius = TAB(const float *, P_RADIUS), *tail = TAB(const float *, P_TAIL);
    const float *tail_val = TAB(const float *, P_TAIL_VAL), *center = TAB(const float *, P_CENTER);
    const float *sup_radius = TAB(const float *, P_SUP_RADIUS);

    const Py_ssize_t b = (Py_ssize_t)a->budget[h] - P;
    const int stage = C > 0 && b > 0;                /* clusters are searched */
    const int two = stage && a->two_level && S > 0; /* through the super-clusters */
    const int need_c = stage || (a->estimate && C > 0);
    int rc = -1;
    float *qn = NULL, *qm = NULL, *zmax = NULL, *raw_s = NULL, *raw_c = NULL, *scores = NULL, *tail_raw = NULL;
    float *us = NULL, *acc = NULL;
    uint32_t *gs = NULL, *gc = NULL, *tk = NULL;
    int32_t *pick = NULL, *sel_s = NULL, *top = NULL;
    unsigned char *chosen = NULL, *tail_taken = NULL;
    int64_t *cand = NULL, *pos_of = NULL;
    int32_t *wt = NULL;
    int32_t *unit_of = NULL, *taken = NULL, *topk_of = NULL;
    const void **vptr = NULL;
    float *vsc = NULL;
    Py_ssize_t M = 0, nsel = 0, rows = 0;

    qn = malloc((size_t)R * sizeof *qn);
    qm = malloc((size_t)R * sizeof *qm);
    zmax = malloc((size_t)R * sizeof *zmax);
    if (!qn || !qm || !zmax) goto out;
    for (Py_ssize_t r = 0; r < R; r++) {
        const float *qr = q + r * D;
        float n2 = 0.f, m = 0.f;
        for (Py_ssize_t i = 0; i < D; i++) {
            n2 += qr[i] * qr[i];
            m += qr[i] * center[i];
        }
        qn[r] = sqrtf(n2);
        qm[r] = m;
    }

    /* 2. candidates */
    if (two) {
        raw_s = malloc((size_t)(R * S) * sizeof *raw_s);
        gs = malloc((size_t)S * sizeof *gs);
        sel_s = malloc((size_t)S * sizeof *sel_s);
        wt = malloc((size_t)S * sizeof *wt);
        chosen = calloc((size_t)S, 1);
        if (!raw_s || !gs || !sel_s || !wt || !chosen) goto out;
        score_rows(q, R, D, sup, sk, sup_scale, NULL, S, raw_s);
        if (group_scores(raw_s, R, S, sup_radius, NULL, qn, a->bound_weight, a->group_scale, gs, zmax)) goto out;
        for (Py_ssize_t s = 0; s < S; s++) wt[s] = (int32_t)sup_keys[s];
        const Py_ssize_t n_open = take_best(gs, wt, S, (int64_t)ceil(a->oversample * (double)b), sel_s);
        for (Py_ssize_t i = 0; i < n_open; i++) chosen[sel_s[i]] = 1;
        for (Py_ssize_t s = 0; s < S; s++)
            if (chosen[s]) M += sup_clusters[s];
        cand = malloc((size_t)(M > 0 ? M : 1) * sizeof *cand);
        if (!cand) goto out;
        Py_ssize_t m = 0;
        for (Py_ssize_t s = 0; s < S; s++)
            if (chosen[s])
                for (int64_t c = 0; c < sup_clusters[s]; c++) cand[m++] = sup_first[s] + c;
    } else if (need_c) {
        M = C;
    }
    if (need_c) {
        raw_c = malloc((size_t)(R * (M > 0 ? M : 1)) * sizeof *raw_c);
        if (!raw_c) goto out;
        score_rows(q, R, D, cent, sk, cent_scale, cand, M, raw_c);
    }

    /* 3. clusters best first until they hold b keys */
    if (stage) {
        gc = malloc((size_t)(M > 0 ? M : 1) * sizeof *gc);
        if (!gc) goto out;
        if (group_scores(raw_c, R, M, radius, cand, qn, a->bound_weight, a->group_scale, gc, zmax)) goto out;
        free(wt);
        wt = malloc((size_t)(M > 0 ? M : 1) * sizeof *wt);
        pick = malloc((size_t)(M > 0 ? M : 1) * sizeof *pick);
        if (!wt || !pick) goto out;
        for (Py_ssize_t m = 0; m < M; m++) wt[m] = (int32_t)size[cand ? cand[m] : m];
        nsel = take_best(gc, wt, M, (int64_t)b, pick); /* in candidate order: the scan walks the keys forward */
        for (Py_ssize_t i = 0; i < nsel; i++) rows += wt[pick[i]];
    }

    /* 4. exact scores of the tail and of the chosen clusters' keys; each row's top k */
    const Py_ssize_t n = P + rows;
    scores = malloc((size_t)(R * (n > 0 ? n : 1)) * sizeof *scores);
    pos_of = malloc((size_t)(n > 0 ? n : 1) * sizeof *pos_of);
    unit_of = malloc((size_t)(n > 0 ? n : 1) * sizeof *unit_of);
    tk = malloc((size_t)(n > 0 ? n : 1) * sizeof *tk);
    tail_raw = malloc((size_t)(R * (P > 0 ? P : 1)) * sizeof *tail_raw);
    if (!scores || !pos_of || !unit_of || !tk || !tail_raw) goto out;
    for (Py_ssize_t p = 0; p < P; p++) {
        const float *kp = tail + p * D;
        for (Py_ssize_t r = 0; r < R; r++) {
            const float *qr = q + r * D;
            float centred = 0.f, plain = 0.f;
            for (Py_ssize_t i = 0; i < D; i++) {
                centred += qr[i] * (kp[i] - center[i]);
                plain += qr[i] * kp[i];
            }
            scores[r * n + p] = centred;
            tail_raw[r * P + p] = plain;
        }
        pos_of[p] = tail_pos[p];
        unit_of[p] = -1;
    }
    Py_ssize_t e = P;
    const size_t key_bytes = (size_t)D * (bf ? 2 : 4);
    /* the chosen clusters' rows, a few clusters ahead prefetched */
    for (Py_ssize_t i = 0; i < nsel; i++) {
        const int32_t m = pick[i];
        const int64_t c = cand ? cand[m] : m;
        if (i + SCAN_AHEAD < nsel) {  /* a later cluster: its rows and positions are elsewhere in the tables */
            const int64_t c2 = cand ? cand[pick[i + SCAN_AHEAD]] : pick[i + SCAN_AHEAD];
            prefetch_l2((const char *)keys + start[c2] * key_bytes, (size_t)size[c2] * key_bytes); /* L1's fill buffers hold fewer than 4 clusters' lines */
            __builtin_prefetch(key_pos + start[c2], 0, 0);
        }
        for (int64_t row = start[c]; row < start[c] + size[c]; row++, e++) {
            if (D % 16 == 0 && D <= 16 * ROW_VECS) {
                v16f v[ROW_VECS];
                load_row(keys, row, D, bf, v);
                dots_widened(q, R, D, v, scores + e, n);
            } else {
                for (Py_ssize_t r = 0; r < R; r++) scores[r * n + e] = dot_row(q + r * D, keys, row, D, bf);
            }
            pos_of[e] = key_pos[row];
            unit_of[e] = m;
        }
    }
    a->out_scanned[h] = n;
    const Py_ssize_t kk = K < n ? K : n;
    if (a->estimate) {
        taken = calloc((size_t)(R * (M > 0 ? M : 1)), sizeof *taken);
        tail_taken = calloc((size_t)(R * (P > 0 ? P : 1)), 1);
        topk_of = malloc((size_t)(R * (kk > 0 ? kk : 1)) * sizeof *topk_of);
        if (!taken || !tail_taken || !topk_of) goto out;
    }
    if (!a->estimate) { /* with the estimate, each row's picks go to topk_of */
        top = malloc((size_t)(kk > 0 ? kk : 1) * sizeof *top);
        if (!top) goto out;
    }
    for (Py_ssize_t r = 0; r < R; r++) {
        for (Py_ssize_t x = 0; x < n; x++) {
            const float s = scores[r * n + x];
            tk[x] = order_key(s == s ? s : -INFINITY);
        }
        int32_t *const best = a->estimate ? topk_of + r * (kk > 0 ? kk : 1) : top;
        take_best(tk, NULL, n, kk, best); /* kk of them, in scan order */
        int64_t *o = a->out_pos + (h * R + r) * K;
        for (Py_ssize_t i = 0; i < K; i++) o[i] = i < kk ? pos_of[best[i]] : -1;
        if (a->estimate)
            for (Py_ssize_t i = 0; i < kk; i++) {
                const int32_t x = best[i];
                if (x < P) tail_taken[r * P + x] = 1;
                else taken[r * M + unit_of[x]]++;
            }
    }

    /* 5. the estimate of the unattended keys */
    if (a->estimate) {
        const Py_ssize_t n_sup = two ? S : 0, U = M + n_sup + P;
        const void *vmean = TAB(const void *, P_VMEAN), *sup_vmean = TAB(const void *, P_SUP_VMEAN);
        us = malloc((size_t)(R * (U > 0 ? U : 1)) * sizeof *us);
        acc = calloc((size_t)(R * D), sizeof *acc);
        if (!us || !acc) goto out;
        const float sc = a->est_scale;
        /* log(members) of each candidate cluster, shared by the rows (a table lookup per cluster) */
        float *logsz = malloc((size_t)(M > 0 ? M : 1) * sizeof *logsz);
        if (!logsz) goto out;
        for (Py_ssize_t m = 0; m < M; m++) logsz[m] = log_count(size[cand ? cand[m] : m]);
        for (Py_ssize_t r = 0; r < R; r++) {
            float *u = us + r * U, mx = -INFINITY;
            const float *rc = raw_c + r * M, qmr = qm[r];
            /* every candidate stands for all its members (a plain stream: vectorised) ... */
            for (Py_ssize_t m = 0; m < M; m++) u[m] = (rc[m] + qmr) * sc + logsz[m];
            /* ... except those this row attended some of: the members left, or nothing when none are */
            const int32_t *tr = taken + r * M;
            for (Py_ssize_t i = 0; i < kk; i++) {
                const int32_t x = topk_of[r * (kk > 0 ? kk : 1) + i];
                if (x < P) continue;
                const int32_t m = unit_of[x], t = tr[m];
                const int64_t left = size[cand ? cand[m] : m] - t;
                u[m] = left > 0 ? (rc[m] + qmr) * sc + log_count(left) : -INFINITY;
            }
            for (Py_ssize_t s2 = 0; s2 < n_sup; s2++)
                u[M + s2] = chosen[s2] ? -INFINITY : (raw_s[r * S + s2] + qmr) * sc + log_count(sup_keys[s2]);
            for (Py_ssize_t p = 0; p < P; p++) u[M + n_sup + p] = tail_taken[r * P + p] ? -INFINITY : tail_raw[r * P + p] * sc;
            {   /* the maximum over 16 lanes (exact in any order) */
                v16f mv = load_f32x16(NEG_INF16);
                Py_ssize_t x = 0;
                for (; x + 16 <= U; x += 16) mv = max_keep(load_f32x16(u + x), mv);
                for (int l = 0; l < 16; l++) mx = mv[l] > mx ? mv[l] : mx;
                for (; x < U; x++) mx = u[x] > mx ? u[x] : mx;
            }
            float sum = 0.f;
            if (mx == -INFINITY) {
                for (Py_ssize_t x = 0; x < U; x++) u[x] = 0.f;
            } else {
                for (Py_ssize_t x = 0; x < U; x++) u[x] = u[x] == -INFINITY ? 0.f : exp_le0(u[x] - mx);
                for (Py_ssize_t x = 0; x < U; x++) sum += u[x];
            }
            a->est_lse[h * R + r] = mx == -INFINITY ? -INFINITY : mx + logf(sum);
            zmax[r] = sum > 0.f ? 1.f / sum : 0.f;  /* reused: 1 / sum */
        }
        free(logsz);
        /* acc[r] = sum over units of weight[r][unit] * the unit's value row: the clusters' and
         * super-clusters' mean values (store dtype) in register blocks, then the tail values (fp32) */
        const size_t vrow_bytes = row_stride(sk, D);
        const float *vm_scale = TAB(const float *, P_VMEAN_SCALE), *svm_scale = TAB(const float *, P_SUP_VMEAN_SCALE);
        const Py_ssize_t Uc = M + n_sup;
        if (sk == K_I8) {
            vsc = malloc((size_t)(Uc > 0 ? Uc : 1) * sizeof *vsc);
            if (!vsc) goto out;
            for (Py_ssize_t x = 0; x < Uc; x++) vsc[x] = x < M ? vm_scale[cand ? cand[x] : x] : svm_scale[x - M];
        }
        if (D % 16 == 0 && D <= 16 * ROW_VECS) {
            vptr = malloc((size_t)(Uc > 0 ? Uc : 1) * sizeof *vptr);
            if (!vptr) goto out;
            for (Py_ssize_t x = 0; x < Uc; x++)
                vptr[x] = x < M ? (const char *)vmean + (cand ? cand[x] : x) * vrow_bytes
                                : (const char *)sup_vmean + (x - M) * vrow_bytes;
            for (Py_ssize_t x = 0; x < UNIT_BLOCK && x < Uc; x++) prefetch_l2(vptr[x], vrow_bytes);
            for (Py_ssize_t x0 = 0; x0 < Uc; x0 += UNIT_BLOCK) {
                const Py_ssize_t n_ = x0 + UNIT_BLOCK < Uc ? UNIT_BLOCK : Uc - x0;
                /* the next block's rows, spread over this block's units */
                for (Py_ssize_t x = x0 + UNIT_BLOCK; x < x0 + 2 * UNIT_BLOCK && x < Uc; x++)
                    prefetch_l2(vptr[x], vrow_bytes);
                accumulate_units(acc, us, U, R, D, vptr + x0, vsc ? vsc + x0 : NULL, x0, n_, sk);
            }
        } else {
            for (Py_ssize_t x = 0; x < Uc; x++) {
                const void *vrow = x < M ? (const char *)vmean + (cand ? cand[x] : x) * vrow_bytes
                                         : (const char *)sup_vmean + (x - M) * vrow_bytes;
                for (Py_ssize_t r = 0; r < R; r++)
                    if (us[r * U + x] != 0.f)
                        axpy_any(acc + r * D, sk == K_I8 ? us[r * U + x] * vsc[x] : us[r * U + x], vrow, 0, D, sk);
            }
        }
        for (Py_ssize_t x = Uc; x < U; x++)
            for (Py_ssize_t r = 0; r < R; r++)
                if (us[r * U + x] != 0.f) axpy_any(acc + r * D, us[r * U + x], tail_val + (x - Uc) * D, 0, D, 0);
        for (Py_ssize_t r = 0; r < R; r++)
            for (Py_ssize_t i = 0; i < D; i++) a->est_out[(h * R + r) * D + i] = acc[r * D + i] * zmax[r];
    }
    rc = 0;
out:
    free(qn); free(qm); free(zmax); free(raw_s); free(gs); free(chosen); free(cand); free(raw_c); free(wt);
    free(gc); free(scores); free(pos_of); free(unit_of); free(tk); free(tail_raw); free(taken); free(tail_taken); free(topk_of); free(vptr); free(vsc);
    free(pick); free(sel_s); free(top);
    free(us); free(acc);
    return rc;
}

/* One head; the head dimension of most models (Llama, Qwen, Mistral: 128) and their 4 query heads
 * per kv head (GQA) as constants, so that the row loops unroll and a widened row stays in
 * registers (the centroid pass 224 -> 175 kcycles a head with D, -4% of the search with R). */
MULTIVERSION
static int search_head(const search_args *a, Py_ssize_t h) {
    if (a->D == 128) return a->R == 4 ? search_body(a, h, 128, 4) : search_body(a, h, 128, a->R);
    return search_body(a, h, a->D, a->R);
}

static void search_rows(const matvec_job *j, Py_ssize_t h0, Py_ssize_t h1) {
    search_args *a = (search_args *)j->ctx;
    for (Py_ssize_t h = h0; h < h1; h++)
        if (search_head(a, h) != 0) __atomic_store_n(&a->failed, 1, __ATOMIC_SEQ_CST);
}

HIDDEN PyObject *cluster_search(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer q, ptrs, counts, out_pos, out_scanned, est_out, est_lse, budget;
    search_args a;
    int threads;
    memset(&a, 0, sizeof a);
    if (!PyArg_ParseTuple(args, "y*y*y*w*w*w*w*nnny*diiifffi", &q, &ptrs, &counts, &out_pos, &out_scanned, &est_out,
                          &est_lse, &a.R, &a.D, &a.k, &budget, &a.oversample, &a.formats, &a.two_level, &a.estimate,
                          &a.bound_weight, &a.group_scale, &a.est_scale, &threads))
        return NULL;
    PyObject *result = NULL;
    const Py_ssize_t H = counts.len / (Py_ssize_t)(N_COUNT * sizeof(int64_t));
    int bad = H <= 0 || a.R <= 0 || a.D <= 0 || a.k <= 0 || !(a.oversample >= 1.0) || a.formats < 0 || a.formats > 3 ||
              budget.len != H * 8 || ((uintptr_t)budget.buf & 7) ||
              counts.len != H * N_COUNT * 8 || ptrs.len != H * P_COUNT * 8 || q.len != H * a.R * a.D * 4 ||
              out_pos.len != H * a.R * a.k * 8 || out_scanned.len != H * 8 ||
              (a.estimate && (est_out.len != H * a.R * a.D * 4 || est_lse.len != H * a.R * 4)) ||
              ((uintptr_t)q.buf & 3) || ((uintptr_t)ptrs.buf & 7) || ((uintptr_t)counts.buf & 7) ||
              ((uintptr_t)out_pos.buf & 7) || ((uintptr_t)out_scanned.buf & 7) || ((uintptr_t)est_out.buf & 3) ||
              ((uintptr_t)est_lse.buf & 3);
    for (Py_ssize_t h = 0; !bad && h < H; h++) {
        const int64_t *c = (const int64_t *)counts.buf + h * N_COUNT, *p = (const int64_t *)ptrs.buf + h * P_COUNT;
        for (int i = 0; i < N_COUNT; i++) bad |= c[i] < 0 || c[i] > INT32_MAX;
        for (int i = 0; i < P_COUNT; i++) bad |= p[i] == 0;
        bad |= ((const int64_t *)budget.buf)[h] < a.k || ((const int64_t *)budget.buf)[h] > INT32_MAX;
    }
    if (bad) {
        PyErr_Format(PyExc_ValueError, "cluster_search: inconsistent arguments (%zd heads, R=%zd, D=%zd, k=%zd, "
                     "%zd budget bytes)", H, a.R, a.D, a.k, budget.len);
        goto done;
    }
    a.budget = (const int64_t *)budget.buf;
    a.q = (const float *)q.buf, a.ptrs = (const int64_t *)ptrs.buf, a.counts = (const int64_t *)counts.buf;
    a.out_pos = (int64_t *)out_pos.buf, a.out_scanned = (int64_t *)out_scanned.buf;
    a.est_out = (float *)est_out.buf, a.est_lse = (float *)est_lse.buf;
    matvec_job j = {search_rows, NULL, NULL, NULL, NULL, H, 0, 0,
                    pool_parts(threads), NULL, &a, 1};
    Py_BEGIN_ALLOW_THREADS
    pool_run(&j, 2);
    Py_END_ALLOW_THREADS
    if (a.failed) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&q);
    PyBuffer_Release(&ptrs);
    PyBuffer_Release(&counts);
    PyBuffer_Release(&out_pos);
    PyBuffer_Release(&out_scanned);
    PyBuffer_Release(&est_out);
    PyBuffer_Release(&est_lse);
    PyBuffer_Release(&budget);
    return result;
}

/* ------------------------------------------------------------------ retrieval_attend
 * The exact part of a retrieval decode step and the merge, for every query row of a layer in one
 * call: query row (h, g) attends the resident keys of kv head h (sinks + window, shared by the
 * group) and its own retrieved keys, and the estimate of the rest (one unit with log-weight lse_e and
 * value out_e) joins the same softmax. Equal to partial attention over each part merged by their
 * log-sum-exp (retrieval/merge.py), up to fp32 rounding. Scores are scale * q . k in fp32, keys and
 * values bf16 (widened exactly) or fp32. */
typedef struct {
    const float *q;            /* [H, G, D] */
    const void *const *rkp;    /* [H, S] addresses of the resident key rows (sinks + window) */
    const void *const *rvp;    /* [H, S] ... and of their value rows */
    const void *const *tkp;    /* [H, G, n] addresses of the retrieved key rows */
    const void *const *tvp;    /* [H, G, n] ... and of their value rows */
    const float *eo, *el;      /* [H, G, D], [H, G] or NULL */
    float *out;                /* [H, G, D] */
    Py_ssize_t H, G, S, n, D;
    int res_bf16, ret_bf16;
    float scale;
    int failed;
} attend_rows_args;

#define ATTEND_AHEAD 8 /* retrieved rows prefetched ahead (they are scattered over the host pool) */

MULTIVERSION
static int attend_head(const attend_rows_args *a, Py_ssize_t h) {
    const Py_ssize_t G = a->G, S = a->S, n = a->n, D = a->D, T = S + n;
    const size_t ret_bytes = (size_t)D * (a->ret_bf16 ? 2 : 4);
    const int wide = D % 16 == 0 && D <= 16 * ROW_VECS;  /* resident rows widened once for the G query rows */
    float *sc = malloc((size_t)(G * (T > 0 ? T : 1)) * sizeof *sc);  /* [G, S + n] scores, then weights */
    float *acc = calloc((size_t)(G * D), sizeof *acc);                /* [G, D] */
    const void *const *rrows = a->rvp + h * S;
    if (!sc || !acc) {
        free(sc);
        free(acc);
        return -1;
    }
    const float *qh = a->q + h * G * D;
    for (Py_ssize_t i = 0; i < ATTEND_AHEAD && i < n; i++) prefetch_bytes(a->tkp[h * G * n + i], ret_bytes);
    /* the resident keys' scores for every query row of the group, each key read once */
    for (Py_ssize_t i = 0; i < S; i++) {
        const void *kr = a->rkp[h * S + i];
        if (wide) {
            v16f v[ROW_VECS];
            load_row(kr, 0, D, a->res_bf16, v);
            dots_widened(qh, G, D, v, sc + i, T);
        } else {
            for (Py_ssize_t g = 0; g < G; g++) sc[g * T + i] = dot_any_row(qh + g * D, kr, D, a->res_bf16);
        }
    }
    float *inv = malloc((size_t)G * sizeof *inv), *lew = malloc((size_t)G * sizeof *lew);
    if (!inv || !lew) {
        free(sc); free(acc); free(inv); free(lew);
        return -1;
    }
    for (Py_ssize_t g = 0; g < G; g++) {
        const float *q = qh + g * D;
        const void *const *kp = a->tkp + (h * G + g) * n, *const *vp = a->tvp + (h * G + g) * n;
        float *sg = sc + g * T, mx = -INFINITY;
        for (Py_ssize_t i = 0; i < S; i++) {
            sg[i] *= a->scale;
            mx = sg[i] > mx ? sg[i] : mx;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            if (i + ATTEND_AHEAD < n) prefetch_bytes(kp[i + ATTEND_AHEAD], ret_bytes);
            else if (i + ATTEND_AHEAD - n < n) prefetch_bytes(vp[i + ATTEND_AHEAD - n], ret_bytes);  /* values next */
            sg[S + i] = a->scale * dot_any_row(q, kp[i], D, a->ret_bf16);
            mx = sg[S + i] > mx ? sg[S + i] : mx;
        }
        const float le = a->el ? a->el[h * G + g] : -INFINITY;
        mx = le > mx ? le : mx;
        float sum = 0.f;
        if (mx == -INFINITY) {  /* nothing to attend: a zero row */
            for (Py_ssize_t i = 0; i < T; i++) sg[i] = 0.f;
            inv[g] = 0.f, lew[g] = 0.f;
            continue;
        }
        for (Py_ssize_t i = 0; i < T; i++) {
            sg[i] = exp_le0(sg[i] - mx);
            sum += sg[i];
        }
        lew[g] = le != -INFINITY ? exp_le0(le - mx) : 0.f;
        sum += lew[g];
        inv[g] = 1.f / sum;
    }
    /* values: the resident rows for all query rows in register blocks, then each row's own */
    if (wide) {
        for (Py_ssize_t x0 = 0; x0 < S; x0 += UNIT_BLOCK)
            accumulate_units(acc, sc, T, G, D, rrows + x0, NULL, x0, S - x0 < UNIT_BLOCK ? S - x0 : UNIT_BLOCK, a->res_bf16);
    } else {
        for (Py_ssize_t i = 0; i < S; i++)
            for (Py_ssize_t g = 0; g < G; g++) axpy_any(acc + g * D, sc[g * T + i], rrows[i], 0, D, a->res_bf16);
    }
    for (Py_ssize_t g = 0; g < G; g++) {
        const void *const *kp = a->tkp + (h * G + g) * n, *const *vp = a->tvp + (h * G + g) * n;
        const float *sg = sc + g * T;
        float *ag = acc + g * D, *o = a->out + (h * G + g) * D;
        for (Py_ssize_t j = 0; j < n; j++) {
            if (j + ATTEND_AHEAD < n) prefetch_bytes(vp[j + ATTEND_AHEAD], ret_bytes);
            else if (g + 1 < G && j + ATTEND_AHEAD - n < n) prefetch_bytes(kp[n + j + ATTEND_AHEAD - n], ret_bytes);
            axpy_any(ag, sg[S + j], vp[j], 0, D, a->ret_bf16);
        }
        if (lew[g] != 0.f) axpy_any(ag, lew[g], a->eo, h * G + g, D, 0);
        for (Py_ssize_t i = 0; i < D; i++) o[i] = ag[i] * inv[g];
    }
    free(sc);
    free(acc);
    free(inv);
    free(lew);
    return 0;
}

static void attend_rows_job(const matvec_job *j, Py_ssize_t h0, Py_ssize_t h1) {
    attend_rows_args *a = (attend_rows_args *)j->ctx;
    for (Py_ssize_t h = h0; h < h1; h++)
        if (attend_head(a, h) != 0) __atomic_store_n(&a->failed, 1, __ATOMIC_SEQ_CST);
}

/* Runs the job over the heads (on the pool when there is enough work); 0, or -1 out of memory. */
static int run_attend(attend_rows_args *a, int threads) {
    matvec_job j = {attend_rows_job, NULL, NULL, NULL, NULL, a->H, 0, 0,
                    pool_parts(threads), NULL, a, 1};
    const int pooled = a->G * (a->S + a->n) * a->D * a->H >= (1 << 18);
    Py_BEGIN_ALLOW_THREADS
    if (pooled) pool_run(&j, 2);
    else attend_rows_job(&j, 0, a->H);
    Py_END_ALLOW_THREADS
    return a->failed ? -1 : 0;
}

/* Checks the query, resident K/V, estimate and output buffers against H, G, S, D (rows: H * G). */
static int attend_buffers_ok(const attend_rows_args *a, const Py_buffer *q, const Py_buffer *eo, const Py_buffer *el,
                             const Py_buffer *out) {
    const Py_ssize_t rows = a->H * a->G;
    const int est = eo->len > 0;
    return a->H > 0 && a->G > 0 && a->S >= 0 && a->n >= 0 && a->D > 0 && q->len == rows * a->D * 4 &&
           out->len == q->len && (!est || (eo->len == q->len && el->len == rows * 4)) && (est || el->len == 0) &&
           !((uintptr_t)q->buf & 3) && !((uintptr_t)out->buf & 3) && !((uintptr_t)eo->buf & 3) &&
           !((uintptr_t)el->buf & 3);
}

/* The resident rows' addresses [H * S] (keys, then values) from the segments table [nseg, 4]
 * int64: (key address, value address, rows, head stride in elements), rows of D contiguous values,
 * the segments in order (sinks, then the window); NULL (and an exception) when the table is bad. */
static const void **resident_rows(const Py_buffer *seg, Py_ssize_t H, Py_ssize_t S, Py_ssize_t D, int bf16) {
    const Py_ssize_t nseg = seg->len / 32, es = bf16 ? 2 : 4;
    const int64_t *t = (const int64_t *)seg->buf;
    Py_ssize_t total = 0;
    int bad = seg->len % 32 != 0 || ((uintptr_t)seg->buf & 7);
    for (Py_ssize_t j = 0; !bad && j < nseg; j++) {
        bad |= t[4 * j + 2] < 0 || (t[4 * j + 2] > 0 && (t[4 * j] == 0 || t[4 * j + 1] == 0 || t[4 * j + 3] < t[4 * j + 2] * D ||
               (t[4 * j] & (es - 1)) || (t[4 * j + 1] & (es - 1))));
        total += t[4 * j + 2];
    }
    if (bad || total != S) {
        PyErr_Format(PyExc_ValueError, "retrieval attention: the resident segments do not make %zd rows of %zd values", S, D);
        return NULL;
    }
    const void **p = malloc((size_t)(2 * (H * S > 0 ? H * S : 1)) * sizeof *p);
    if (!p) {
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t h = 0; h < H; h++) {
        Py_ssize_t i = 0;
        for (Py_ssize_t j = 0; j < nseg; j++)
            for (int64_t r = 0; r < t[4 * j + 2]; r++, i++) {
                const size_t off = (size_t)(h * t[4 * j + 3] + r * D) * (size_t)es;
                p[h * S + i] = (const char *)(uintptr_t)t[4 * j] + off;
                p[H * S + h * S + i] = (const char *)(uintptr_t)t[4 * j + 1] + off;
            }
    }
    return p;
}

HIDDEN PyObject *retrieval_attend(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer q, rk, rv, tk, tv, eo, el, out;
    attend_rows_args a;
    int threads;
    memset(&a, 0, sizeof a);
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*y*w*nnnnniifi", &q, &rk, &rv, &tk, &tv, &eo, &el, &out, &a.H, &a.G,
                          &a.S, &a.n, &a.D, &a.res_bf16, &a.ret_bf16, &a.scale, &threads))
        return NULL;
    a.res_bf16 = a.res_bf16 != 0, a.ret_bf16 = a.ret_bf16 != 0; /* flags: any true value is bf16 (not K_I8) */
    PyObject *result = NULL;
    const void **ptrs = NULL, **rptrs = NULL;
    const Py_ssize_t ts = a.ret_bf16 ? 2 : 4, rs = a.res_bf16 ? 2 : 4, rows = a.H * a.G;
    if (!attend_buffers_ok(&a, &q, &eo, &el, &out) || rk.len != a.H * a.S * a.D * rs || rv.len != rk.len ||
        ((uintptr_t)rk.buf & (rs - 1)) || ((uintptr_t)rv.buf & (rs - 1)) || tk.len != rows * a.n * a.D * ts ||
        tv.len != tk.len || ((uintptr_t)tk.buf & 1) || ((uintptr_t)tv.buf & 1) ||
        (!a.ret_bf16 && (((uintptr_t)tk.buf & 3) || ((uintptr_t)tv.buf & 3)))) {
        PyErr_Format(PyExc_ValueError, "retrieval_attend: buffers do not match H=%zd, G=%zd, S=%zd, n=%zd, D=%zd",
                     a.H, a.G, a.S, a.n, a.D);
        goto done;
    }
    const Py_ssize_t nrows = rows * a.n, nres = a.H * a.S;
    ptrs = malloc((size_t)(2 * (nrows > 0 ? nrows : 1)) * sizeof *ptrs);
    rptrs = malloc((size_t)(2 * (nres > 0 ? nres : 1)) * sizeof *rptrs);
    if (!ptrs || !rptrs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nres; i++) {
        rptrs[i] = (const char *)rk.buf + i * a.D * rs;
        rptrs[nres + i] = (const char *)rv.buf + i * a.D * rs;
    }
    for (Py_ssize_t i = 0; i < nrows; i++) {
        ptrs[i] = (const char *)tk.buf + i * a.D * ts;
        ptrs[nrows + i] = (const char *)tv.buf + i * a.D * ts;
    }
    a.q = (const float *)q.buf, a.rkp = rptrs, a.rvp = rptrs + nres, a.tkp = ptrs, a.tvp = ptrs + nrows;
    a.eo = eo.len ? (const float *)eo.buf : NULL, a.el = eo.len ? (const float *)el.buf : NULL;
    a.out = (float *)out.buf;
    if (run_attend(&a, threads)) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_None;
    Py_INCREF(result);
done:
    free(ptrs);
    free(rptrs);
    PyBuffer_Release(&q);
    PyBuffer_Release(&rk);
    PyBuffer_Release(&rv);
    PyBuffer_Release(&tk);
    PyBuffer_Release(&tv);
    PyBuffer_Release(&eo);
    PyBuffer_Release(&el);
    PyBuffer_Release(&out);
    return result;
}

/* retrieval_attend with the resident rows given as segments (sinks, window spans: no concatenated
 * copy; see resident_rows) and the retrieved rows read in place from a host KV pool (no gathered copy):
 * records [slots, 2, kvh, block, D] (raw K/V), table [blocks] block -> slot (-1: not in memory),
 * positions [H, G, n] int64 of kv head h = the row's head. Writes each row's slot into slots_out
 * [H, G, n] (the caller marks them used). Returns 1 without computing anything when a position's
 * block is not in memory (or out of range): the caller then gathers through the general path. */
HIDDEN PyObject *retrieval_attend_pool(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer q, seg, rec, table, pos, slots, eo, el, out;
    attend_rows_args a;
    Py_ssize_t block, kvh;
    int threads;
    memset(&a, 0, sizeof a);
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*w*y*y*w*nnnnnnniifi", &q, &seg, &rec, &table, &pos, &slots, &eo,
                          &el, &out, &a.H, &a.G, &a.S, &a.n, &a.D, &block, &kvh, &a.res_bf16, &a.ret_bf16, &a.scale,
                          &threads))
        return NULL;
    a.res_bf16 = a.res_bf16 != 0, a.ret_bf16 = a.ret_bf16 != 0; /* flags: any true value is bf16 (not K_I8) */
    PyObject *result = NULL;
    const void **ptrs = NULL, **rptrs = NULL;
    const Py_ssize_t ts = a.ret_bf16 ? 2 : 4, rows = a.H * a.G, nrows = rows * a.n;
    const Py_ssize_t row_bytes = a.D * ts, rec_bytes = 2 * kvh * block * row_bytes;
    if (!attend_buffers_ok(&a, &q, &eo, &el, &out) || block <= 0 || kvh < a.H || rec_bytes <= 0 ||
        rec.len % rec_bytes || pos.len != nrows * 8 || slots.len != nrows * 8 || table.len % 8 ||
        ((uintptr_t)rec.buf & (a.ret_bf16 ? 1 : 3)) || ((uintptr_t)pos.buf & 7) || ((uintptr_t)slots.buf & 7) ||
        ((uintptr_t)table.buf & 7)) {
        PyErr_Format(PyExc_ValueError, "retrieval_attend_pool: buffers do not match H=%zd, G=%zd, S=%zd, n=%zd, "
                     "D=%zd, blocks of %zd, %zd kv heads", a.H, a.G, a.S, a.n, a.D, block, kvh);
        goto done;
    }
    rptrs = resident_rows(&seg, a.H, a.S, a.D, a.res_bf16);
    if (!rptrs) goto done;
    ptrs = malloc((size_t)(2 * (nrows > 0 ? nrows : 1)) * sizeof *ptrs);
    if (!ptrs) {
        PyErr_NoMemory();
        goto done;
    }
    const int64_t *tb = (const int64_t *)table.buf, *ps = (const int64_t *)pos.buf;
    const Py_ssize_t nblocks = table.len / 8, nslots = rec.len / rec_bytes;
    int64_t *so = (int64_t *)slots.buf;
    const char *base = (const char *)rec.buf;
    int miss = 0;
    for (Py_ssize_t i = 0; i < nrows && !miss; i++) {
        int64_t slot;
        const int64_t key = kv_pool_key_row(tb, nblocks, nslots, block, kvh, i / (a.G * a.n), ps[i], &slot);
        if (key < 0) {
            miss = 1;
            break;
        }
        ptrs[i] = base + key * row_bytes;
        ptrs[nrows + i] = base + (key + kvh * block) * row_bytes;
        so[i] = slot;
    }
    if (!miss) {
        a.q = (const float *)q.buf, a.rkp = rptrs, a.rvp = rptrs + a.H * a.S, a.tkp = ptrs, a.tvp = ptrs + nrows;
        a.eo = eo.len ? (const float *)eo.buf : NULL, a.el = eo.len ? (const float *)el.buf : NULL;
        a.out = (float *)out.buf;
        if (run_attend(&a, threads)) {
            PyErr_NoMemory();
            goto done;
        }
    }
    result = PyLong_FromLong(miss);
done:
    free(ptrs);
    free(rptrs);
    PyBuffer_Release(&q);
    PyBuffer_Release(&seg);
    PyBuffer_Release(&rec);
    PyBuffer_Release(&table);
    PyBuffer_Release(&pos);
    PyBuffer_Release(&slots);
    PyBuffer_Release(&eo);
    PyBuffer_Release(&el);
    PyBuffer_Release(&out);
    return result;
}
