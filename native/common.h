/* What the translation units of flashtier._native share: the vector helpers, fp32 exp for softmax
 * weights and the persistent thread pool's job type (the pool itself lives in _native.c).
 *
 * Vector code is written with GCC's generic 16-lane vectors; a function marked MULTIVERSION is
 * compiled for AVX-512, AVX2+FMA and baseline x86-64 and picked at load time (target_clones);
 * helpers it calls are ALWAYS_INLINE so they are compiled for each target with it.
 */
#ifndef FLASHTIER_NATIVE_COMMON_H
#define FLASHTIER_NATIVE_COMMON_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <float.h>

/* FLASHTIER_SINGLE_TARGET (a test build, tests/runtime/test_native_targets.py): one target, the one
 * -march names, and no runtime AVX-512 branch, so that the AVX2 and baseline code paths can run
 * (and be checked) on a machine whose CPU would pick the AVX-512 clones. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(FLASHTIER_SINGLE_TARGET)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

#define ALWAYS_INLINE inline __attribute__((always_inline))
/* One compiled copy for every caller: a function that both the separate one-token calls and the
 * fused layer steps run must give them the same bits, and with -fassociative-math an inlined copy
 * may be vectorised (its sums reassociated) differently from another (found on the single-target
 * builds, where target_clones no longer keeps these out of line). */
#define SHARED_NOINLINE __attribute__((noinline))
#define HIDDEN __attribute__((visibility("hidden")))

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Generic 16-lane vectors: GCC lowers them to one zmm (x86-64-v4), two ymm (v3) or four xmm. */
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v32h __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));

/* 16 bf16 values widened exactly: each one the high half of its fp32 lane. Where the CPU has
 * AVX-512 (the x86-64-v4 clones run there) one two-source word permute interleaves them with zero
 * halves; GCC compiles __builtin_convertvector to 32-bit lanes (then a shift) into two 8-lane
 * widenings, an extract and an insert there (six instructions), but into the best code for AVX2 and
 * SSE, where the permute would be scalar. The test is one load of libgcc's CPU flags, hoisted out of
 * the loops or a predicted branch. Both give the same bits. */
static ALWAYS_INLINE v16f load_bf16x16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16f f;
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    (!defined(FLASHTIER_SINGLE_TARGET) || defined(__AVX512BW__))
    if (__builtin_cpu_supports("avx512bw")) {
        const v16h z = {0};
        const v32h u = __builtin_shufflevector(z, h, 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23, 8, 24, 9,
                                               25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        memcpy(&f, &u, sizeof f);
        return f;
    }
#endif
    const v16u u = __builtin_convertvector(h, v16u) << 16;
    memcpy(&f, &u, sizeof f);
    return f;
}

static ALWAYS_INLINE v16f load_f32x16(const float *p) {
    v16f f;
    memcpy(&f, p, sizeof f);
    return f;
}

static ALWAYS_INLINE float hsum16(v16f v) {
    float t = 0.f;
    for (int l = 0; l < 16; l++) t += v[l];
    return t;
}

/* Sum of the 16 lanes by halves (4 dependent adds instead of 15), in one fixed order written out
 * with shuffles, so that every kernel instance sums the same way (batch invariance). */
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
static ALWAYS_INLINE float hsum16_tree(v16f v) {
    v8f h = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    v4f f = __builtin_shufflevector(h, h, 0, 1, 2, 3) + __builtin_shufflevector(h, h, 4, 5, 6, 7);
    return (f[0] + f[2]) + (f[1] + f[3]);
}

/* exp(x) for any x, branch-free so that loops over it vectorise: x = n ln2 + r, |r| <= ln2 / 2,
 * exp(r) by a degree-6 polynomial (relative error ~2e-7, about one fp32 ulp), times 2^n built in
 * the exponent bits. x > 88.72 gives +inf; x < -87 gives exp(-87) ~ 1.6e-38 (a softmax weight that
 * small is below the fp32 resolution of the sum, which holds a 1; in silu and gelu the term
 * vanishes beside the 1 it is added to); NaN stays NaN. */
static ALWAYS_INLINE float exp_f32(float x) {
    float xc = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    float n = rintf(xc * 1.44269504088896341f);
    float r = xc - n * 0.693145751953125f;   /* ln2 in two parts: exact product with the high part */
    r = r - n * 1.42860682030941723212e-6f;
    float p = 1.f / 720.f;
    p = p * r + 1.f / 120.f;
    p = p * r + 1.f / 24.f;
    p = p * r + 1.f / 6.f;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t e = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &e, 4);
    float y = p * scale;
    y = x > 88.72f ? INFINITY : y;
    return x != x ? x : y;
}

/* exp(x) for x <= 0: softmax weights after subtracting the maximum (exp_f32's bits). */
static ALWAYS_INLINE float exp_le0(float x) { return exp_f32(x); }

#define MAX_THREADS 64

/* One threaded job: `fn` computes rows [r0, r1) of it (a matrix-vector product, a dequantization,
 * or whatever `ctx` describes); the pool splits the rows into `parts` ranges. */
typedef struct matvec_job matvec_job;
typedef void (*rows_fn)(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1);
struct matvec_job {
    rows_fn fn;
    const void *w;        /* rows * row_bytes bytes */
    const float *x;       /* [cols] (products) */
    float *out;           /* [rows] (products) or [rows, cols] (dequantization) */
    const float *aux;     /* Q4_K / Q5_K products: per 256-block [0 x 8, sum(x) of its 8 sub-blocks] */
    Py_ssize_t rows, cols, row_bytes;
    int parts;
    const struct q8x *qx; /* int8-activation products (act = 1): the quantized x, see q8x */
    const void *ctx;      /* other jobs' own arguments (decode attention, cluster search) */
    Py_ssize_t unit;      /* rows per claim when > 0 (default: whole 16-row groups, ~8 per thread) */
};

/* The pool parts for a caller's thread count: at least 1, at most MAX_THREADS. */
static inline int pool_parts(int threads) { return threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads); }

/* Runs `job` on the persistent pool (alone on the caller below `min_rows` rows or with one part);
 * call with the GIL released. One job runs at a time. */
HIDDEN void pool_run(const matvec_job *job, Py_ssize_t min_rows);

/* A host KV pool's records are slots of [2, kv_heads, block, D] rows (keys, then values); `table`
 * maps a layer's block to its slot (< 0: not in memory). The row index of kv head h's key at
 * position p (its value row is kv_heads * block further), with its slot in *slot_out; -1 when the
 * position's block is out of the table or not in memory. */
static inline int64_t kv_pool_key_row(const int64_t *table, int64_t nblocks, int64_t nslots, int64_t block,
                                      int64_t kv_heads, int64_t h, int64_t p, int64_t *slot_out) {
    const int64_t b = p >= 0 ? p / block : -1;
    const int64_t slot = b >= 0 && b < nblocks ? table[b] : -1;
    if (slot < 0 || slot >= nslots) return -1;
    *slot_out = slot;
    return ((slot * 2) * kv_heads + h) * block + (p - b * block);
}

/* cluster_search.c */
HIDDEN PyObject *cluster_search(PyObject *self, PyObject *args);
HIDDEN PyObject *retrieval_attend(PyObject *self, PyObject *args);
HIDDEN PyObject *retrieval_attend_pool(PyObject *self, PyObject *args);

/* sparse_ffn.c */
HIDDEN PyObject *sparse_ffn_rows(PyObject *self, PyObject *args);

#endif
