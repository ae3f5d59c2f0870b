/* flashtier._native: small CPU loops that Python and torch do slowly, built at install time.
 *
 * interleave16(low, high, out): out[2i] = low[i], out[2i+1] = high[i] for i < len(low);
 *   rebuilds little-endian 16-bit values (bf16/fp16 weights) from their byte planes
 *   (storage_backends/weight_codec.py). Runs with the GIL released.
 *
 * bf16_matvec(w, x, out, rows, cols, threads): out[r] = sum_k bf16(w[r, k]) * x[k] in fp32, for a
 *   row-major bf16 weight (raw 16-bit bits), fp32 x and fp32 out; single-token decode
 *   (runtime/kernels.py). Each bf16 is widened to fp32 exactly (a 16-bit shift); products are
 *   accumulated in fp32, 16 lanes over the row's 16-weight chunks in order, then a fixed lane sum.
 *   bf16_matvec_rows(w, x, out, rows, cols, batch, threads): the same for several x rows in one
 *   pass over the weight (batched decode), each row bit-identical to bf16_matvec. Rows are split over a persistent pool of worker
 *   threads plus the caller (chunks of rows claimed from a shared counter; workers spin briefly
 *   between products, then sleep); the GIL is released. Compiled for AVX-512, AVX2+FMA and baseline
 *   x86-64, chosen at load time (GCC target_clones).
 *
 * q_matvec(qtype, w, x, out, rows, cols, threads[, act]) / q_dequantize(qtype, w, out, rows, cols, threads):
 *   (q_matvec_many(x, cols, threads, act, specs): several products of one x as one pool job)
 *   the same product (and plain dequantization) straight from GGUF / ggml blocks of type qtype
 *   (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K) on the same pool; see the section below and
 *   runtime/quant_kernels.py. act=1: the opt-in int8-activation approximation (x quantized per 32
 *   values, integer dot products; "int8 activations" below). q_isa() / q_set_isa(level) report /
 *   lower the kernel level; q_vnni() says whether act=1 runs the AVX-512 VNNI kernels.
 *
 * cluster_search(...): the cluster-index search of every kv head of a layer in one call
 *   (native/cluster_search.c; retrieval/cluster_batch.py).
 *
 * sparse_ffn_rows(...): the sparse FFN of one-token rows over neuron rows of the window and a
 *   buffer, batch- and history-invariant (native/sparse_ffn.c; runtime/weights/sparse_ffn.py).
 *
 * The module is optional: when it is not built, callers fall back to torch / numba.
 */
#include "common.h"

static void interleave16_impl(const uint8_t *restrict lo, const uint8_t *restrict hi,
                              uint8_t *restrict out, Py_ssize_t n) {
    uint16_t *restrict o = (uint16_t *)out;  /* out is at least 2-byte aligned (checked) */
    for (Py_ssize_t i = 0; i < n; i++) {
        o[i] = (uint16_t)lo[i] | ((uint16_t)hi[i] << 8);
    }
}

static void interleave16_unaligned(const uint8_t *lo, const uint8_t *hi, uint8_t *out, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++) {
        out[2 * i] = lo[i];
        out[2 * i + 1] = hi[i];
    }
}

static PyObject *interleave16(PyObject *self, PyObject *args) {
    Py_buffer lo, hi, out;
    if (!PyArg_ParseTuple(args, "y*y*w*", &lo, &hi, &out)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (lo.len != hi.len || out.len != 2 * lo.len) {
        PyErr_Format(PyExc_ValueError,
                     "interleave16: planes of %zd and %zd bytes cannot fill %zd output bytes "
                     "(need two equal planes and twice their size)", lo.len, hi.len, out.len);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    if (((uintptr_t)out.buf & 1) == 0) {
        interleave16_impl((const uint8_t *)lo.buf, (const uint8_t *)hi.buf, (uint8_t *)out.buf, lo.len);
    } else {
        interleave16_unaligned((const uint8_t *)lo.buf, (const uint8_t *)hi.buf, (uint8_t *)out.buf, lo.len);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&lo);
    PyBuffer_Release(&hi);
    PyBuffer_Release(&out);
    return result;
}

/* ---------------------------------------------------------------- bf16 matrix-vector product */

/* 1 when the CPU has 32 vector registers of 16 floats (AVX-512: the wider bf16 tiles), else 0. */
static int bf16_wide(void) {
    static int wide = -1;
    int w = __atomic_load_n(&wide, __ATOMIC_RELAXED);
    if (w < 0) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && \
    (!defined(FLASHTIER_SINGLE_TARGET) || defined(__AVX512F__))
        __builtin_cpu_init();
        w = __builtin_cpu_supports("avx512f") != 0;
#else
        w = 0;
#endif
        __atomic_store_n(&wide, w, __ATOMIC_RELAXED);
    }
    return w;
}

#pragma GCC push_options
#pragma GCC optimize("no-associative-math")
/* RB bf16 weight rows (k weights each, consecutive) against NB activation rows (ldx floats apart);
 * out[b * ldo + r]. Every (weight row, activation row) pair has one 16-lane accumulator that takes
 * the 16-weight chunks in order, then the fixed lane sum, then the scalar tail: the same arithmetic
 * in every instance, so a row's product does not depend on RB, NB or which other rows share the tile
 * (batch invariance; tests/runtime/test_kernels.py compares every bit). RB x NB independent chains
 * hide the FMA latency; each widened weight chunk serves NB rows and each activation chunk RB rows
 * from registers. RB and NB are constants in each instance (accumulators stay in registers). */
static ALWAYS_INLINE void bf16_tile(const uint16_t *restrict w, Py_ssize_t k, const float *restrict x, Py_ssize_t ldx,
                                    float *restrict out, Py_ssize_t ldo, const int RB, const int NB) {
    v16f a[4][4]; /* fixed sizes (not RB x NB: a variable-length array would live in memory) */
    for (int r = 0; r < RB; r++)
        for (int b = 0; b < NB; b++) a[r][b] = (v16f){0};
    Py_ssize_t i = 0;
    for (; i + 16 <= k; i += 16) {
        v16f xv[4];
        for (int b = 0; b < NB; b++) xv[b] = load_f32x16(x + b * ldx + i);
        for (int r = 0; r < RB; r++) {
            v16f wv = load_bf16x16(w + r * k + i);
            for (int b = 0; b < NB; b++) a[r][b] += wv * xv[b];
        }
    }
    for (int r = 0; r < RB; r++)
        for (int b = 0; b < NB; b++) {
            float acc = hsum16_tree(a[r][b]);
            for (Py_ssize_t t = i; t < k; t++) acc += bf16_to_f32(w[r * k + t]) * x[b * ldx + t];
            out[b * ldo + r] = acc;
        }
}

/* The tiles of one block of weight rows against activation rows b0.. (at most four of them). */
#define BF16_TILES(RB) \
    switch (nb) { \
        case 1: bf16_tile(wr, k, xb, k, ob, ldo, RB, 1); break; \
        case 2: bf16_tile(wr, k, xb, k, ob, ldo, RB, 2); break; \
        case 3: bf16_tile(wr, k, xb, k, ob, ldo, RB, 3); break; \
        default: bf16_tile(wr, k, xb, k, ob, ldo, RB, 4); break; \
    }

/* out[b, r] = sum_k bf16(w[r, k]) * x[b, k] for weight rows r0..r1 and `batch` activation rows
 * (out rows ldo apart). Blocks of `rb` weight rows (4, or 2 on CPUs with 16 vector registers)
 * against tiles of up to `tb` activation rows; the block stays in L1/L2 for the later tiles, so the
 * weight is read from memory once for the whole batch. Rows left over run one at a time. With one
 * activation row (decode) every weight row runs alone, as one sequential stream: blocks of 8 rows
 * (8 interleaved streams k weights apart, one 4 KiB page each at k = 2048) streamed 13.9-15.3 GB/s
 * on one thread of this VM where one row at a time streams 24.4-25.5 (session 14, bench_matvec); the
 * arithmetic of a row is the same whatever the block, so outputs do not change. */
MULTIVERSION
static void matvec_rows(const uint16_t *restrict w, const float *restrict x, float *restrict out,
                        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k, Py_ssize_t batch, Py_ssize_t ldo, int wide) {
    int tb = wide ? 4 : 2;
    int rb = batch == 1 ? 1 : wide ? 4 : 2;
    Py_ssize_t r = r0;
    for (; r < r1; r += rb) {
        if (r + rb > r1) rb = 1;  /* the rows left over, one at a time */
        const uint16_t *wr = w + r * k;
        for (Py_ssize_t b0 = 0; b0 < batch; b0 += tb) {
            const float *xb = x + b0 * k;
            float *ob = out + b0 * ldo + r;
            int nb = batch - b0 < tb ? (int)(batch - b0) : tb;
            if (rb == 4) {
                BF16_TILES(4)
            } else if (rb == 2) {
                BF16_TILES(2)
            } else {
                BF16_TILES(1)
            }
        }
    }
}
#undef BF16_TILES

#pragma GCC pop_options

static void bf16_rows(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    matvec_rows((const uint16_t *)j->w, j->x, j->out, r0, r1, j->cols, 1, j->rows, bf16_wide());
}

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;   /* sleeping workers wait on it */
static pthread_cond_t pool_start = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;   /* one product at a time */
static int pool_workers = 0;
static long pool_generation = 0;  /* bumped (seq_cst) to start a job */
static uint64_t pool_claim = 0;   /* (generation << 32) | first unclaimed row of the current job */
static Py_ssize_t pool_done = 0;  /* rows of the current job finished */
static int pool_sleepers = 0;     /* workers blocked on pool_start */
static matvec_job pool_job;

/* Workers spin this many pause instructions (~0.1-0.3 ms) for the next job before sleeping:
 * decode issues products back to back, and waking a sleeping thread costs ~50 us on a VM. */
#define SPIN_ITERS 4000

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Rows are claimed in chunks (whole 16-row groups: whole cache lines of output) from a shared
 * counter tagged with the job's generation, by the caller and the workers alike: a thread that is
 * descheduled (other processes on the cores) or still waking up just claims fewer chunks, instead
 * of holding up the product with a fixed share. A chunk is a quarter of each thread's share of the
 * rows still unclaimed (guided), so the chunks shrink towards the end and the threads finish
 * together (fixed chunks of 1/8 of a share left one thread idle for half a chunk on average, ~1.5%
 * of a decode product). Each row is computed the same way whoever computes it, so results do not
 * depend on the split. */
static void work_on(const matvec_job *j, uint32_t gen) {
    for (;;) {
        uint64_t c = __atomic_load_n(&pool_claim, __ATOMIC_SEQ_CST);
        if ((uint32_t)(c >> 32) != gen) return;  /* a later job: this one is fully claimed */
        Py_ssize_t r0 = (Py_ssize_t)(uint32_t)c;
        if (r0 >= j->rows) return;
        Py_ssize_t chunk = (j->rows - r0) / (4 * (Py_ssize_t)j->parts);
        chunk = j->unit > 0 ? j->unit : chunk < 16 ? 16 : (chunk + 15) & ~(Py_ssize_t)15;
        Py_ssize_t r1 = r0 + chunk < j->rows ? r0 + chunk : j->rows;
        if (!__atomic_compare_exchange_n(&pool_claim, &c, ((uint64_t)gen << 32) | (uint64_t)r1, 0, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST))
            continue;
        j->fn(j, r0, r1);
        __atomic_add_fetch(&pool_done, r1 - r0, __ATOMIC_SEQ_CST);
    }
}

typedef struct {
    int id;         /* 1..pool_workers; the caller is part 0 */
    long start_gen; /* the generation when it was created: the next job is its first */
} worker_arg;

static void *worker_main(void *arg_in) {
    worker_arg arg = *(worker_arg *)arg_in;
    free(arg_in);
    int id = arg.id;
    long seen = arg.start_gen;
    for (;;) {
        int spins = 0;
        while (__atomic_load_n(&pool_generation, __ATOMIC_SEQ_CST) == seen) {
            if (++spins < SPIN_ITERS) {
                cpu_relax();
                continue;
            }
            pthread_mutex_lock(&pool_mu);
            __atomic_add_fetch(&pool_sleepers, 1, __ATOMIC_SEQ_CST);
            while (__atomic_load_n(&pool_generation, __ATOMIC_SEQ_CST) == seen) pthread_cond_wait(&pool_start, &pool_mu);
            __atomic_sub_fetch(&pool_sleepers, 1, __ATOMIC_SEQ_CST);
            pthread_mutex_unlock(&pool_mu);
        }
        seen = __atomic_load_n(&pool_generation, __ATOMIC_SEQ_CST);
        matvec_job j = pool_job; /* published before the generation bump */
        /* A copy torn by the next job's publication is harmless: its claims carry the old
         * generation, which the claim counter no longer has (or it is fully claimed). */
        if (__atomic_load_n(&pool_generation, __ATOMIC_SEQ_CST) != seen) continue;
        if (id < j.parts) work_on(&j, (uint32_t)seen);
    }
    return NULL;
}

/* Grows the pool to `want` workers (never shrinks); returns how many exist. Under call_mu. */
static int ensure_workers(int want) {
    if (want > MAX_THREADS - 1) want = MAX_THREADS - 1;
    while (pool_workers < want) {
        pthread_t t;
        pthread_attr_t attr;
        worker_arg *arg = malloc(sizeof *arg);
        if (arg == NULL) break;
        arg->id = pool_workers + 1;
        arg->start_gen = __atomic_load_n(&pool_generation, __ATOMIC_SEQ_CST);
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        int rc = pthread_create(&t, &attr, worker_main, arg);
        pthread_attr_destroy(&attr);
        if (rc != 0) {
            free(arg);
            break;
        }
        pool_workers++;
    }
    return pool_workers;
}

/* Runs `job_in` on the pool (alone on the caller below `min_rows` rows or with one part). */
HIDDEN void pool_run(const matvec_job *job_in, Py_ssize_t min_rows) {
    matvec_job j = *job_in;
    if (j.parts <= 1 || j.rows < min_rows || j.rows > INT32_MAX) {
        j.fn(&j, 0, j.rows);
        return;
    }
    pthread_mutex_lock(&call_mu);
    int workers = ensure_workers(j.parts - 1);
    if (j.parts > workers + 1) j.parts = workers + 1;
    pool_job = j;
    uint32_t gen = (uint32_t)(__atomic_load_n(&pool_generation, __ATOMIC_SEQ_CST) + 1);
    __atomic_store_n(&pool_done, 0, __ATOMIC_SEQ_CST);
    __atomic_store_n(&pool_claim, (uint64_t)gen << 32, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&pool_generation, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool_sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool_mu);
        pthread_cond_broadcast(&pool_start);
        pthread_mutex_unlock(&pool_mu);
    }
    work_on(&j, gen);
    while (__atomic_load_n(&pool_done, __ATOMIC_SEQ_CST) < j.rows) cpu_relax();
    pthread_mutex_unlock(&call_mu);
}

static void matvec(const matvec_job *job_in) { pool_run(job_in, 64); }

/* Several activation rows against one weight (batched decode): matvec_rows over the whole batch,
 * the weight read from memory once. ctx: the number of activation rows. */
typedef struct { Py_ssize_t batch; } rows_ctx;

static void bf16_rows_multi(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    const rows_ctx *c = (const rows_ctx *)j->ctx;
    matvec_rows((const uint16_t *)j->w, j->x, j->out, r0, r1, j->cols, c->batch, j->rows, bf16_wide());
}

/* bf16_matvec (batched = 0: x [cols], out [rows]) and bf16_matvec_rows (batched = 1: x [batch, cols],
 * out [batch, rows]): one argument check, one job. */
static PyObject *bf16_product(PyObject *args, int batched) {
    const char *name = batched ? "bf16_matvec_rows" : "bf16_matvec";
    Py_buffer w, x, out;
    Py_ssize_t rows, cols, batch = 1;
    int threads;
    if (batched ? !PyArg_ParseTuple(args, "y*y*w*nnni", &w, &x, &out, &rows, &cols, &batch, &threads)
                : !PyArg_ParseTuple(args, "y*y*w*nni", &w, &x, &out, &rows, &cols, &threads)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (rows < 0 || cols < 0 || batch < 1 || w.len != rows * cols * 2 || x.len != batch * cols * 4
        || out.len != batch * rows * 4) {
        PyErr_Format(PyExc_ValueError,
                     "%s: buffers of %zd, %zd and %zd bytes do not match a [%zd, %zd] bf16 weight, "
                     "an fp32 [%zd, %zd] input and an fp32 [%zd, %zd] output", name, w.len, x.len, out.len, rows,
                     cols, batch, cols, batch, rows);
        goto done;
    }
    if (((uintptr_t)w.buf & 1) || ((uintptr_t)x.buf & 3) || ((uintptr_t)out.buf & 3)) {
        PyErr_Format(PyExc_ValueError, "%s: buffers must be aligned to their element size", name);
        goto done;
    }
    rows_ctx c = {batch};
    matvec_job j = {batched ? bf16_rows_multi : bf16_rows, w.buf, (const float *)x.buf, (float *)out.buf, NULL,
                    rows, cols, cols * 2, pool_parts(threads), NULL,
                    batched ? &c : NULL, 0};
    Py_BEGIN_ALLOW_THREADS
    matvec(&j);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&w);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *bf16_matvec_rows(PyObject *self, PyObject *args) { return bf16_product(args, 1); }

static PyObject *bf16_matvec(PyObject *self, PyObject *args) { return bf16_product(args, 0); }

/* ------------------------------------------------- GGUF-quantized matrix-vector product / dequant
 *
 * q_matvec(qtype, w, x, out, rows, cols, threads[, act=0]): out[r] = sum_k W[r, k] * x[k], W the ggml
 *   blocks of type `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K), rows * row_bytes bytes,
 *   fp32 x [cols] and out [rows]. The weights are dequantized in registers exactly as ggml's
 *   dequantize_row_* (and gguf-py's numpy code) computes them, in fp32; products are accumulated
 *   in fp32 (activations are never quantized). Results differ from an exact product only by fp32
 *   rounding of the sum. act=1 (quantized types) is the int8-activation approximation instead.
 * q_dequantize(qtype, w, out, rows, cols, threads): out [rows, cols] fp32 = the dequantized
 *   weights, bit-identical to gguf.quants.dequantize.
 *
 * Code paths: hand-written AVX-512 (x86-64-v4) kernels; otherwise a portable per-block dequantize +
 * dot, compiled twice (x86-64-v3: AVX2/FMA auto-vectorised, and baseline), chosen at load time from
 * the CPU (q_isa() says which; q_set_isa() lowers it, for tests). Dequantization outside the
 * AVX-512 path uses the baseline build (no FMA contraction, so bit-exact).
 */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define Q_X86 1
#include <immintrin.h>
#else
#define Q_X86 0
#endif

/* How the x86 quantized kernels prefetch weights (PF_LINES below; q_prefetch() reads or sets it, on
 * every build: elsewhere it changes nothing). 1: T1 hint 4 KiB ahead, 0: NTA 2 KiB ahead. */
static int q_pf_l2 = 0;

enum { GT_F32 = 0, GT_F16 = 1, GT_Q4_0 = 2, GT_Q8_0 = 8, GT_Q4_K = 12, GT_Q5_K = 13, GT_Q6_K = 14, GT_BF16 = 30 };

typedef struct {
    int type, block, bytes;
    const char *name;
} qtype_info;

static const qtype_info QTYPES[] = {
    {GT_F32, 1, 4, "F32"},      {GT_F16, 1, 2, "F16"},     {GT_BF16, 1, 2, "BF16"},
    {GT_Q8_0, 32, 34, "Q8_0"},  {GT_Q4_0, 32, 18, "Q4_0"}, {GT_Q4_K, 256, 144, "Q4_K"},
    {GT_Q5_K, 256, 176, "Q5_K"}, {GT_Q6_K, 256, 210, "Q6_K"},
};
#define N_QTYPES (int)(sizeof QTYPES / sizeof QTYPES[0])

static const qtype_info *qtype_lookup(int t) {
    for (int i = 0; i < N_QTYPES; i++)
        if (QTYPES[i].type == t) return &QTYPES[i];
    return NULL;
}

static inline uint16_t rd16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
    return v;
}

/* IEEE half -> float, exact (subnormals, inf, nan payload). */
static inline float h2f(uint16_t h) {
    uint32_t s = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, u;
    float f;
    if (e == 0) {
        f = (float)m * 0x1p-24f;
        memcpy(&u, &f, 4);
        u |= s;
    } else if (e == 31) {
        u = s | 0x7f800000u | (m << 13);
    } else {
        u = s | ((e + 112) << 23) | (m << 13);
    }
    memcpy(&f, &u, 4);
    return f;
}

/* Keeps the compiler from fusing or reassociating across this value (exact ggml rounding). */
#define KEEP(v) __asm__("" : "+x"(v))

/* Q4_K / Q5_K: the 6-bit scales and mins of the 8 sub-blocks (ggml's get_scale_min_k4). */
static inline void k4_scale_min(const uint8_t *s, uint8_t sc[8], uint8_t mn[8]) {
    uint32_t u[4];
    memcpy(u, s, 12);
    u[3] = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    uint32_t t = u[1] & 0x3f3f3f3fu;
    u[1] = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    u[2] = t;
    u[0] &= 0x3f3f3f3fu;
    memcpy(sc, u, 8);
    memcpy(mn, u + 2, 8);
}

/* Portable per-block dequantizers: y[i] as gguf-py / ggml compute it. */
static ALWAYS_INLINE void gdq_q8_0(const uint8_t *b, float *restrict y) {
    float d = h2f(rd16(b));
    for (int i = 0; i < 32; i++) y[i] = (float)(int8_t)b[2 + i] * d;
}

static ALWAYS_INLINE void gdq_q4_0(const uint8_t *b, float *restrict y) {
    float d = h2f(rd16(b));
    for (int i = 0; i < 16; i++) {
        y[i] = d * (float)((b[2 + i] & 15) - 8);
        y[i + 16] = d * (float)((b[2 + i] >> 4) - 8);
    }
}

static ALWAYS_INLINE void gdq_q4_k(const uint8_t *b, float *restrict y) {
    float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
    uint8_t sc[8], mn[8];
    k4_scale_min(b + 4, sc, mn);
    const uint8_t *q = b + 16;
    for (int jj = 0; jj < 4; jj++, q += 32, y += 64) {
        float d1 = d * sc[2 * jj], m1 = dmin * mn[2 * jj], d2 = d * sc[2 * jj + 1], m2 = dmin * mn[2 * jj + 1];
        for (int l = 0; l < 32; l++) y[l] = d1 * (float)(q[l] & 15) - m1;
        for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)(q[l] >> 4) - m2;
    }
}

static ALWAYS_INLINE void gdq_q5_k(const uint8_t *b, float *restrict y) {
    float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2));
    uint8_t sc[8], mn[8];
    k4_scale_min(b + 4, sc, mn);
    const uint8_t *qh = b + 16, *q = b + 48;
    for (int jj = 0; jj < 4; jj++, q += 32, y += 64) {
        float d1 = d * sc[2 * jj], m1 = dmin * mn[2 * jj], d2 = d * sc[2 * jj + 1], m2 = dmin * mn[2 * jj + 1];
        int s1 = 2 * jj, s2 = 2 * jj + 1;
        for (int l = 0; l < 32; l++) y[l] = d1 * (float)((q[l] & 15) | (((qh[l] >> s1) & 1) << 4)) - m1;
        for (int l = 0; l < 32; l++) y[l + 32] = d2 * (float)((q[l] >> 4) | (((qh[l] >> s2) & 1) << 4)) - m2;
    }
}

static ALWAYS_INLINE void gdq_q6_k(const uint8_t *b, float *restrict y) {
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    float d = h2f(rd16(b + 208));
    for (int n = 0; n < 2; n++, ql += 64, qh += 32, sc += 8, y += 128) {
        float ds[8];
        for (int i = 0; i < 8; i++) ds[i] = d * (float)sc[i];
        for (int l = 0; l < 32; l++) {
            int is = l / 16;
            y[l] = ds[is] * (float)((int)((ql[l] & 15) | ((qh[l] & 3) << 4)) - 32);
            y[l + 32] = ds[is + 2] * (float)((int)((ql[l + 32] & 15) | (((qh[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = ds[is + 4] * (float)((int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = ds[is + 6] * (float)((int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
        }
    }
}

/* Portable kernels, instantiated for a target: SUFFIX names them, ATTR is the target attribute. */
#define GENERIC_KERNELS(SUFFIX, ATTR)                                                                    \
    ATTR static void dot_f32_##SUFFIX(const float *restrict w, const float *restrict x, Py_ssize_t n,   \
                                      float *restrict acc) {                                          \
        for (Py_ssize_t i = 0; i < n; i += 16)                                                        \
            for (int l = 0; l < 16; l++) acc[l] += w[i + l] * x[i + l];                               \
    }                                                                                                 \
    ATTR static void f32_mv_##SUFFIX(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {             \
        Py_ssize_t k = j->cols, k16 = k & ~(Py_ssize_t)15;                                            \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const float *w = (const float *)((const uint8_t *)j->w + r * j->row_bytes);               \
            float acc[16] = {0}, s = 0.f;                                                             \
            dot_f32_##SUFFIX(w, j->x, k16, acc);                                                      \
            for (int l = 0; l < 16; l++) s += acc[l];                                                 \
            for (Py_ssize_t i = k16; i < k; i++) s += w[i] * j->x[i];                                 \
            j->out[r] = s;                                                                            \
        }                                                                                             \
    }                                                                                                 \
    GENERIC_BLOCK_MV(SUFFIX, ATTR, q8_0, 32)                                                           \
    GENERIC_BLOCK_MV(SUFFIX, ATTR, q4_0, 32)                                                           \
    GENERIC_BLOCK_MV(SUFFIX, ATTR, q4_k, 256)                                                          \
    GENERIC_BLOCK_MV(SUFFIX, ATTR, q5_k, 256)                                                          \
    GENERIC_BLOCK_MV(SUFFIX, ATTR, q6_k, 256)

/* Per row: dequantize each block into a small buffer, then a 16-lane fp32 dot with x. */
#define GENERIC_BLOCK_MV(SUFFIX, ATTR, T, BS)                                                           \
    ATTR static void T##_mv_##SUFFIX(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {              \
        const Py_ssize_t nb = j->cols / BS;                                                           \
        const int tsz = (int)(j->row_bytes / (nb ? nb : 1));                                          \
        float tmp[BS] __attribute__((aligned(64)));                                                   \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;                              \
            float acc[16] = {0}, s = 0.f;                                                             \
            for (Py_ssize_t ib = 0; ib < nb; ib++, b += tsz) {                                        \
                gdq_##T(b, tmp);                                                                      \
                const float *x = j->x + ib * BS;                                                      \
                for (int i = 0; i < BS; i += 16)                                                      \
                    for (int l = 0; l < 16; l++) acc[l] += tmp[i + l] * x[i + l];                     \
            }                                                                                         \
            for (int l = 0; l < 16; l++) s += acc[l];                                                 \
            j->out[r] = s;                                                                            \
        }                                                                                             \
    }

GENERIC_KERNELS(base, )
#if Q_X86
GENERIC_KERNELS(v3, __attribute__((target("arch=x86-64-v3"))))
#endif

/* ------------------------------------------------------------- int8 activations (act = 1)
 * q_matvec(..., act=1) quantizes x once per call, per 32 consecutive values g:
 *   s_g = max|x_k| / 127, xq_k = rint(x_k * (1 / s_g)) clamped to [-127, 127] (fp32 operations, ties
 *   to even; s_g = 0 and xq = 0 where max |x_k| < 2^-96; s_g = NaN and xq = 0 where the 32 values
 *   hold an inf / NaN),
 * and computes each row from integer dot products of the weights' integer quants with xq (exact in
 * int32), converted to fp32 once per sub-block and scaled by (d * sc) * s_g. The K-types' min term
 * (dmin * m per 32-weight sub-block) multiplies the sums of the quantized x (s_g * sum(xq), as
 * llama.cpp's q8_K bsums): then y = W @ deq(xq) to fp32 rounding, whose error W @ (deq(xq) - x)
 * is several times smaller than with the exact sums of x (the d*sc*q and dmin*m parts of a weight
 * are large and of opposite sign; their activation errors cancel only if both see the same x).
 * F32 / F16 / BF16 weights ignore act (the exact path).
 * Kernels: AVX-512 VNNI (vpdpbusd) where the CPU has it and the level is 4; AVX2 (vpmaddubsw /
 * vpmaddwd) at level 3 or on AVX-512 CPUs without VNNI; a portable C version of the same integer
 * math otherwise. */
typedef struct q8x {
    /* natural order (portable kernels; the source of the v4 layouts) */
    int8_t *xqn;   /* [cols] quantized x */
    float *sxn;    /* [cols / 32] scales s_g */
    float *xsn;    /* [cols / 32] sums of the quantized x, s_g * sum(xq) (K-min types) */
    /* AVX-512 layouts (v4 kernels), padded with zeros to whole groups */
    int8_t *xq;    /* quantized x in the order the kernel's weight vectors hold the weights */
    int32_t *corr; /* per 4-byte lane of xq: -offset * sum of its xq (the weights' zero point), or NULL */
    float *sxl;    /* per int32 lane of the kernel's reduced sums: the scale s_g of that lane */
    float *aux;    /* K-min types: per 256 [0 x 8, xsn of the 8 sub-blocks] (x_block_sums' layout) */
    /* split activations (act = 2): three int8 pieces of x (xqn: `cols` apart; xq: interleaved,
     * x3_layout_v4), sxn / sxl the scale S of the combined integer, corr and xsn of it */
    int pieces;    /* 1 (int8 activations) or 3 (split) */
} q8x;

/* Groups with max |x| below 2^-96 quantize to 0 (scale 0): keeps 1 / s_g finite and s_g normal. */
#define Q8_TINY 0x0F800000u /* the bits of 2^-96 */

/* max |x| of a group as its bits -> its scale. */
static ALWAYS_INLINE float q8_scale_of_max(uint32_t m) {
    float amax;
    memcpy(&amax, &m, 4);
    return m >= 0x7f800000u ? NAN : m < Q8_TINY ? 0.f : amax / 127.f;
}

/* The int8 scale of 32 activations: max|x| / 127; 0 below Q8_TINY, NaN where one is inf / NaN (the
 * maximum taken on the bits: non-negative floats order as their bits; inf / NaN >= 0x7f800000). */
static ALWAYS_INLINE float q8_group_scale(const float *v) {
    uint32_t u[32], m = 0;
    memcpy(u, v, sizeof u);
    for (int l = 0; l < 32; l++) m = (u[l] & 0x7fffffffu) > m ? (u[l] & 0x7fffffffu) : m;
    return q8_scale_of_max(m);
}

/* x -> (xq, s) as documented above; identical in every build (IEEE operations, rint). */
MULTIVERSION
static void q8_quantize(const float *restrict x, Py_ssize_t cols, int8_t *restrict xq, float *restrict sx) {
    for (Py_ssize_t g = 0; g < cols / 32; g++) {
        const float *v = x + 32 * g;
        float d = q8_group_scale(v), id = d > 0.f ? 1.f / d : 0.f;
        sx[g] = d;
        for (int l = 0; l < 32; l++) {
            float q = d > 0.f ? rintf(v[l] * id) : 0.f;
            q = q > 127.f ? 127.f : (q < -127.f ? -127.f : q);
            xq[32 * g + l] = (int8_t)q;
        }
    }
}

/* Portable block products with int8 x: the weights' integer quants (zero point removed, so
 * signed), integer dot products per sub-block, one fp32 scaling per sub-block. */
static ALWAYS_INLINE int idot(const int8_t *restrict q, const int8_t *restrict x, int n) {
    int s = 0;
    for (int l = 0; l < n; l++) s += (int)q[l] * (int)x[l];
    return s;
}

static ALWAYS_INLINE float gq8_q8_0(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs) {
    (void)xs;
    return (h2f(rd16(b)) * sx[0]) * (float)idot((const int8_t *)(b + 2), xq, 32);
}

static ALWAYS_INLINE float gq8_q4_0(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs) {
    (void)xs;
    int8_t q[32];
    for (int i = 0; i < 16; i++) {
        q[i] = (int8_t)((b[2 + i] & 15) - 8);
        q[i + 16] = (int8_t)((b[2 + i] >> 4) - 8);
    }
    return (h2f(rd16(b)) * sx[0]) * (float)idot(q, xq, 32);
}

/* Q4_K / Q5_K: q [256] the unsigned 4/5-bit quants in weight order. */
static ALWAYS_INLINE float gq8_k_min(const uint8_t *b, const int8_t *q, const int8_t *xq, const float *sx,
                                     const float *xs) {
    float d = h2f(rd16(b)), dmin = h2f(rd16(b + 2)), acc = 0.f;
    uint8_t sc[8], mn[8];
    k4_scale_min(b + 4, sc, mn);
    for (int i = 0; i < 8; i++) {
        acc += ((d * (float)sc[i]) * sx[i]) * (float)idot(q + 32 * i, xq + 32 * i, 32);
        acc -= (dmin * (float)mn[i]) * xs[i];
    }
    return acc;
}

static ALWAYS_INLINE float gq8_q4_k(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs) {
    int8_t q[256];
    const uint8_t *qs = b + 16;
    for (int jj = 0; jj < 4; jj++)
        for (int l = 0; l < 32; l++) {
            q[64 * jj + l] = (int8_t)(qs[32 * jj + l] & 15);
            q[64 * jj + 32 + l] = (int8_t)(qs[32 * jj + l] >> 4);
        }
    return gq8_k_min(b, q, xq, sx, xs);
}

static ALWAYS_INLINE float gq8_q5_k(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs) {
    int8_t q[256];
    const uint8_t *qh = b + 16, *qs = b + 48;
    for (int jj = 0; jj < 4; jj++)
        for (int l = 0; l < 32; l++) {
            q[64 * jj + l] = (int8_t)((qs[32 * jj + l] & 15) | (((qh[l] >> (2 * jj)) & 1) << 4));
            q[64 * jj + 32 + l] = (int8_t)((qs[32 * jj + l] >> 4) | (((qh[l] >> (2 * jj + 1)) & 1) << 4));
        }
    return gq8_k_min(b, q, xq, sx, xs);
}

static ALWAYS_INLINE float gq8_q6_k(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs) {
    (void)xs;
    int8_t q[256];
    const uint8_t *ql = b, *qh = b + 128;
    const int8_t *sc = (const int8_t *)(b + 192);
    for (int n = 0; n < 2; n++)
        for (int l = 0; l < 32; l++) {
            int8_t *y = q + 128 * n;
            const uint8_t *L = ql + 64 * n, *H = qh + 32 * n;
            y[l] = (int8_t)(((L[l] & 15) | ((H[l] & 3) << 4)) - 32);
            y[l + 32] = (int8_t)(((L[l + 32] & 15) | (((H[l] >> 2) & 3) << 4)) - 32);
            y[l + 64] = (int8_t)(((L[l] >> 4) | (((H[l] >> 4) & 3) << 4)) - 32);
            y[l + 96] = (int8_t)(((L[l + 32] >> 4) | (((H[l] >> 6) & 3) << 4)) - 32);
        }
    float d = h2f(rd16(b + 208)), acc = 0.f;
    for (int i = 0; i < 16; i++) acc += ((d * (float)sc[i]) * sx[i / 2]) * (float)idot(q + 16 * i, xq + 16 * i, 16);
    return acc;
}

/* Row loops of the portable int8-activation kernels; blocks summed in order. */
#define GENERIC_Q8(SUFFIX, ATTR, T, BS, TS)                                                              \
    ATTR static void T##_q8mv_##SUFFIX(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {            \
        const Py_ssize_t nb = j->cols / BS;                                                           \
        const q8x *qx = j->qx;                                                                        \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;                              \
            float s = 0.f;                                                                            \
            for (Py_ssize_t ib = 0; ib < nb; ib++)                                                    \
                s += gq8_##T(b + ib * TS, qx->xqn + ib * BS, qx->sxn + ib * (BS / 32),                \
                             qx->xsn ? qx->xsn + ib * (BS / 32) : NULL);                              \
            j->out[r] = s;                                                                            \
        }                                                                                             \
    }
#define GENERIC_Q8_KERNELS(SUFFIX, ATTR)        \
    GENERIC_Q8(SUFFIX, ATTR, q8_0, 32, 34)      \
    GENERIC_Q8(SUFFIX, ATTR, q4_0, 32, 18)      \
    GENERIC_Q8(SUFFIX, ATTR, q4_k, 256, 144)    \
    GENERIC_Q8(SUFFIX, ATTR, q5_k, 256, 176)    \
    GENERIC_Q8(SUFFIX, ATTR, q6_k, 256, 210)

GENERIC_Q8_KERNELS(base, )

/* Baseline F16 (software conversion) and the dequantizers (baseline build: no FMA contraction). */
static void f16_mv_base(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *w = (const uint8_t *)j->w + r * j->row_bytes;
        float acc[4] = {0};
        Py_ssize_t i = 0;
        for (; i + 4 <= j->cols; i += 4)
            for (int l = 0; l < 4; l++) acc[l] += h2f(rd16(w + 2 * (i + l))) * j->x[i + l];
        for (; i < j->cols; i++) acc[0] += h2f(rd16(w + 2 * i)) * j->x[i];
        j->out[r] = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    }
}

static void dq_rows_base(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1, int type) {
    const qtype_info *ti = qtype_lookup(type);
    const Py_ssize_t nb = j->cols / ti->block;
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;
        float *y = j->out + r * j->cols;
        switch (type) {
        case GT_F32: memcpy(y, b, (size_t)j->cols * 4); break;
        case GT_F16: for (Py_ssize_t i = 0; i < j->cols; i++) y[i] = h2f(rd16(b + 2 * i)); break;
        case GT_BF16: for (Py_ssize_t i = 0; i < j->cols; i++) y[i] = bf16_to_f32(rd16(b + 2 * i)); break;
        case GT_Q8_0: for (Py_ssize_t i = 0; i < nb; i++) gdq_q8_0(b + 34 * i, y + 32 * i); break;
        case GT_Q4_0: for (Py_ssize_t i = 0; i < nb; i++) gdq_q4_0(b + 18 * i, y + 32 * i); break;
        case GT_Q4_K: for (Py_ssize_t i = 0; i < nb; i++) gdq_q4_k(b + 144 * i, y + 256 * i); break;
        case GT_Q5_K: for (Py_ssize_t i = 0; i < nb; i++) gdq_q5_k(b + 176 * i, y + 256 * i); break;
        case GT_Q6_K: for (Py_ssize_t i = 0; i < nb; i++) gdq_q6_k(b + 210 * i, y + 256 * i); break;
        }
    }
}

#define DQ_BASE(T, ID) \
    static void T##_dq_base(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) { dq_rows_base(j, r0, r1, ID); }
DQ_BASE(f32, GT_F32)
DQ_BASE(f16, GT_F16)
DQ_BASE(bf16, GT_BF16)
DQ_BASE(q8_0, GT_Q8_0)
DQ_BASE(q4_0, GT_Q4_0)
DQ_BASE(q4_k, GT_Q4_K)
DQ_BASE(q5_k, GT_Q5_K)
DQ_BASE(q6_k, GT_Q6_K)

#if Q_X86
/* ------------------------------------------------------------- AVX2 (x86-64-v3) F16 */
#define T3 __attribute__((target("arch=x86-64-v3")))
T3 static void f16_mv_v3(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *w = (const uint8_t *)j->w + r * j->row_bytes;
        const float *x = j->x;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        Py_ssize_t i = 0;
        for (; i + 16 <= j->cols; i += 16) {
            a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i))), _mm256_loadu_ps(x + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + 2 * i + 16))), _mm256_loadu_ps(x + i + 8), a1);
        }
        float t[8], s = 0.f;
        _mm256_storeu_ps(t, _mm256_add_ps(a0, a1));
        for (int l = 0; l < 8; l++) s += t[l];
        for (; i < j->cols; i++) s += _cvtsh_ss(rd16(w + 2 * i)) * x[i];
        j->out[r] = s;
    }
}

/* ------------------------------------------------------------- AVX-512 (x86-64-v4) kernels
 * Each block function either FMAs the dequantized weights into accumulators (mode 0, x given) or
 * stores them (mode 1, y given); it is inlined with a constant mode. Weight values are formed with
 * exactly ggml's fp32 operations: 4/5-bit types through a per-sub-block table of the 16 / 32
 * possible dequantized values (vpermps / vpermt2ps indexed by the nibbles), the others by
 * int -> float conversion and the scale multiply. */
#define T4 __attribute__((target("arch=x86-64-v4")))
#define KEEPV(v) __asm__("" : "+v"(v))

T4 static ALWAYS_INLINE void emit4(int mode, __m512 *acc, const float *x, float *y, __m512 w) {
    if (mode) _mm512_storeu_ps(y, w);
    else *acc = _mm512_fmadd_ps(w, _mm512_loadu_ps(x), *acc);
}

T4 static ALWAYS_INLINE __m128i ld128(const uint8_t *p) { return _mm_loadu_si128((const __m128i *)p); }

/* 8 sub-block pairs (d*sc[i], dmin*m[i]) of a Q4_K / Q5_K block into dm[0..7], dm[8..15]. */
T4 static ALWAYS_INLINE __m512 k4_dm_v4(const uint8_t *b, float *dm) {
    uint8_t sm[16];
    k4_scale_min(b + 4, sm, sm + 8);
    __m512 s = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)sm)));
    __m512 dd = _mm512_mask_blend_ps(0xFF00, _mm512_set1_ps(_cvtsh_ss(rd16(b))), _mm512_set1_ps(_cvtsh_ss(rd16(b + 2))));
    __m512 v = _mm512_mul_ps(dd, s);
    _mm512_store_ps(dm, v);
    /* Read back as broadcasts from memory (load ports) rather than lane shuffles from a register. */
    __asm__ volatile("" : : "r"(dm) : "memory");
    return v;
}


/* table[q] = d1 * q - m1 for q = base .. base+15, rounded as ggml does (product, then difference). */
T4 static ALWAYS_INLINE __m512 k4_table(__m512 q, float d1, float m1) {
    __m512 p = _mm512_mul_ps(q, _mm512_set1_ps(d1));
    KEEPV(p);
    return _mm512_sub_ps(p, _mm512_set1_ps(m1));
}

#define IOTA16 _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)

T4 static ALWAYS_INLINE void q4_k_block_v4(int mode, const uint8_t *b, const float *x, float *y, __m512 *acc,
                                          const float *sx) {
    float dm[16] __attribute__((aligned(64)));
    __m512 dmv = k4_dm_v4(b, dm);
    const uint8_t *q = b + 16;
    if (!mode) {
        /* sum_i d*sc[i] * sum(q*x over sub-block i) - sum_i dmin*m[i] * sum(x over sub-block i): nibbles
         * converted to fp32 (vcvtdq2ps spreads over more ports on Zen 4 than the vpermps tables do) */
        const __m512i m15 = _mm512_set1_epi32(15);
        acc[0] = _mm512_fnmadd_ps(dmv, _mm512_load_ps(sx), acc[0]);
#pragma GCC unroll 4
        for (int jj = 0; jj < 4; jj++) {
            __m512i b0 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj));
            __m512i b1 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj + 16));
            const float *xo = x + 64 * jj;
            __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b0, m15)), _mm512_loadu_ps(xo));
            u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b1, m15)), _mm512_loadu_ps(xo + 16), u);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), _mm512_loadu_ps(xo + 32));
            v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4)), _mm512_loadu_ps(xo + 48), v);
            int k = 2 * (jj & 1);
            acc[k] = _mm512_fmadd_ps(u, _mm512_set1_ps(dm[2 * jj]), acc[k]);
            acc[k + 1] = _mm512_fmadd_ps(v, _mm512_set1_ps(dm[2 * jj + 1]), acc[k + 1]);
        }
        return;
    }
    /* dequantization: per sub-block the 16 possible values d*sc*q - dmin*m, picked by the nibbles */
    const __m512 iota = IOTA16;
#pragma GCC unroll 4
    for (int jj = 0; jj < 4; jj++) {
        __m512 tlo = k4_table(iota, dm[2 * jj], dm[8 + 2 * jj]);
        __m512 thi = k4_table(iota, dm[2 * jj + 1], dm[9 + 2 * jj]);
        __m512i b0 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj));
        __m512i b1 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj + 16));
        int o = 64 * jj;
        emit4(mode, acc, x, y + o, _mm512_permutexvar_ps(b0, tlo));
        emit4(mode, acc, x, y + o + 16, _mm512_permutexvar_ps(b1, tlo));
        emit4(mode, acc, x, y + o + 32, _mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), thi));
        emit4(mode, acc, x, y + o + 48, _mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), thi));
    }
}

/* Bit j of h moved to bit 4 (j is a constant after unrolling). */
#define QH_BIT4(h, j) ((j) < 4 ? _mm512_slli_epi32(h, 4 - (j)) : (j) == 4 ? (h) : _mm512_srli_epi32(h, (j) - 4))
/* (a & ~0x10) | (h & 0x10): the low nibble of a with bit 4 from h (vpermt2ps ignores bits 5+). */
#define NIB5(a, h) _mm512_ternarylogic_epi32(a, h, _mm512_set1_epi32(0x10), 0xD8)

T4 static ALWAYS_INLINE void q5_k_block_v4(int mode, const uint8_t *b, const float *x, float *y, __m512 *acc,
                                          const float *sx) {
    float dm[16] __attribute__((aligned(64)));
    __m512 dmv = k4_dm_v4(b, dm);
    const uint8_t *qh = b + 16, *q = b + 48;
    if (!mode) {
        /* as Q4_K: 5-bit q = nibble | 16 where the sub-block's bit of qh is set (a masked OR),
         * converted to fp32; the mins via the per-call sums of x */
        const __m512i m15 = _mm512_set1_epi32(15), k16 = _mm512_set1_epi32(16);
        const __m256i hq = _mm256_loadu_si256((const __m256i *)qh);
        acc[0] = _mm512_fnmadd_ps(dmv, _mm512_load_ps(sx), acc[0]);
#pragma GCC unroll 4
        for (int jj = 0; jj < 4; jj++) {
            __mmask32 klo = _mm256_test_epi8_mask(hq, _mm256_set1_epi8((char)(1 << (2 * jj))));
            __mmask32 khi = _mm256_test_epi8_mask(hq, _mm256_set1_epi8((char)(2 << (2 * jj))));
            __m512i b0 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj));
            __m512i b1 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj + 16));
            __m512i l0 = _mm512_and_si512(b0, m15), l1 = _mm512_and_si512(b1, m15);
            __m512i h0 = _mm512_srli_epi32(b0, 4), h1 = _mm512_srli_epi32(b1, 4);
            l0 = _mm512_mask_or_epi32(l0, (__mmask16)klo, l0, k16);
            l1 = _mm512_mask_or_epi32(l1, (__mmask16)(klo >> 16), l1, k16);
            h0 = _mm512_mask_or_epi32(h0, (__mmask16)khi, h0, k16);
            h1 = _mm512_mask_or_epi32(h1, (__mmask16)(khi >> 16), h1, k16);
            const float *xo = x + 64 * jj;
            __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(l0), _mm512_loadu_ps(xo));
            u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(l1), _mm512_loadu_ps(xo + 16), u);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(h0), _mm512_loadu_ps(xo + 32));
            v = _mm512_fmadd_ps(_mm512_cvtepi32_ps(h1), _mm512_loadu_ps(xo + 48), v);
            int k = 2 * (jj & 1);
            acc[k] = _mm512_fmadd_ps(u, _mm512_set1_ps(dm[2 * jj]), acc[k]);
            acc[k + 1] = _mm512_fmadd_ps(v, _mm512_set1_ps(dm[2 * jj + 1]), acc[k + 1]);
        }
        return;
    }
    const __m512 iota = IOTA16, iota16 = _mm512_add_ps(IOTA16, _mm512_set1_ps(16.f));
    const __m512i h0 = _mm512_cvtepu8_epi32(ld128(qh)), h1 = _mm512_cvtepu8_epi32(ld128(qh + 16));
#pragma GCC unroll 4
    for (int jj = 0; jj < 4; jj++) {
        /* dequantization: the 32 possible values d*sc*q - dmin*m per sub-block, picked by q */
        __m512 alo = k4_table(iota, dm[2 * jj], dm[8 + 2 * jj]), blo = k4_table(iota16, dm[2 * jj], dm[8 + 2 * jj]);
        __m512 ahi = k4_table(iota, dm[2 * jj + 1], dm[9 + 2 * jj]), bhi = k4_table(iota16, dm[2 * jj + 1], dm[9 + 2 * jj]);
        __m512i b0 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj));
        __m512i b1 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj + 16));
        int o = 64 * jj;
        emit4(mode, acc + 0, x + o, y + o, _mm512_permutex2var_ps(alo, NIB5(b0, QH_BIT4(h0, 2 * jj)), blo));
        emit4(mode, acc + 1, x + o + 16, y + o + 16, _mm512_permutex2var_ps(alo, NIB5(b1, QH_BIT4(h1, 2 * jj)), blo));
        emit4(mode, acc + 2, x + o + 32, y + o + 32,
              _mm512_permutex2var_ps(ahi, NIB5(_mm512_srli_epi32(b0, 4), QH_BIT4(h0, 2 * jj + 1)), bhi));
        emit4(mode, acc + 3, x + o + 48, y + o + 48,
              _mm512_permutex2var_ps(ahi, NIB5(_mm512_srli_epi32(b1, 4), QH_BIT4(h1, 2 * jj + 1)), bhi));
    }
}

/* A Q6_K block's 16 scales d * sc[i] into ds and its 256 quants (-32 .. 31) into q. */
T4 static ALWAYS_INLINE void q6_k_unpack_v4(const uint8_t *b, float *ds, int8_t *q) {
    __m512 sc = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(b + 192)));
    _mm512_store_ps(ds, _mm512_mul_ps(_mm512_set1_ps(_cvtsh_ss(rd16(b + 208))), sc));
    __asm__ volatile("" : : "r"(ds) : "memory");
    const __m512i m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), k32 = _mm512_set1_epi8(32);
    const __m512i sh01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i sh23 = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
    for (int n = 0; n < 2; n++) {
        __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * n));
        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n)));
        __m512i h01 = _mm512_and_si512(_mm512_sllv_epi16(qh, sh01), m30);
        __m512i h23 = _mm512_and_si512(_mm512_srlv_epi16(qh, sh23), m30);
        __m512i z0 = _mm512_ternarylogic_epi32(ql, m0f, h01, 0xEA);                        /* (a&b)|c */
        __m512i z1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), m0f, h23, 0xEA);
        _mm512_store_si512((void *)(q + 128 * n), _mm512_sub_epi8(z0, k32));
        _mm512_store_si512((void *)(q + 128 * n + 64), _mm512_sub_epi8(z1, k32));
    }
}

T4 static ALWAYS_INLINE void q6_k_block_v4(int mode, const uint8_t *b, const float *x, float *y, __m512 *acc,
                                          const float *sx) {
    float ds[16] __attribute__((aligned(64)));
    int8_t q[256] __attribute__((aligned(64)));
    q6_k_unpack_v4(b, ds, q);
    __asm__ volatile("" : : "r"(q) : "memory"); /* reload as vpmovsxbd from memory, not lane extracts */
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(q + 16 * i))));
        emit4(mode, acc + (i & 3), x + 16 * i, y + 16 * i, _mm512_mul_ps(v, _mm512_set1_ps(ds[i])));
    }
}

/* Q8_0 / Q4_0 (32 weights): mode 0 uses acc[0], acc[1]. */
T4 static ALWAYS_INLINE void q8_0_block_v4(int mode, const uint8_t *b, const float *x, float *y, __m512 *acc,
                                          const float *sx) {
    __m512 d = _mm512_set1_ps(_cvtsh_ss(rd16(b)));
    __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(b + 2)));
    __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(ld128(b + 18)));
    if (mode) {
        _mm512_storeu_ps(y, _mm512_mul_ps(q0, d));
        _mm512_storeu_ps(y + 16, _mm512_mul_ps(q1, d));
    } else {  /* sum(q * x) * d: the scale applied once per block */
        __m512 t = _mm512_mul_ps(q0, _mm512_loadu_ps(x));
        t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(x + 16), t);
        acc[0] = _mm512_fmadd_ps(t, d, acc[0]);
    }
}

T4 static ALWAYS_INLINE void q4_0_block_v4(int mode, const uint8_t *b, const float *x, float *y, __m512 *acc,
                                          const float *sx) {
    __m512 t = _mm512_mul_ps(_mm512_sub_ps(IOTA16, _mm512_set1_ps(8.f)), _mm512_set1_ps(_cvtsh_ss(rd16(b))));
    __m512i q = _mm512_cvtepu8_epi32(ld128(b + 2));
    emit4(mode, acc + 0, x, y, _mm512_permutexvar_ps(q, t));
    emit4(mode, acc + 1, x + 16, y + 16, _mm512_permutexvar_ps(_mm512_srli_epi32(q, 4), t));
}

/* The quantized kernels prefetch the weight bytes ahead of the block being multiplied, chosen once
 * by the CPU's vendor (a prefetch changes no result):
 * - AMD (Zen 4): non-temporally, 2 KiB ahead, which keeps the streamed weights from evicting x out of
 *   L1 (rows of 5632 weights: 7.7 -> 10.9 GB/s of Q4_K on one thread);
 * - Intel (a Xeon with AVX-512, session 18): the non-temporal prefetch halves the stream (Q4_K at
 *   6.3 GB/s per thread, 12.0 on two); into L2, 4 KiB ahead: 24-26 GB/s on two threads (T0 at 4 KiB
 *   about the same, either hint at 2 KiB ~20, none ~14; bench_quant_matvec).
 * q_prefetch() reads or sets the choice. */
/* One opaque statement (no branch in the kernel's control flow, so its arithmetic compiles exactly as
 * with a plain prefetch: the kernels' paths must stay bit-identical to each other). */
#define PF_ONE(p)                                                                                      \
    __asm__ volatile("test %1, %1\n\tjz 1f\n\tprefetcht1 4096(%0)\n\tjmp 2f\n1:\n\tprefetchnta 2048(%0)\n2:" \
                     : : "r"(p), "r"(q_pf_l2) : "cc")
#define PF_LINES(n) for (int pf_ = 0; pf_ < (n); pf_ += 64) PF_ONE((const char *)b + pf_)

/* Row loops: STEP blocks per step, 4 accumulators. */
#define V4_ROWS(T, BS, TS, STEP)                                                                       \
    T4 static void T##_mv_v4(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {                      \
        const Py_ssize_t nb = j->cols / BS;                                                           \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;                              \
            const float *x = j->x;                                                                    \
            __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()}; \
            Py_ssize_t ib = 0;                                                                        \
            if (STEP == 2) {                                                                          \
                for (; ib + 2 <= nb; ib += 2, b += 2 * TS, x += 2 * BS) {                             \
                    PF_LINES(2 * TS);                                                                 \
                    T##_block_v4(0, b, x, NULL, acc, NULL);                                           \
                    T##_block_v4(0, b + TS, x + BS, NULL, acc + 2, NULL);                             \
                }                                                                                     \
            }                                                                                         \
            for (; ib < nb; ib++, b += TS, x += BS) {                                                 \
                PF_LINES(TS);                                                                         \
                T##_block_v4(0, b, x, NULL, acc, j->aux ? j->aux + 16 * ib : NULL);                   \
            }                                                                                         \
            j->out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]))); \
        }                                                                                             \
    }                                                                                                 \
    V4_DQ(T, BS, TS)

/* Dequantization of rows r0..r1 into out [rows, cols]. */
#define V4_DQ(T, BS, TS)                                                                               \
    T4 static void T##_dq_v4(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {                      \
        const Py_ssize_t nb = j->cols / BS;                                                           \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;                              \
            float *y = j->out + r * j->cols;                                                          \
            for (Py_ssize_t ib = 0; ib < nb; ib++) T##_block_v4(1, b + ib * TS, NULL, y + ib * BS, NULL, NULL); \
        }                                                                                             \
    }

V4_ROWS(q8_0, 32, 34, 2)
V4_ROWS(q4_0, 32, 18, 2)
V4_DQ(q4_k, 256, 144)
V4_ROWS(q5_k, 256, 176, 1)
V4_DQ(q6_k, 256, 210)

/* Q4_K and Q6_K products in tiles of up to four x rows (batched decode; the one-row product is the
 * tile of one): a block's weights are unpacked and converted once and multiplied into every x
 * row's four accumulators, each x row getting exactly the one-row kernel's operations in its
 * order (the q4_k / q6_k block functions' mode 0, then the same final sum), so each output is
 * bit-identical whatever the tile. Compiled without reassociation, so that no instance sums
 * differently. */
#pragma GCC push_options
#pragma GCC optimize("no-associative-math")

/* One Q4_K block (weights 256 ib ..) into acc[t][0..3] of x rows t < NB (xs[t]; sxs[t]: its
 * per-block sums of x, see x_block_sums). */
T4 static ALWAYS_INLINE void q4_k_tile_block(const uint8_t *b, Py_ssize_t ib, const float *const *xs,
                                            const float *const *sxs, __m512 acc[4][4], const int NB) {
    float dm[16] __attribute__((aligned(64)));
    __m512 dmv = k4_dm_v4(b, dm);
    const uint8_t *q = b + 16;
    const __m512i m15 = _mm512_set1_epi32(15);
    for (int t = 0; t < NB; t++) acc[t][0] = _mm512_fnmadd_ps(dmv, _mm512_load_ps(sxs[t] + 16 * ib), acc[t][0]);
#pragma GCC unroll 4
    for (int jj = 0; jj < 4; jj++) {
        __m512i b0 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj));
        __m512i b1 = _mm512_cvtepu8_epi32(ld128(q + 32 * jj + 16));
        __m512 l0 = _mm512_cvtepi32_ps(_mm512_and_si512(b0, m15)), l1 = _mm512_cvtepi32_ps(_mm512_and_si512(b1, m15));
        __m512 h0 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b0, 4)), h1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b1, 4));
        __m512 d0 = _mm512_set1_ps(dm[2 * jj]), d1 = _mm512_set1_ps(dm[2 * jj + 1]);
        int k = 2 * (jj & 1);
        for (int t = 0; t < NB; t++) {
            const float *xo = xs[t] + 256 * ib + 64 * jj;
            __m512 u = _mm512_mul_ps(l0, _mm512_loadu_ps(xo));
            u = _mm512_fmadd_ps(l1, _mm512_loadu_ps(xo + 16), u);
            __m512 v = _mm512_mul_ps(h0, _mm512_loadu_ps(xo + 32));
            v = _mm512_fmadd_ps(h1, _mm512_loadu_ps(xo + 48), v);
            acc[t][k] = _mm512_fmadd_ps(u, d0, acc[t][k]);
            acc[t][k + 1] = _mm512_fmadd_ps(v, d1, acc[t][k + 1]);
        }
    }
}

/* One Q6_K block into acc[t][0..3] of x rows t < NB (sxs unused). */
T4 static ALWAYS_INLINE void q6_k_tile_block(const uint8_t *b, Py_ssize_t ib, const float *const *xs,
                                            const float *const *sxs, __m512 acc[4][4], const int NB) {
    (void)sxs;
    float ds[16] __attribute__((aligned(64)));
    int8_t q[256] __attribute__((aligned(64)));
    q6_k_unpack_v4(b, ds, q);
    __asm__ volatile("" : : "r"(q) : "memory");
#pragma GCC unroll 16
    for (int i = 0; i < 16; i++) {
        __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_load_si128((const __m128i *)(q + 16 * i))));
        __m512 wv = _mm512_mul_ps(v, _mm512_set1_ps(ds[i]));
        for (int t = 0; t < NB; t++)
            acc[t][i & 3] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xs[t] + 256 * ib + 16 * i), acc[t][i & 3]);
    }
}

/* Blocks ib0..ib1 of weight row r (blocks of TS bytes from w) times x rows t < NB: the accumulators
 * start at zero (first) or from `keep`, and end in outs[t][r] (last: the one-row kernel's final
 * sum) or back in `keep` (storing and reloading them is exact, so a row's arithmetic is the same
 * in one piece or in column panels). */
#define TILE_ROW(T, TS)                                                                                \
    T4 static ALWAYS_INLINE void T##_tile_row(const uint8_t *w, Py_ssize_t ib0, Py_ssize_t ib1,        \
                                             const float *const *xs, const float *const *sxs,         \
                                             __m512 *keep, int first, int last, float *const *outs,   \
                                             Py_ssize_t r, const int NB) {                            \
        __m512 acc[4][4];                                                                             \
        for (int t = 0; t < NB; t++)                                                                  \
            for (int k = 0; k < 4; k++) acc[t][k] = first ? _mm512_setzero_ps() : keep[4 * t + k];   \
        const uint8_t *b = w + ib0 * TS;                                                              \
        for (Py_ssize_t ib = ib0; ib < ib1; ib++, b += TS) {                                          \
            PF_LINES(TS);                                                                             \
            T##_tile_block(b, ib, xs, sxs, acc, NB);                                                  \
        }                                                                                             \
        for (int t = 0; t < NB; t++) {                                                                \
            if (last)                                                                                 \
                outs[t][r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[t][0], acc[t][1]),  \
                                                                _mm512_add_ps(acc[t][2], acc[t][3]))); \
            else                                                                                      \
                for (int k = 0; k < 4; k++) keep[4 * t + k] = acc[t][k];                              \
        }                                                                                             \
    }                                                                                                 \
    /* the one-row product (q_matvec's row function): each row in one piece */                       \
    T4 static void T##_mv_v4(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {                      \
        const Py_ssize_t nb = j->cols / 256;                                                          \
        const float *xs[1] = {j->x}, *sxs[1] = {j->aux};                                              \
        float *outs[1] = {j->out};                                                                    \
        for (Py_ssize_t r = r0; r < r1; r++)                                                          \
            T##_tile_row((const uint8_t *)j->w + r * j->row_bytes, 0, nb, xs, sxs, NULL, 1, 1, outs, r, 1); \
    }                                                                                                 \
    /* Rows r0..r1 of the products subs[0 .. batch-1] (one weight, one x row each). Groups of        \
     * TILE_ROWS weight rows; for each tile of up to four x rows, column panels of TILE_PANEL blocks  \
     * (the tile's x panel stays in L1 for the group's rows; their accumulators wait in `keep`). */   \
    T4 static void T##_tile_v4(const matvec_job *const *subs, int batch, Py_ssize_t r0, Py_ssize_t r1) { \
        const matvec_job *j = subs[0];                                                                \
        const Py_ssize_t nb = j->cols / 256;                                                          \
        __m512 keep[TILE_ROWS][16];                                                                   \
        for (Py_ssize_t g0 = r0; g0 < r1; g0 += TILE_ROWS) {                                          \
            Py_ssize_t g1 = g0 + TILE_ROWS < r1 ? g0 + TILE_ROWS : r1;                                \
            for (int b0 = 0; b0 < batch; b0 += 4) {                                                   \
                const float *xs[4] = {0}, *sxs[4] = {0};                                              \
                float *outs[4] = {0};                                                                 \
                int n = batch - b0 < 4 ? batch - b0 : 4;                                              \
                for (int t = 0; t < n; t++)                                                           \
                    xs[t] = subs[b0 + t]->x, sxs[t] = subs[b0 + t]->aux, outs[t] = subs[b0 + t]->out; \
                for (Py_ssize_t p0 = 0; p0 < nb; p0 += TILE_PANEL) {                                  \
                    Py_ssize_t p1 = p0 + TILE_PANEL < nb ? p0 + TILE_PANEL : nb;                      \
                    int first = p0 == 0, last = p1 == nb;                                             \
                    for (Py_ssize_t r = g0; r < g1; r++) {                                            \
                        const uint8_t *w = (const uint8_t *)j->w + r * j->row_bytes;                  \
                        __m512 *k = keep[r - g0];                                                     \
                        switch (n) {                                                                  \
                            case 1: T##_tile_row(w, p0, p1, xs, sxs, k, first, last, outs, r, 1); break; \
                            case 2: T##_tile_row(w, p0, p1, xs, sxs, k, first, last, outs, r, 2); break; \
                            case 3: T##_tile_row(w, p0, p1, xs, sxs, k, first, last, outs, r, 3); break; \
                            default: T##_tile_row(w, p0, p1, xs, sxs, k, first, last, outs, r, 4); break; \
                        }                                                                             \
                    }                                                                                 \
                }                                                                                     \
            }                                                                                         \
        }                                                                                             \
    }

#define TILE_ROWS 8
#define TILE_PANEL 2
TILE_ROW(q4_k, 144)
TILE_ROW(q6_k, 210)
#undef TILE_ROW
#undef TILE_ROWS
#undef TILE_PANEL

#pragma GCC pop_options

T4 static void f16_mv_v4(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *w = (const uint8_t *)j->w + r * j->row_bytes;
        const float *x = j->x;
        __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        Py_ssize_t i = 0;
        for (; i + 64 <= j->cols; i += 64) {
            for (int u = 0; u < 4; u++)
                a[u] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 2 * (i + 16 * u)))),
                                       _mm512_loadu_ps(x + i + 16 * u), a[u]);
        }
        for (; i + 16 <= j->cols; i += 16)
            a[0] = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 2 * i))), _mm512_loadu_ps(x + i), a[0]);
        float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3])));
        for (; i < j->cols; i++) s += _cvtsh_ss(rd16(w + 2 * i)) * x[i];
        j->out[r] = s;
    }
}

T4 static void f16_dq_v4(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *w = (const uint8_t *)j->w + r * j->row_bytes;
        float *y = j->out + r * j->cols;
        Py_ssize_t i = 0;
        for (; i + 16 <= j->cols; i += 16) _mm512_storeu_ps(y + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + 2 * i))));
        for (; i < j->cols; i++) y[i] = _cvtsh_ss(rd16(w + 2 * i));
    }
}

/* ------------------------------------------------------------- AVX2 (x86-64-v3) int8-activation kernels
 * Per 32 weights: vpmaddubsw (unsigned weights x signed x; signed weights through |w| and
 * sign(x, w)) and vpmaddwd by ones give 8 exact int32 sums (no saturation: pairs of at most
 * 128 * 127), converted to fp32 and FMA'd with the sub-block's (d * sc) * s_g. Natural x order. */
T3 static ALWAYS_INLINE __m256 dot32_u_v3(__m256i u, const int8_t *xq) {
    __m256i p = _mm256_maddubs_epi16(u, _mm256_load_si256((const __m256i *)xq));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

T3 static ALWAYS_INLINE __m256 dot32_s_v3(__m256i s, const int8_t *xq) {
    __m256i x = _mm256_load_si256((const __m256i *)xq);
    __m256i p = _mm256_maddubs_epi16(_mm256_abs_epi8(s), _mm256_sign_epi8(x, s));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

/* Split activations on AVX2 (act = 2 where there is no AVX-512 VNNI): the pieces in natural order
 * (xqn + p * cols), per 32 weights vpmaddubsw (unsigned weights x a signed piece; pairs at most
 * 2 * 63 * 128: no saturation) and vpmaddwd by ones per piece, combined by Horner's rule in int32
 * lanes of 4 weights (<= 4 * 63 * |c| < 2^31), converted to fp32 and scaled per sub-block. Q6_K's
 * and Q4_0's quants go in unsigned with the zero point (-32, -8) in corr (-zero * the sum of each
 * lane's c): the q8 kernels' sign trick cannot negate a piece of -128. */
T3 static ALWAYS_INLINE __m256i dot32x3_v3(__m256i u, const int8_t *xq, Py_ssize_t xp) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a = _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)xq)), ones);
    a = _mm256_add_epi32(_mm256_slli_epi32(a, 8),
                         _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(xq + xp))), ones));
    return _mm256_add_epi32(_mm256_slli_epi32(a, 8),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(u, _mm256_loadu_si256((const __m256i *)(xq + 2 * xp))),
                                              ones));
}

/* One 32-weight sub-block's x . u as 8 fp32 lanes (4 weights each): int8 x (P = 1) or the three
 * split pieces of x, xp bytes apart (P = 3). */
T3 static ALWAYS_INLINE __m256 dot32_p_v3(__m256i u, const int8_t *xq, Py_ssize_t xp, const int P) {
    return P == 1 ? dot32_u_v3(u, xq) : _mm256_cvtepi32_ps(dot32x3_v3(u, xq, xp));
}

T3 static ALWAYS_INLINE float hsum8_v3(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Q4_K / Q5_K: 8 factors (d*sc[i]) * s_i into f, and acc[1] -= dmin*m * (s * sum(xq)). */
T3 static ALWAYS_INLINE void k4_factors_v3(const uint8_t *b, const float *sx, const float *xs, float *f, __m256 *acc) {
    uint8_t sm[16];
    k4_scale_min(b + 4, sm, sm + 8);
    __m128i v = _mm_loadu_si128((const __m128i *)sm);
    __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
    __m256 mn = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(v, 8)));
    __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(b))), dmin = _mm256_set1_ps(_cvtsh_ss(rd16(b + 2)));
    _mm256_store_ps(f, _mm256_mul_ps(_mm256_mul_ps(d, sc), _mm256_loadu_ps(sx)));
    acc[1] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, mn), _mm256_loadu_ps(xs), acc[1]);
}

/* Q4_K with int8 x (P = 1) or split x (P = 3, pieces xp bytes apart). */
T3 static ALWAYS_INLINE void q4_k_p_v3(const uint8_t *b, const int8_t *xq, Py_ssize_t xp, const float *sx,
                                       const float *xs, __m256 *acc, const int P) {
    float f[8] __attribute__((aligned(32)));
    k4_factors_v3(b, sx, xs, f, acc);
    const __m256i m0f = _mm256_set1_epi8(0x0F);
#pragma GCC unroll 4
    for (int jj = 0; jj < 4; jj++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)(b + 16 + 32 * jj));
        __m256 lo = dot32_p_v3(_mm256_and_si256(q, m0f), xq + 64 * jj, xp, P);
        __m256 hi = dot32_p_v3(_mm256_and_si256(_mm256_srli_epi16(q, 4), m0f), xq + 64 * jj + 32, xp, P);
        acc[0] = _mm256_fmadd_ps(lo, _mm256_broadcast_ss(f + 2 * jj), acc[0]);
        acc[1] = _mm256_fmadd_ps(hi, _mm256_broadcast_ss(f + 2 * jj + 1), acc[1]);
    }
}

T3 static ALWAYS_INLINE void q4_k_q8_v3(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs,
                                        __m256 *acc) {
    q4_k_p_v3(b, xq, 0, sx, xs, acc, 1);
}

/* bit j of h (bytes) moved to bit 4 (j a constant after unrolling) */
#define QH_BIT4_V3(h, j) ((j) < 4 ? _mm256_slli_epi16(h, 4 - (j)) : (j) == 4 ? (h) : _mm256_srli_epi16(h, (j) - 4))

/* Q5_K with int8 x (P = 1) or split x (P = 3). */
T3 static ALWAYS_INLINE void q5_k_p_v3(const uint8_t *b, const int8_t *xq, Py_ssize_t xp, const float *sx,
                                       const float *xs, __m256 *acc, const int P) {
    float f[8] __attribute__((aligned(32)));
    k4_factors_v3(b, sx, xs, f, acc);
    const __m256i m0f = _mm256_set1_epi8(0x0F), m10 = _mm256_set1_epi8(0x10);
    const __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 16));
#pragma GCC unroll 4
    for (int jj = 0; jj < 4; jj++) {
        __m256i q = _mm256_loadu_si256((const __m256i *)(b + 48 + 32 * jj));
        __m256i l = _mm256_or_si256(_mm256_and_si256(q, m0f), _mm256_and_si256(QH_BIT4_V3(qh, 2 * jj), m10));
        __m256i h = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 4), m0f),
                                    _mm256_and_si256(QH_BIT4_V3(qh, 2 * jj + 1), m10));
        acc[0] = _mm256_fmadd_ps(dot32_p_v3(l, xq + 64 * jj, xp, P), _mm256_broadcast_ss(f + 2 * jj), acc[0]);
        acc[1] = _mm256_fmadd_ps(dot32_p_v3(h, xq + 64 * jj + 32, xp, P), _mm256_broadcast_ss(f + 2 * jj + 1),
                                 acc[1]);
    }
}

T3 static ALWAYS_INLINE void q5_k_q8_v3(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs,
                                        __m256 *acc) {
    q5_k_p_v3(b, xq, 0, sx, xs, acc, 1);
}

/* A Q6_K block's factors d * sc[s] * s_(s/2) of its 16 sub-blocks (F[n]: sub-blocks 8n .. 8n+7) and
 * the unsigned quants of weights 128n + 32k in q[k]. */
T3 static ALWAYS_INLINE void q6_k_factors_v3(const uint8_t *b, const float *sx, __m256 F[2]) {
    __m128i sc8 = _mm_loadu_si128((const __m128i *)(b + 192));
    __m256 d = _mm256_set1_ps(_cvtsh_ss(rd16(b + 208)));
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
    __m256 s0 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sx)), dup);
    __m256 s1 = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sx + 4)), dup);
    F[0] = _mm256_mul_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc8))), s0);
    F[1] = _mm256_mul_ps(_mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(sc8, 8)))), s1);
}

T3 static ALWAYS_INLINE void q6_k_quants_v3(const uint8_t *b, int n, __m256i q[4]) {
    const __m256i m0f = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    __m256i ql0 = _mm256_loadu_si256((const __m256i *)(b + 64 * n));
    __m256i ql1 = _mm256_loadu_si256((const __m256i *)(b + 64 * n + 32));
    __m256i qh = _mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n));
    q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m0f), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
    q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m0f), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
    q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m0f), _mm256_and_si256(qh, m30));
    q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m0f),
                           _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
}

/* The factor of sub-blocks 8n + 2k (lanes 0-3) and 8n + 2k + 1 (lanes 4-7). */
#define Q6K_FK_V3(F, n, k)                                                                              \
    _mm256_permutevar8x32_ps(F[n], _mm256_setr_epi32(2 * (k), 2 * (k), 2 * (k), 2 * (k), 2 * (k) + 1, 2 * (k) + 1, \
                                                     2 * (k) + 1, 2 * (k) + 1))

T3 static ALWAYS_INLINE void q6_k_q8_v3(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs,
                                        __m256 *acc) {
    (void)xs;
    const __m256i k32 = _mm256_set1_epi8(32);
    __m256 F[2];
    q6_k_factors_v3(b, sx, F);
#pragma GCC unroll 2
    for (int n = 0; n < 2; n++) {
        __m256i q[4];
        q6_k_quants_v3(b, n, q);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) /* weights 128n + 32k: sub-blocks 8n + 2k, 8n + 2k + 1 */
            acc[k & 1] = _mm256_fmadd_ps(dot32_s_v3(_mm256_sub_epi8(q[k], k32), xq + 128 * n + 32 * k),
                                         Q6K_FK_V3(F, n, k), acc[k & 1]);
    }
}

T3 static ALWAYS_INLINE void q8_0_q8_v3(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs,
                                        __m256 *acc) {
    (void)xs;
    __m256 dx = _mm256_set1_ps(_cvtsh_ss(rd16(b)) * sx[0]);
    acc[0] = _mm256_fmadd_ps(dot32_s_v3(_mm256_loadu_si256((const __m256i *)(b + 2)), xq), dx, acc[0]);
}

T3 static ALWAYS_INLINE void q4_0_q8_v3(const uint8_t *b, const int8_t *xq, const float *sx, const float *xs,
                                        __m256 *acc) {
    (void)xs;
    __m128i q = _mm_loadu_si128((const __m128i *)(b + 2)), m = _mm_set1_epi8(0x0F);
    __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
    __m256 dx = _mm256_set1_ps(_cvtsh_ss(rd16(b)) * sx[0]);
    acc[0] = _mm256_fmadd_ps(dot32_s_v3(_mm256_sub_epi8(w, _mm256_set1_epi8(8)), xq), dx, acc[0]);
}

/* Row loops (Q8_0 / Q4_0: two blocks per step, one per accumulator). */
#define V3Q8_ROWS(T, BS, TS)                                                                           \
    T3 static void T##_q8mv_v3(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {                    \
        const Py_ssize_t nb = j->cols / BS;                                                           \
        const q8x *qx = j->qx;                                                                        \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;                              \
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};                               \
            Py_ssize_t ib = 0;                                                                        \
            if (BS == 32)                                                                             \
                for (; ib + 2 <= nb; ib += 2) {                                                       \
                    T##_q8_v3(b + ib * TS, qx->xqn + ib * 32, qx->sxn + ib, NULL, acc);               \
                    T##_q8_v3(b + (ib + 1) * TS, qx->xqn + (ib + 1) * 32, qx->sxn + ib + 1, NULL, acc + 1); \
                }                                                                                     \
            for (; ib < nb; ib++)                                                                     \
                T##_q8_v3(b + ib * TS, qx->xqn + ib * BS, qx->sxn + ib * (BS / 32),                   \
                          qx->xsn ? qx->xsn + ib * (BS / 32) : NULL, acc);                            \
            j->out[r] = hsum8_v3(_mm256_add_ps(acc[0], acc[1]));                                      \
        }                                                                                             \
    }
V3Q8_ROWS(q8_0, 32, 34)
V3Q8_ROWS(q4_0, 32, 18)
V3Q8_ROWS(q4_k, 256, 144)
V3Q8_ROWS(q5_k, 256, 176)
V3Q8_ROWS(q6_k, 256, 210)

T3 static ALWAYS_INLINE void q4_k_x3_v3(const uint8_t *b, const int8_t *xq, Py_ssize_t xp, const float *sx,
                                        const float *xs, __m256 *acc) {
    q4_k_p_v3(b, xq, xp, sx, xs, acc, 3);
}

T3 static ALWAYS_INLINE void q5_k_x3_v3(const uint8_t *b, const int8_t *xq, Py_ssize_t xp, const float *sx,
                                        const float *xs, __m256 *acc) {
    q5_k_p_v3(b, xq, xp, sx, xs, acc, 3);
}

T3 static ALWAYS_INLINE void q6_k_x3_v3(const uint8_t *b, const int8_t *xq, Py_ssize_t xp, const int32_t *corr,
                                        const float *sx, __m256 *acc) {
    __m256 F[2];
    q6_k_factors_v3(b, sx, F);
#pragma GCC unroll 2
    for (int n = 0; n < 2; n++) {
        __m256i q[4];
        q6_k_quants_v3(b, n, q);
#pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            __m256i a = _mm256_add_epi32(dot32x3_v3(q[k], xq + 128 * n + 32 * k, xp),
                                         _mm256_loadu_si256((const __m256i *)(corr + 32 * n + 8 * k)));
            acc[k & 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), Q6K_FK_V3(F, n, k), acc[k & 1]);
        }
    }
}

/* Q4_0 (32 weights): unsigned nibbles, the -8 zero point in corr; one scale d * S per block. */
T3 static ALWAYS_INLINE void q4_0_x3_v3(const uint8_t *b, const int8_t *xq, Py_ssize_t xp, const int32_t *corr,
                                        const float *sx, __m256 *acc) {
    __m128i q = _mm_loadu_si128((const __m128i *)(b + 2)), m = _mm_set1_epi8(0x0F);
    __m256i w = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
    __m256i a = _mm256_add_epi32(dot32x3_v3(w, xq, xp), _mm256_loadu_si256((const __m256i *)corr));
    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), _mm256_set1_ps(_cvtsh_ss(rd16(b)) * sx[0]), *acc);
}

T3 static void q4_0_x3mv_v3(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    const Py_ssize_t nb = j->cols / 32;
    const q8x *qx = j->qx;
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;
        __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
        Py_ssize_t ib = 0;
        for (; ib + 2 <= nb; ib += 2) {
            q4_0_x3_v3(b + ib * 18, qx->xqn + 32 * ib, j->cols, qx->corr + 8 * ib, qx->sxn + ib, acc);
            q4_0_x3_v3(b + (ib + 1) * 18, qx->xqn + 32 * (ib + 1), j->cols, qx->corr + 8 * (ib + 1), qx->sxn + ib + 1,
                       acc + 1);
        }
        for (; ib < nb; ib++) q4_0_x3_v3(b + ib * 18, qx->xqn + 32 * ib, j->cols, qx->corr + 8 * ib, qx->sxn + ib, acc);
        j->out[r] = hsum8_v3(_mm256_add_ps(acc[0], acc[1]));
    }
}

#define V3X3_ROWS(T, TS, CALL)                                                                         \
    T3 static void T##_x3mv_v3(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {                    \
        const Py_ssize_t nb = j->cols / 256;                                                          \
        const q8x *qx = j->qx;                                                                        \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;                              \
            __m256 acc[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};                               \
            for (Py_ssize_t ib = 0; ib < nb; ib++, b += TS) CALL;                                     \
            j->out[r] = hsum8_v3(_mm256_add_ps(acc[0], acc[1]));                                      \
        }                                                                                             \
    }
V3X3_ROWS(q4_k, 144, q4_k_x3_v3(b, qx->xqn + 256 * ib, j->cols, qx->sxn + 8 * ib, qx->xsn + 8 * ib, acc))
V3X3_ROWS(q5_k, 176, q5_k_x3_v3(b, qx->xqn + 256 * ib, j->cols, qx->sxn + 8 * ib, qx->xsn + 8 * ib, acc))
V3X3_ROWS(q6_k, 210, q6_k_x3_v3(b, qx->xqn + 256 * ib, j->cols, qx->corr + 64 * ib, qx->sxn + 8 * ib, acc))
#undef V3X3_ROWS

/* ------------------------------------------------------------- AVX-512 VNNI int8-activation kernels
 * vpdpbusd multiplies unsigned weight bytes by the signed int8 x: weights with a zero point (Q4_0,
 * Q6_K) are taken as unsigned and the accumulator starts at -offset * sum(xq) of its lane
 * (q8x.corr); Q8_0's signed quants go in as |q| against sign(q) * x. The int32 sums are exact. Four 16-lane sums are
 * reduced to one vector of 16 sub-block (or block) sums (red4), converted to fp32 once and FMA'd with
 * the lane's (d * sc) * s_g. x is laid out per type so that each weight vector is one load. */
#define T4V __attribute__((target("arch=x86-64-v4,avx512vnni")))

/* Lane 4c+e = the sum of 128-bit chunk c of a_e. */
T4V static ALWAYS_INLINE __m512i red4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
}

/* Q4_K / Q5_K: [d*sc[0..7], dmin*m[0..7]] (the scales unpacked in a vector: get_scale_min_k4). */
T4V static ALWAYS_INLINE __m512 k4_dmv_q8(const uint8_t *b) {
    __m128i s = _mm_loadu_si128((const __m128i *)(b + 4)); /* 12 scale bytes + 4 of the quants */
    __m128i a = _mm_shuffle_epi8(s, _mm_setr_epi8(0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11));
    __m128i h = _mm_shuffle_epi8(s, _mm_setr_epi8(-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7));
    a = _mm_mask_blend_epi8(0xF000, a, _mm_srli_epi16(a, 4));
    __m128i lo = _mm_and_si128(a, _mm_setr_epi8(63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15));
    __m128i sm = _mm_or_si128(lo, _mm_and_si128(_mm_srli_epi16(h, 2), _mm_set1_epi8(0x30)));
    int32_t dd32;
    memcpy(&dd32, b, 4);
    __m512 dd = _mm512_permutexvar_ps(_mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
                                      _mm512_castps128_ps512(_mm_cvtph_ps(_mm_cvtsi32_si128(dd32))));
    return _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sm)), dd);
}

/* Q4_K / Q5_K weight vectors hold sub-blocks [0|2], [1|3], [4|6], [5|7]: red4's lane 4c+e is
 * sub-block K4_SB(e) + 2 * (c >= 2). */
#define K4_LANE_SB _mm512_setr_epi32(0, 1, 4, 5, 0, 1, 4, 5, 2, 3, 6, 7, 2, 3, 6, 7)

T4V static ALWAYS_INLINE void k4_q8_finish(__m512 dmv, __m512i a0, __m512i a1, __m512i a2, __m512i a3,
                                           const float *sxl, const float *aux, __m512 *acc) {
    __m512 f = _mm512_mul_ps(_mm512_permutexvar_ps(K4_LANE_SB, dmv), _mm512_load_ps(sxl));
    acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(red4(a0, a1, a2, a3)), f, acc[0]);
    acc[1] = _mm512_fnmadd_ps(dmv, _mm512_load_ps(aux), acc[1]); /* - dmin*m * s * sum(xq) */
}

/* A Q4_K block's [d*sc, dmin*m] and its nibbles as the four weight vectors u[0..3] (sub-blocks [0|2],
 * [1|3], [4|6], [5|7]): shared by the int8 and split kernels (and by every x row of a split tile). */
T4V static ALWAYS_INLINE void q4_k_quants_vnni(const uint8_t *b, __m512 *dmv, __m512i u[4]) {
    *dmv = k4_dmv_q8(b);
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    __m512i w0 = _mm512_loadu_si512((const void *)(b + 16)), w1 = _mm512_loadu_si512((const void *)(b + 80));
    u[0] = _mm512_and_si512(w0, m0f);
    u[1] = _mm512_and_si512(_mm512_srli_epi16(w0, 4), m0f);
    u[2] = _mm512_and_si512(w1, m0f);
    u[3] = _mm512_and_si512(_mm512_srli_epi16(w1, 4), m0f);
}

T4V static ALWAYS_INLINE void q4_k_q8_v4(const uint8_t *b, const int8_t *xq, const float *sxl, const float *aux,
                                         __m512 *acc) {
    __m512 dmv;
    __m512i u[4], a[4];
    q4_k_quants_vnni(b, &dmv, u);
    for (int i = 0; i < 4; i++)
        a[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[i], _mm512_load_si512((const void *)(xq + 64 * i)));
    k4_q8_finish(dmv, a[0], a[1], a[2], a[3], sxl, aux, acc);
}

/* bytes 0-31 = a, 32-63 = b */
#define HALVES8(a, b) _mm512_inserti64x4(_mm512_set1_epi8((char)(a)), _mm256_set1_epi8((char)(b)), 1)

/* A Q5_K block's [d*sc, dmin*m] and its 5-bit quants as four weight vectors (as Q4_K's). */
T4V static ALWAYS_INLINE void q5_k_quants_vnni(const uint8_t *b, __m512 *dmv, __m512i q[4]) {
    *dmv = k4_dmv_q8(b);
    const __m512i m0f = _mm512_set1_epi8(0x0F), k16 = _mm512_set1_epi8(16);
    __m512i hq = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 16)));
    __m512i w0 = _mm512_loadu_si512((const void *)(b + 48)), w1 = _mm512_loadu_si512((const void *)(b + 112));
    /* sub-block j's fifth bit is bit j of qh */
    q[0] = _mm512_and_si512(w0, m0f), q[1] = _mm512_and_si512(_mm512_srli_epi16(w0, 4), m0f);
    q[2] = _mm512_and_si512(w1, m0f), q[3] = _mm512_and_si512(_mm512_srli_epi16(w1, 4), m0f);
    q[0] = _mm512_mask_add_epi8(q[0], _mm512_test_epi8_mask(hq, HALVES8(0x01, 0x04)), q[0], k16);
    q[1] = _mm512_mask_add_epi8(q[1], _mm512_test_epi8_mask(hq, HALVES8(0x02, 0x08)), q[1], k16);
    q[2] = _mm512_mask_add_epi8(q[2], _mm512_test_epi8_mask(hq, HALVES8(0x10, 0x40)), q[2], k16);
    q[3] = _mm512_mask_add_epi8(q[3], _mm512_test_epi8_mask(hq, HALVES8(0x20, 0x80)), q[3], k16);
}

T4V static ALWAYS_INLINE void q5_k_q8_v4(const uint8_t *b, const int8_t *xq, const float *sxl, const float *aux,
                                         __m512 *acc) {
    __m512 dmv;
    __m512i q[4], a[4];
    q5_k_quants_vnni(b, &dmv, q);
    for (int i = 0; i < 4; i++)
        a[i] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[i], _mm512_load_si512((const void *)(xq + 64 * i)));
    k4_q8_finish(dmv, a[0], a[1], a[2], a[3], sxl, aux, acc);
}

/* Q6_K: unsigned 6-bit quants (weight order, as q6_k_block_v4 builds them) against x, the -32 zero
 * point in corr; red4's lane 4c+e is 16-weight sub-block 4e+c. */
/* A Q6_K block's unsigned 6-bit quants as four weight vectors z[0..3] and d * sc per lane of red4's
 * result: shared by the int8 and split kernels (and by every x row of a split tile). */
T4V static ALWAYS_INLINE void q6_k_quants_vnni(const uint8_t *b, __m512i z[4], __m512 *dsc) {
    const __m512i m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30);
    const __m512i sh01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i sh23 = _mm512_inserti64x4(_mm512_set1_epi16(0), _mm256_set1_epi16(2), 1);
#pragma GCC unroll 2
    for (int n = 0; n < 2; n++) {
        __m512i ql = _mm512_loadu_si512((const void *)(b + 64 * n));
        __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(b + 128 + 32 * n)));
        __m512i h01 = _mm512_and_si512(_mm512_sllv_epi16(qh, sh01), m30);
        __m512i h23 = _mm512_and_si512(_mm512_srlv_epi16(qh, sh23), m30);
        z[2 * n] = _mm512_ternarylogic_epi32(ql, m0f, h01, 0xEA); /* (a&b)|c */
        z[2 * n + 1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(ql, 4), m0f, h23, 0xEA);
    }
    __m128i sc8 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(b + 192)),
                                   _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    *dsc = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(sc8)), _mm512_set1_ps(_cvtsh_ss(rd16(b + 208))));
}

T4V static ALWAYS_INLINE void q6_k_q8_v4(const uint8_t *b, const int8_t *xq, const int32_t *corr, const float *sxl,
                                         __m512 *acc) {
    __m512i z[4], a[4];
    __m512 dsc;
    q6_k_quants_vnni(b, z, &dsc);
    for (int i = 0; i < 4; i++)
        a[i] = _mm512_dpbusd_epi32(_mm512_load_si512((const void *)(corr + 16 * i)), z[i],
                                   _mm512_load_si512((const void *)(xq + 64 * i)));
    acc[0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(red4(a[0], a[1], a[2], a[3])), _mm512_mul_ps(dsc, _mm512_load_ps(sxl)),
                             acc[0]);
}

/* Q8_0, two blocks (68 bytes, `n` of them present): signed quants as |q| (unsigned) against
 * x * sign(q); lanes 0-7 block 0, 8-15 block 1 (a missing block: zero quants and scale). */
T4V static ALWAYS_INLINE void q8_0_q8_v4(const uint8_t *b, int n, const int8_t *xq, const int32_t *corr,
                                         const float *sxl, __m512 *acc) {
    (void)corr;
    __m256i w0 = _mm256_loadu_si256((const __m256i *)(b + 2));
    __m256 f0 = _mm256_set1_ps(_cvtsh_ss(rd16(b)) * sxl[0]);
    __m512i w;
    __m512 f;
    if (n == 2) {
        w = _mm512_inserti64x4(_mm512_castsi256_si512(w0), _mm256_loadu_si256((const __m256i *)(b + 36)), 1);
        f = _mm512_insertf32x8(_mm512_castps256_ps512(f0), _mm256_set1_ps(_cvtsh_ss(rd16(b + 34)) * sxl[8]), 1);
    } else {
        w = _mm512_zextsi256_si512(w0);
        f = _mm512_zextps256_ps512(f0);
    }
    __m512i x = _mm512_load_si512((const void *)xq);
    x = _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x); /* -x where q < 0 */
    __m512i s = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), x);
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), f, *acc);
}

/* Q4_0, four blocks (72 bytes, `n` of them present): the 4 x 16 quant bytes gathered into one vector;
 * low nibbles against x laid out [blocks' x0-15], high ones against [x16-31]; corr holds -8 * sum(xq);
 * lanes 4k..4k+3 are block k. */
T4V static ALWAYS_INLINE void q4_0_quants_vnni(const uint8_t *b, int n, __m512i *lo, __m512i *hi, __m512 *d) {
    __m512i raw, tail;
    if (n == 4) {
        raw = _mm512_loadu_si512((const void *)b);
        tail = _mm512_castsi128_si512(_mm_loadl_epi64((const __m128i *)(b + 64)));
    } else {
        raw = _mm512_maskz_loadu_epi8((1ULL << (18 * n)) - 1, b);
        tail = _mm512_setzero_si512();
    }
    /* block k's quants: words 9k+1 .. 9k+8 */
    const __m512i iw = _mm512_setr_epi32(0x00020001, 0x00040003, 0x00060005, 0x00080007, 0x000B000A, 0x000D000C,
                                         0x000F000E, 0x00110010, 0x00140013, 0x00160015, 0x00180017, 0x001A0019,
                                         0x001D001C, 0x001F001E, 0x00210020, 0x00230022);
    const __m512i m0f = _mm512_set1_epi8(0x0F);
    __m512i q = _mm512_permutex2var_epi16(raw, iw, tail);
    *lo = _mm512_and_si512(q, m0f);
    *hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), m0f);
    /* words 4k..4k+3 = d of block k (word 9k) */
    const __m512i id = _mm512_setr_epi32(0, 0, 0x00090009, 0x00090009, 0x00120012, 0x00120012, 0x001B001B,
                                         0x001B001B, 0, 0, 0, 0, 0, 0, 0, 0);
    *d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(id, raw)));
}

T4V static ALWAYS_INLINE void q4_0_q8_v4(const uint8_t *b, int n, const int8_t *xq, const int32_t *corr,
                                         const float *sxl, __m512 *acc) {
    __m512i lo, hi;
    __m512 d;
    q4_0_quants_vnni(b, n, &lo, &hi, &d);
    __m512i s = _mm512_dpbusd_epi32(_mm512_load_si512((const void *)corr), lo, _mm512_load_si512((const void *)xq));
    s = _mm512_dpbusd_epi32(s, hi, _mm512_load_si512((const void *)(xq + 64)));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_load_ps(sxl)), *acc);
}

/* Row loops. K-types: per 256-weight block 256 bytes of xq (768 with split activations) and 16 scales
 * (+ 64 ints of corr for Q6_K, 16 floats of aux for Q4_K / Q5_K). */
#define V4Q8_K_ROWS(FN, TS, CALL)                                                                      \
    T4V static void FN(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {                           \
        const Py_ssize_t nb = j->cols / 256;                                                          \
        const q8x *qx = j->qx;                                                                        \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;                              \
            __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};                               \
            for (Py_ssize_t ib = 0; ib < nb; ib++, b += TS) {                                         \
                PF_LINES(TS);                                                                         \
                CALL;                                                                                 \
            }                                                                                         \
            j->out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));                          \
        }                                                                                             \
    }
V4Q8_K_ROWS(q4_k_q8mv_v4, 144, q4_k_q8_v4(b, qx->xq + 256 * ib, qx->sxl + 16 * ib, qx->aux + 16 * ib, acc))
V4Q8_K_ROWS(q5_k_q8mv_v4, 176, q5_k_q8_v4(b, qx->xq + 256 * ib, qx->sxl + 16 * ib, qx->aux + 16 * ib, acc))
V4Q8_K_ROWS(q6_k_q8mv_v4, 210, q6_k_q8_v4(b, qx->xq + 256 * ib, qx->corr + 64 * ib, qx->sxl + 16 * ib, acc))

/* Q8_0 / Q4_0: G blocks per step (the last step may be partial), two accumulators. */
#define V4Q8_SMALL_ROWS(T, TS, G)                                                                      \
    T4V static void T##_q8mv_v4(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {                   \
        const Py_ssize_t nb = j->cols / 32;                                                           \
        const q8x *qx = j->qx;                                                                        \
        for (Py_ssize_t r = r0; r < r1; r++) {                                                        \
            const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;                              \
            const int8_t *xq = qx->xq;                                                                \
            const int32_t *corr = qx->corr;                                                           \
            const float *sxl = qx->sxl;                                                               \
            __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};                               \
            Py_ssize_t ib = 0;                                                                        \
            for (; ib + 2 * G <= nb; ib += 2 * G, b += 2 * G * TS, xq += 64 * G, corr += 32, sxl += 32) { \
                PF_LINES(2 * G * TS);                                                                 \
                T##_q8_v4(b, G, xq, corr, sxl, acc);                                                  \
                T##_q8_v4(b + G * TS, G, xq + 32 * G, corr + 16, sxl + 16, acc + 1);                  \
            }                                                                                         \
            for (; ib < nb; ib += G, b += G * TS, xq += 32 * G, corr += 16, sxl += 16)                \
                T##_q8_v4(b, nb - ib < G ? (int)(nb - ib) : G, xq, corr, sxl, acc);                   \
            j->out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));                          \
        }                                                                                             \
    }
V4Q8_SMALL_ROWS(q8_0, 34, 2)
V4Q8_SMALL_ROWS(q4_0, 18, 4)

/* q8_quantize, vectorised (the same operations, so the same result). */
/* q8_group_scale of the 32 values v0, v1. */
T4V static ALWAYS_INLINE float q8_group_scale_v4(__m512 v0, __m512 v1) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    __m512i a = _mm512_max_epu32(_mm512_and_si512(_mm512_castps_si512(v0), abs_mask),
                                 _mm512_and_si512(_mm512_castps_si512(v1), abs_mask));
    return q8_scale_of_max(_mm512_reduce_max_epu32(a));
}

T4V static void q8_quantize_v4(const float *x, Py_ssize_t cols, int8_t *xq, float *sx) {
    const __m512 lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
    for (Py_ssize_t g = 0; g < cols / 32; g++, x += 32, xq += 32) {
        __m512 v0 = _mm512_loadu_ps(x), v1 = _mm512_loadu_ps(x + 16);
        float d = q8_group_scale_v4(v0, v1);
        sx[g] = d;
        if (!(d > 0.f)) {
            memset(xq, 0, 32);
            continue;
        }
        __m512 id = _mm512_set1_ps(1.f / d);
        __m512 q0 = _mm512_roundscale_ps(_mm512_mul_ps(v0, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 q1 = _mm512_roundscale_ps(_mm512_mul_ps(v1, id), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        q0 = _mm512_min_ps(_mm512_max_ps(q0, lo), hi);
        q1 = _mm512_min_ps(_mm512_max_ps(q1, lo), hi);
        _mm_storeu_si128((__m128i *)xq, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q0)));
        _mm_storeu_si128((__m128i *)(xq + 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(q1)));
    }
}

/* The x layouts of the kernels above (after q8_quantize; zero padding to whole 256-value groups). */
T4V static void q8_layout_v4(int type, q8x *qx, Py_ssize_t cols) {
    const Py_ssize_t padded = (cols + 255) / 256 * 256, ng = cols / 32;
    const int8_t *xn = qx->xqn;
    const float *sn = qx->sxn;
    int8_t *xq = qx->xq;
    float *sxl = qx->sxl;
    switch (type) {
    case GT_Q4_K:
    case GT_Q5_K: { /* per 256: sub-blocks [0, 2, 1, 3, 4, 6, 5, 7]; 16 lane scales */
        static const int ord[8] = {0, 2, 1, 3, 4, 6, 5, 7}, base[4] = {0, 1, 4, 5};
        for (Py_ssize_t B = 0; B < cols / 256; B++) {
            for (int p = 0; p < 8; p++) memcpy(xq + 256 * B + 32 * p, xn + 256 * B + 32 * ord[p], 32);
            for (int L = 0; L < 16; L++) sxl[16 * B + L] = sn[8 * B + base[L & 3] + 2 * ((L >> 2) >> 1)];
        }
        return;
    }
    case GT_Q6_K: /* per 256: x as it is; 16 lane scales (lane 4c+e: sub-block 4e+c) */
        memcpy(xq, xn, (size_t)cols);
        for (Py_ssize_t B = 0; B < cols / 256; B++)
            for (int L = 0; L < 16; L++) sxl[16 * B + L] = sn[8 * B + ((4 * (L & 3) + (L >> 2)) >> 1)];
        break;
    case GT_Q8_0: /* per 64: x as it is; lanes 0-7 scale of block 0, 8-15 of block 1 */
        memcpy(xq, xn, (size_t)cols);
        memset(xq + cols, 0, (size_t)(padded - cols));
        memset(sxl + cols / 4, 0, (size_t)(padded - cols));
        for (Py_ssize_t g = 0; g < ng; g++)
            for (int i = 0; i < 8; i++) sxl[8 * g + i] = sn[g];
        break;
    case GT_Q4_0: /* per 128 (4 blocks): [x0-15 of each block], [x16-31 of each]; lanes 4k..4k+3 block k */
        memset(xq, 0, (size_t)padded);
        memset(sxl + cols / 8, 0, (size_t)(padded - cols) / 2);
        for (Py_ssize_t g = 0; g < ng; g++) {
            int8_t *o = xq + 128 * (g / 4) + 16 * (g % 4);
            memcpy(o, xn + 32 * g, 16);
            memcpy(o + 64, xn + 32 * g + 16, 16);
            for (int i = 0; i < 4; i++) sxl[4 * g + i] = sn[g];
        }
        break;
    }
    if (type == GT_Q8_0) return; /* its kernel takes signs instead of a zero point */
    /* corr: -zero point * the sum of each lane's activations (both halves for Q4_0) */
    const __m512i ones = _mm512_set1_epi8(1), z = _mm512_setzero_si512();
    if (type == GT_Q4_0) {
        for (Py_ssize_t i = 0; i < padded / 128; i++) {
            __m512i t = _mm512_dpbusd_epi32(z, ones, _mm512_load_si512((const void *)(xq + 128 * i)));
            t = _mm512_dpbusd_epi32(t, ones, _mm512_load_si512((const void *)(xq + 128 * i + 64)));
            _mm512_store_si512((void *)(qx->corr + 16 * i), _mm512_sub_epi32(z, _mm512_slli_epi32(t, 3)));
        }
    } else {
        for (Py_ssize_t i = 0; i < padded / 64; i++) { /* Q6_K: -32 */
            __m512i t = _mm512_dpbusd_epi32(z, ones, _mm512_load_si512((const void *)(xq + 64 * i)));
            _mm512_store_si512((void *)(qx->corr + 16 * i), _mm512_sub_epi32(z, _mm512_slli_epi32(t, 5)));
        }
    }
}

/* ------------------------------------------------------------- split activations (act = 2)
 * The fp32-accurate product through the int8 kernels: x is split per 32 values g into three int8
 * pieces with one fp32 scale, x ~= S_g * c, c = 65536 * x1 + 256 * x2 + x3 (an integer of 24
 * significant bits; |x - S_g * c| <= S_g / 2, or S_g where x3 was clamped, and S_g =
 * max|x_g| / (127 * 65536) ~= max|x_g| * 2^-23: about an ulp of the group's largest value), and each
 * row is computed from the integer sums
 * sum_k q_k * c_k, formed exactly in int32 by Horner's rule over the pieces (vpdpbusd on x1, shift
 * by 8, vpdpbusd on x2, shift, vpdpbusd on x3: wrapping arithmetic, exact because the final sum
 * fits), converted to fp32 once per lane or sub-block and scaled by (d * sc) * S in fp32. The
 * K-types' min term multiplies the sub-block sums of the same S * c (so the product is
 * W @ (S * c) to fp32 rounding, with no cancellation between the two terms). Int32 range: |c| <=
 * 127 * 65536 + 128 * 257 = 8,355,968; a Q4_K 16-weight sum <= 16 * 15 * |c| < 2^31 (reduced in
 * int32), Q5_K / Q6_K 4-weight lanes <= 4 * 32 * |c| < 2^31 (converted to fp32 before the
 * reduction), Q4_0 8-weight lanes <= 8 * 8 * |c|. Q8_0 (4 * 127 * |c| >= 2^31) keeps the fp32
 * kernel. */

/* x -> pieces (xq, xq + cols, xq + 2 * cols) and S per 32 values, as documented in
 * runtime/quant_kernels.split_activations (the same IEEE operations, so the same bits). */
T4V static void x3_split_v4(const float *x, Py_ssize_t cols, int8_t *xq, float *sx) {
    const __m512 lo1 = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f), lo = _mm512_set1_ps(-128.f);
    for (Py_ssize_t g = 0; g < cols / 32; g++) {
        const float *v = x + 32 * g;
        __m512 v0 = _mm512_loadu_ps(v), v1 = _mm512_loadu_ps(v + 16);
        float s1 = q8_group_scale_v4(v0, v1);
        if (!(s1 > 0.f)) {
            sx[g] = s1;
            for (int p = 0; p < 3; p++) memset(xq + p * cols + 32 * g, 0, 32);
            continue;
        }
        sx[g] = s1 * 0x1p-16f;
        const float id = 1.f / s1;
        const __m512 S1 = _mm512_set1_ps(s1), S2 = _mm512_set1_ps(s1 * 0x1p-8f);
        const __m512 ID = _mm512_set1_ps(id), K2 = _mm512_set1_ps(id * 0x1p8f), K3 = _mm512_set1_ps(id * 0x1p16f);
        for (int h = 0; h < 2; h++) {
            __m512 vv = h ? v1 : v0;
            __m512 x1 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(vv, ID), 8), lo1), hi);
            __m512 r1 = _mm512_fnmadd_ps(x1, S1, vv);
            __m512 x2 = _mm512_roundscale_ps(_mm512_mul_ps(r1, K2), 8);
            /* x2 = 128 (r1 at +S1 / 2): one more in x1, x2 from the new remainder (about -128) */
            __mmask16 up = _mm512_cmp_ps_mask(x2, hi, _CMP_GT_OQ) & _mm512_cmp_ps_mask(x1, hi, _CMP_LT_OQ);
            x1 = _mm512_mask_add_ps(x1, up, x1, _mm512_set1_ps(1.f));
            r1 = _mm512_fnmadd_ps(x1, S1, vv);
            x2 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(r1, K2), 8), lo), hi);
            __m512 r2 = _mm512_fnmadd_ps(x2, S2, r1);
            __m512 x3 = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(_mm512_mul_ps(r2, K3), 8), lo), hi);
            int8_t *o = xq + 32 * g + 16 * h;
            _mm_storeu_si128((__m128i *)o, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(x1)));
            _mm_storeu_si128((__m128i *)(o + cols), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(x2)));
            _mm_storeu_si128((__m128i *)(o + 2 * cols), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(x3)));
        }
    }
}

/* w . c over the three pieces of x (xp bytes apart), Horner's rule in int32. */
T4V static ALWAYS_INLINE __m512i dp3(__m512i a, __m512i w, const int8_t *xq, Py_ssize_t xp) {
    a = _mm512_dpbusd_epi32(a, w, _mm512_load_si512((const void *)xq));
    a = _mm512_dpbusd_epi32(_mm512_slli_epi32(a, 8), w, _mm512_load_si512((const void *)(xq + xp)));
    return _mm512_dpbusd_epi32(_mm512_slli_epi32(a, 8), w, _mm512_load_si512((const void *)(xq + 2 * xp)));
}

/* red4 in fp32 (lane 4c+e = the sum of 128-bit chunk c of a_e). */
T4V static ALWAYS_INLINE __m512 red4_ps(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    return _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t01), _mm512_castps_pd(t23))));
}

T4V static ALWAYS_INLINE void q4_k_x3_row(__m512 dmv, const __m512i u[4], const int8_t *xq, const float *sxl,
                                          const float *aux, __m512 *acc) {
    const __m512i z = _mm512_setzero_si512();
    __m512i a0 = dp3(z, u[0], xq, 256), a1 = dp3(z, u[1], xq + 64, 256);
    __m512i a2 = dp3(z, u[2], xq + 128, 256), a3 = dp3(z, u[3], xq + 192, 256);
    k4_q8_finish(dmv, a0, a1, a2, a3, sxl, aux, acc);
}

T4V static ALWAYS_INLINE void q4_k_x3_v4(const uint8_t *b, const int8_t *xq, const float *sxl, const float *aux,
                                         __m512 *acc) {
    __m512 dmv;
    __m512i u[4];
    q4_k_quants_vnni(b, &dmv, u);
    q4_k_x3_row(dmv, u, xq, sxl, aux, acc);
}

T4V static ALWAYS_INLINE void q5_k_x3_v4(const uint8_t *b, const int8_t *xq, const float *sxl, const float *aux,
                                         __m512 *acc) {
    __m512 dmv;
    __m512i q[4];
    q5_k_quants_vnni(b, &dmv, q);
    const __m512i z = _mm512_setzero_si512();
    __m512 s = red4_ps(_mm512_cvtepi32_ps(dp3(z, q[0], xq, 256)), _mm512_cvtepi32_ps(dp3(z, q[1], xq + 64, 256)),
                       _mm512_cvtepi32_ps(dp3(z, q[2], xq + 128, 256)), _mm512_cvtepi32_ps(dp3(z, q[3], xq + 192, 256)));
    __m512 f = _mm512_mul_ps(_mm512_permutexvar_ps(K4_LANE_SB, dmv), _mm512_load_ps(sxl));
    acc[0] = _mm512_fmadd_ps(s, f, acc[0]);
    acc[1] = _mm512_fnmadd_ps(dmv, _mm512_load_ps(aux), acc[1]);
}

T4V static ALWAYS_INLINE void q6_k_x3_row(const __m512i z[4], __m512 dsc, const int8_t *xq, const int32_t *corr,
                                          const float *sxl, __m512 *acc) {
    const __m512i zero = _mm512_setzero_si512();
    __m512 a[4];
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        a[i] = _mm512_cvtepi32_ps(_mm512_add_epi32(dp3(zero, z[i], xq + 64 * i, 256),
                                                   _mm512_load_si512((const void *)(corr + 16 * i))));
    acc[0] = _mm512_fmadd_ps(red4_ps(a[0], a[1], a[2], a[3]), _mm512_mul_ps(dsc, _mm512_load_ps(sxl)), acc[0]);
}

T4V static ALWAYS_INLINE void q6_k_x3_v4(const uint8_t *b, const int8_t *xq, const int32_t *corr, const float *sxl,
                                         __m512 *acc) {
    __m512i z[4];
    __m512 dsc;
    q6_k_quants_vnni(b, z, &dsc);
    q6_k_x3_row(z, dsc, xq, corr, sxl, acc);
}

/* Q4_0, four blocks as q4_0_q8_v4. */
T4V static ALWAYS_INLINE void q4_0_x3_v4(const uint8_t *b, int n, const int8_t *xq, Py_ssize_t xp,
                                         const int32_t *corr, const float *sxl, __m512 *acc) {
    __m512i lo, hi;
    __m512 d;
    q4_0_quants_vnni(b, n, &lo, &hi, &d);
    __m512i s = _mm512_setzero_si512();
    for (int p = 0; p < 3; p++) {
        if (p) s = _mm512_slli_epi32(s, 8);
        s = _mm512_dpbusd_epi32(s, lo, _mm512_load_si512((const void *)(xq + p * xp)));
        s = _mm512_dpbusd_epi32(s, hi, _mm512_load_si512((const void *)(xq + p * xp + 64)));
    }
    s = _mm512_add_epi32(s, _mm512_load_si512((const void *)corr));
    *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(d, _mm512_load_ps(sxl)), *acc);
}

V4Q8_K_ROWS(q4_k_x3mv_v4, 144, q4_k_x3_v4(b, qx->xq + 768 * ib, qx->sxl + 16 * ib, qx->aux + 16 * ib, acc))
V4Q8_K_ROWS(q5_k_x3mv_v4, 176, q5_k_x3_v4(b, qx->xq + 768 * ib, qx->sxl + 16 * ib, qx->aux + 16 * ib, acc))
V4Q8_K_ROWS(q6_k_x3mv_v4, 210, q6_k_x3_v4(b, qx->xq + 768 * ib, qx->corr + 64 * ib, qx->sxl + 16 * ib, acc))

/* Split-activation products of up to four x rows per pass over a weight row (batched decode): each
 * block unpacked once (the scales, the quants) for the tile, each x row then doing exactly the
 * one-row kernel's operations in its order, so every output is bit-identical to q_matvec's. */
#ifndef X3_TILE_BYTES
#define X3_TILE_BYTES 16384 /* weight bytes per pass over the x tiles */
#endif
#define X3_TILE(T, TS, DECL, UNPACK, ROW)                                                              \
    T4V static ALWAYS_INLINE void T##_x3tile_row(const uint8_t *w, Py_ssize_t nb, const q8x *const *qxs,   \
                                                 float *const *outs, Py_ssize_t r, const int NB) {         \
        __m512 acc[4][2];                                                                                  \
        for (int t = 0; t < NB; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();                         \
        const uint8_t *b = w;                                                                              \
        for (Py_ssize_t ib = 0; ib < nb; ib++, b += TS) {                                                  \
            PF_LINES(TS);                                                                                  \
            DECL;                                                                                          \
            UNPACK;                                                                                        \
            for (int t = 0; t < NB; t++) {                                                                 \
                const q8x *qx = qxs[t];                                                                    \
                ROW;                                                                                       \
            }                                                                                              \
        }                                                                                                  \
        for (int t = 0; t < NB; t++) outs[t][r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])); \
    }                                                                                                      \
    T4V static void T##_x3tile_v4(const matvec_job *const *subs, int batch, Py_ssize_t r0, Py_ssize_t r1) { \
        const matvec_job *j = subs[0];                                                                     \
        const Py_ssize_t nb = j->cols / 256;                                                               \
        Py_ssize_t blk = j->row_bytes > 0 ? X3_TILE_BYTES / j->row_bytes : 1;                              \
        if (blk < 1) blk = 1;                                                                              \
        for (Py_ssize_t g0 = r0; g0 < r1; g0 += blk) { /* weight rows that stay in L1 / L2 */             \
            Py_ssize_t g1 = g0 + blk < r1 ? g0 + blk : r1;                                                 \
            for (int t0 = 0; t0 < batch; t0 += 4) {                                                        \
                const q8x *qxs[4] = {0};                                                                   \
                float *outs[4] = {0};                                                                      \
                int n = batch - t0 < 4 ? batch - t0 : 4;                                                   \
                for (int t = 0; t < n; t++) qxs[t] = subs[t0 + t]->qx, outs[t] = subs[t0 + t]->out;       \
                for (Py_ssize_t r = g0; r < g1; r++) {                                                     \
                    const uint8_t *w = (const uint8_t *)j->w + r * j->row_bytes;                           \
                    switch (n) {                                                                           \
                        case 1: T##_x3tile_row(w, nb, qxs, outs, r, 1); break;                             \
                        case 2: T##_x3tile_row(w, nb, qxs, outs, r, 2); break;                             \
                        case 3: T##_x3tile_row(w, nb, qxs, outs, r, 3); break;                             \
                        default: T##_x3tile_row(w, nb, qxs, outs, r, 4); break;                            \
                    }                                                                                      \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
    }
X3_TILE(q4_k, 144, __m512 dmv; __m512i u[4], q4_k_quants_vnni(b, &dmv, u),
        q4_k_x3_row(dmv, u, qx->xq + 768 * ib, qx->sxl + 16 * ib, qx->aux + 16 * ib, acc[t]))
X3_TILE(q6_k, 210, __m512i z[4]; __m512 dsc, q6_k_quants_vnni(b, z, &dsc),
        q6_k_x3_row(z, dsc, qx->xq + 768 * ib, qx->corr + 64 * ib, qx->sxl + 16 * ib, acc[t]))
#undef X3_TILE

T4V static void q4_0_x3mv_v4(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    const Py_ssize_t nb = j->cols / 32;
    const q8x *qx = j->qx;
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *b = (const uint8_t *)j->w + r * j->row_bytes;
        const int8_t *xq = qx->xq;
        const int32_t *corr = qx->corr;
        const float *sxl = qx->sxl;
        __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
        Py_ssize_t ib = 0;
        for (; ib + 8 <= nb; ib += 8, b += 8 * 18, xq += 768, corr += 32, sxl += 32) {
            PF_LINES(8 * 18);
            q4_0_x3_v4(b, 4, xq, 128, corr, sxl, acc);
            q4_0_x3_v4(b + 4 * 18, 4, xq + 384, 128, corr + 16, sxl + 16, acc + 1);
        }
        for (; ib < nb; ib += 4, b += 4 * 18, xq += 384, corr += 16, sxl += 16)
            q4_0_x3_v4(b, nb - ib < 4 ? (int)(nb - ib) : 4, xq, 128, corr, sxl, acc);
        j->out[r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
    }
}

/* The split x in the layouts of the kernels above: each piece as q8_layout_v4 lays out int8 x, the
 * three interleaved in chunks of 256 bytes (128 for Q4_0: one kernel step), so that a block's x is
 * 768 contiguous bytes; corr (Q4_0, Q6_K) that of the combined c: (corr_1 << 16) + (corr_2 << 8) +
 * corr_3 (wrapping, like the kernels' sums). xq has room for 4 pieces and corr for two arrays: the
 * last of each is scratch. */
T4V static void x3_layout_v4(int type, q8x *qx, Py_ssize_t cols) {
    const Py_ssize_t padded = (cols + 255) / 256 * 256, ncorr = type == GT_Q4_0 ? padded / 8 : padded / 4;
    const Py_ssize_t chunk = type == GT_Q4_0 ? 128 : 256;
    q8x v = *qx;
    uint32_t *corr = (uint32_t *)qx->corr, *tmp = (uint32_t *)qx->corr + padded / 4;
    v.xq = qx->xq + 3 * padded;
    for (int p = 0; p < 3; p++) {
        v.xqn = qx->xqn + p * cols;
        v.corr = p ? (int32_t *)tmp : qx->corr;
        q8_layout_v4(type, &v, cols);
        for (Py_ssize_t c = 0; c < padded / chunk; c++) memcpy(qx->xq + (3 * c + p) * chunk, v.xq + c * chunk, (size_t)chunk);
        if (p && (type == GT_Q4_0 || type == GT_Q6_K))
            for (Py_ssize_t i = 0; i < ncorr; i++) corr[i] = (corr[i] << 8) + tmp[i];
    }
}
#endif /* Q_X86 */

/* ------------------------------------------------------------- dispatch */
static int q_isa_supported = -1;  /* 4: AVX-512 kernels, 3: AVX2/FMA build, 0: baseline */
static int q_isa_level = -1;
static int q_has_vnni = 0;        /* AVX-512 VNNI (the level-4 int8-activation kernels) */

static void q_detect(void) {
    if (q_isa_supported >= 0) return;
    int level = 0;
#if Q_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("bmi2"))
        level = 3;
    if (level == 3 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        level = 4;
    q_has_vnni = level == 4 && __builtin_cpu_supports("avx512vnni");
    q_pf_l2 = __builtin_cpu_is("intel");
#endif
    q_isa_supported = q_isa_level = level;
}

static rows_fn q_pick(int type, int dequant) {
    int lv = q_isa_level;
    if (dequant) {
#if Q_X86
        if (lv >= 4) {
            switch (type) {
            case GT_F16: return f16_dq_v4;
            case GT_Q8_0: return q8_0_dq_v4;
            case GT_Q4_0: return q4_0_dq_v4;
            case GT_Q4_K: return q4_k_dq_v4;
            case GT_Q5_K: return q5_k_dq_v4;
            case GT_Q6_K: return q6_k_dq_v4;
            }
        }
#endif
        switch (type) {
        case GT_F32: return f32_dq_base;
        case GT_F16: return f16_dq_base;
        case GT_BF16: return bf16_dq_base;
        case GT_Q8_0: return q8_0_dq_base;
        case GT_Q4_0: return q4_0_dq_base;
        case GT_Q4_K: return q4_k_dq_base;
        case GT_Q5_K: return q5_k_dq_base;
        case GT_Q6_K: return q6_k_dq_base;
        }
        return NULL;
    }
    if (type == GT_BF16) return bf16_rows; /* the bf16 kernel (target_clones) */
#if Q_X86
    if (lv >= 4) {
        switch (type) {
        case GT_F32: return f32_mv_v3;
        case GT_F16: return f16_mv_v4;
        case GT_Q8_0: return q8_0_mv_v4;
        case GT_Q4_0: return q4_0_mv_v4;
        case GT_Q4_K: return q4_k_mv_v4;
        case GT_Q5_K: return q5_k_mv_v4;
        case GT_Q6_K: return q6_k_mv_v4;
        }
    }
    if (lv >= 3) {
        switch (type) {
        case GT_F32: return f32_mv_v3;
        case GT_F16: return f16_mv_v3;
        case GT_Q8_0: return q8_0_mv_v3;
        case GT_Q4_0: return q4_0_mv_v3;
        case GT_Q4_K: return q4_k_mv_v3;
        case GT_Q5_K: return q5_k_mv_v3;
        case GT_Q6_K: return q6_k_mv_v3;
        }
    }
#endif
    switch (type) {
    case GT_F32: return f32_mv_base;
    case GT_F16: return f16_mv_base;
    case GT_Q8_0: return q8_0_mv_base;
    case GT_Q4_0: return q4_0_mv_base;
    case GT_Q4_K: return q4_k_mv_base;
    case GT_Q5_K: return q5_k_mv_base;
    case GT_Q6_K: return q6_k_mv_base;
    }
    return NULL;
}

/* The split-activation kernel of a type (AVX-512 VNNI only; NULL elsewhere and for F32 / F16 / BF16 /
 * Q8_0: they use the fp32 kernel). */
static rows_fn q_pick_x3(int type) {
#if Q_X86
    if (q_isa_level >= 4 && q_has_vnni) {
        switch (type) {
        case GT_Q4_0: return q4_0_x3mv_v4;
        case GT_Q4_K: return q4_k_x3mv_v4;
        case GT_Q5_K: return q5_k_x3mv_v4;
        case GT_Q6_K: return q6_k_x3mv_v4;
        }
    }
    if (q_isa_level >= 3) { /* AVX2 (and AVX-512 without VNNI) */
        switch (type) {
        case GT_Q4_0: return q4_0_x3mv_v3;
        case GT_Q4_K: return q4_k_x3mv_v3;
        case GT_Q5_K: return q5_k_x3mv_v3;
        case GT_Q6_K: return q6_k_x3mv_v3;
        }
    }
#else
    (void)type;
#endif
    return NULL;
}

/* The int8-activation kernel of a quantized type (NULL for F32 / F16 / BF16: they use the exact one).
 * Level 4 without VNNI uses the v3 build. */
static rows_fn q_pick_q8(int type) {
    int lv = q_isa_level;
    (void)lv;
#if Q_X86
    if (lv >= 4 && q_has_vnni) {
        switch (type) {
        case GT_Q8_0: return q8_0_q8mv_v4;
        case GT_Q4_0: return q4_0_q8mv_v4;
        case GT_Q4_K: return q4_k_q8mv_v4;
        case GT_Q5_K: return q5_k_q8mv_v4;
        case GT_Q6_K: return q6_k_q8mv_v4;
        }
    }
    if (lv >= 3) {
        switch (type) {
        case GT_Q8_0: return q8_0_q8mv_v3;
        case GT_Q4_0: return q4_0_q8mv_v3;
        case GT_Q4_K: return q4_k_q8mv_v3;
        case GT_Q5_K: return q5_k_q8mv_v3;
        case GT_Q6_K: return q6_k_q8mv_v3;
        }
    }
#endif
    switch (type) {
    case GT_Q8_0: return q8_0_q8mv_base;
    case GT_Q4_0: return q4_0_q8mv_base;
    case GT_Q4_K: return q4_k_q8mv_base;
    case GT_Q5_K: return q5_k_q8mv_base;
    case GT_Q6_K: return q6_k_q8mv_base;
    }
    return NULL;
}

/* Per 256-weight block of x: 8 zeros, then the sums of its eight 32-weight sub-blocks (rounded from
 * fp64), so that a block's min term is one FMA with [d*sc[0..7], dmin*m[0..7]]. */
SHARED_NOINLINE static void x_block_sums(const float *x, Py_ssize_t cols, float *sums) {
    for (Py_ssize_t b = 0; b < cols / 256; b++) {
        for (int i = 0; i < 8; i++) {
            double s = 0;
            for (int l = 0; l < 32; l++) s += x[256 * b + 32 * i + l];
            sums[16 * b + i] = 0.f;
            sums[16 * b + 8 + i] = (float)s;
        }
    }
}

/* x -> three int8 pieces (xq, xq + cols, xq + 2 * cols) and S per 32 values: x3_split_v4's operations
 * one value at a time (the same IEEE operations, so the same bits), for the AVX2 split kernels. */
MULTIVERSION
static void x3_split(const float *restrict x, Py_ssize_t cols, int8_t *restrict xq, float *restrict sx) {
    for (Py_ssize_t g = 0; g < cols / 32; g++) {
        const float *v = x + 32 * g;
        float s1 = q8_group_scale(v);
        if (!(s1 > 0.f)) {
            sx[g] = s1;
            for (int p = 0; p < 3; p++) memset(xq + p * cols + 32 * g, 0, 32);
            continue;
        }
        sx[g] = s1 * 0x1p-16f;
        const float id = 1.f / s1, s2 = s1 * 0x1p-8f, k2 = id * 0x1p8f, k3 = id * 0x1p16f;
        for (int l = 0; l < 32; l++) {
            float x1 = rintf(v[l] * id);
            x1 = x1 > 127.f ? 127.f : x1 < -127.f ? -127.f : x1;
            float r1 = fmaf(-x1, s1, v[l]);
            if (rintf(r1 * k2) > 127.f && x1 < 127.f) {
                x1 += 1.f;
                r1 = fmaf(-x1, s1, v[l]);
            }
            float x2 = rintf(r1 * k2);
            x2 = x2 > 127.f ? 127.f : x2 < -128.f ? -128.f : x2;
            float r2 = fmaf(-x2, s2, r1);
            float x3 = rintf(r2 * k3);
            x3 = x3 > 127.f ? 127.f : x3 < -128.f ? -128.f : x3;
            xq[32 * g + l] = (int8_t)x1;
            xq[cols + 32 * g + l] = (int8_t)x2;
            xq[2 * cols + 32 * g + l] = (int8_t)x3;
        }
    }
}

/* Activation e of a prepared x as the integer its scale multiplies: the int8 value, or the split
 * pieces' c = 65536 x1 + 256 x2 + x3 (natural order, pieces cols apart). */
static inline int32_t q8x_value(const q8x *qx, Py_ssize_t cols, Py_ssize_t e) {
    return qx->pieces == 3 ? 65536 * qx->xqn[e] + 256 * qx->xqn[cols + e] + qx->xqn[2 * cols + e] : qx->xqn[e];
}

/* The quantized (or split) x of one integer-kernel product (q8x), in the layouts its kernel reads. */
static void q8_prepare(int type, q8x *qx, const float *x, Py_ssize_t cols, int v4) {
#if Q_X86
    if (qx->pieces == 3 && v4)
        x3_split_v4(x, cols, qx->xqn, qx->sxn);
    else if (qx->pieces == 3)
        x3_split(x, cols, qx->xqn, qx->sxn);
    else if (v4)
        q8_quantize_v4(x, cols, qx->xqn, qx->sxn);
    else
#endif
        q8_quantize(x, cols, qx->xqn, qx->sxn);
    if (qx->xsn) /* the K-min types' sums of the x the kernels multiply */
        for (Py_ssize_t g = 0; g < cols / 32; g++) {
            int32_t t = 0;
            for (int l = 0; l < 32; l++) t += q8x_value(qx, cols, 32 * g + l);
            qx->xsn[g] = qx->sxn[g] * (float)t;
        }
#if Q_X86
    if (qx->pieces == 3 && !v4 && (type == GT_Q6_K || type == GT_Q4_0))
        /* the AVX2 split kernels' zero point: -32 (-8) * each 4-value lane's sum of c (wrapping) */
        for (Py_ssize_t i = 0; i < cols / 4; i++) {
            uint32_t t = 0;
            for (int l = 0; l < 4; l++) t += (uint32_t)q8x_value(qx, cols, 4 * i + l);
            qx->corr[i] = (int32_t)(0u - (t << (type == GT_Q6_K ? 5 : 3)));
        }
    if (v4) {
        if (qx->pieces == 3)
            x3_layout_v4(type, qx, cols);
        else
            q8_layout_v4(type, qx, cols);
        if (qx->aux)
            for (Py_ssize_t b = 0; b < cols / 256; b++)
                for (int i = 0; i < 8; i++) {
                    qx->aux[16 * b + i] = 0.f;
                    qx->aux[16 * b + 8 + i] = qx->xsn[8 * b + i];
                }
    }
#else
    (void)type;
    (void)v4;
#endif
}

/* One product (or dequantization) made ready to run: the job plus the scratch its x needs (block
 * sums of x for the exact Q4_K / Q5_K kernels, the quantized x of an int8-activation product). */
typedef struct {
    matvec_job j;
    float *sums;
    void *q8mem;
    q8x qx;
    int q8_v4;
} q_prep;

static void q_prep_free(q_prep *p) {
    PyMem_Free(p->sums);
    PyMem_Free(p->q8mem);
    p->sums = NULL;
    p->q8mem = NULL;
}

/* Checks the geometry of one product / dequantization and sets up `p` (its scratch allocated, not
 * yet filled: q_prep_fill does that without the GIL). `x_len` < 0 for a dequantization. Returns 0,
 * or -1 with a Python exception set. */
static int q_prepare(const char *fname, int qtype, const Py_buffer *w, const void *x, Py_ssize_t x_len,
                     const Py_buffer *out, Py_ssize_t rows, Py_ssize_t cols, int threads, int act, q_prep *p) {
    const int dequant = x_len < 0;
    memset(p, 0, sizeof *p);
    q_detect();
    if (act < 0 || act > 2) {
        PyErr_Format(PyExc_ValueError, "%s: act must be 0 (fp32 activations), 1 (int8 activations) or 2 (split "
                     "activations), not %d", fname, act);
        return -1;
    }
    const qtype_info *ti = qtype_lookup(qtype);
    if (ti == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: ggml type id %d is not supported (supported: F32=0, F16=1, BF16=30, "
                     "Q8_0=8, Q4_0=2, Q4_K=12, Q5_K=13, Q6_K=14)", fname, qtype);
        return -1;
    }
    if (rows < 0 || cols < 0) {
        PyErr_Format(PyExc_ValueError, "%s: rows (%zd) and cols (%zd) must be >= 0", fname, rows, cols);
        return -1;
    }
    if (cols % ti->block) {
        PyErr_Format(PyExc_ValueError, "%s: %s rows hold a multiple of %d weights, not cols=%zd", fname, ti->name,
                     ti->block, cols);
        return -1;
    }
    Py_ssize_t row_bytes = cols / ti->block * ti->bytes;
    if (rows > 0 && row_bytes > 0 && rows > PY_SSIZE_T_MAX / row_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: [%zd, %zd] is too large", fname, rows, cols);
        return -1;
    }
    if (w->len != rows * row_bytes) {
        PyErr_Format(PyExc_ValueError, "%s: a [%zd, %zd] %s weight is %zd bytes, the buffer has %zd", fname, rows,
                     cols, ti->name, rows * row_bytes, w->len);
        return -1;
    }
    if (!dequant && x_len != cols * 4) {
        PyErr_Format(PyExc_ValueError, "%s: x must be fp32 [%zd] (%zd bytes), the buffer has %zd bytes", fname, cols,
                     cols * 4, x_len);
        return -1;
    }
    if (dequant && rows > 0 && cols > PY_SSIZE_T_MAX / 4 / rows) {
        PyErr_Format(PyExc_ValueError, "%s: [%zd, %zd] is too large", fname, rows, cols);
        return -1;
    }
    Py_ssize_t out_len = dequant ? rows * cols * 4 : rows * 4;
    if (out->len != out_len) {
        if (dequant)
            PyErr_Format(PyExc_ValueError, "%s: out must be fp32 [%zd, %zd] (%zd bytes), the buffer has %zd bytes",
                         fname, rows, cols, out_len, out->len);
        else
            PyErr_Format(PyExc_ValueError, "%s: out must be fp32 [%zd] (%zd bytes), the buffer has %zd bytes",
                         fname, rows, out_len, out->len);
        return -1;
    }
    if (((uintptr_t)out->buf & 3) || (!dequant && ((uintptr_t)x & 3)) ||
        (ti->block == 1 && ((uintptr_t)w->buf & (ti->bytes - 1)))) {
        PyErr_Format(PyExc_ValueError, "%s: x and out must be 4-byte aligned (and F32/F16/BF16 weights aligned to "
                     "their element size)", fname);
        return -1;
    }
    matvec_job j = {q_pick(qtype, dequant), w->buf, dequant ? NULL : (const float *)x, (float *)out->buf, NULL,
                    rows, cols, row_bytes, pool_parts(threads),
                    NULL};
    rows_fn q8fn = dequant ? NULL : act == 1 ? q_pick_q8(qtype) : act == 2 ? q_pick_x3(qtype) : NULL;
    const int pieces = q8fn && act == 2 ? 3 : 1;
    if (q8fn) j.fn = q8fn;
#if Q_X86
    int needs_sums = j.fn == q4_k_mv_v4 || j.fn == q5_k_mv_v4;
    p->q8_v4 = j.fn == q8_0_q8mv_v4 || j.fn == q4_0_q8mv_v4 || j.fn == q4_k_q8mv_v4 || j.fn == q5_k_q8mv_v4 ||
               j.fn == q6_k_q8mv_v4 || j.fn == q4_0_x3mv_v4 || j.fn == q4_k_x3mv_v4 || j.fn == q5_k_x3mv_v4 ||
               j.fn == q6_k_x3mv_v4;
#else
    int needs_sums = 0;
#endif
    int kmin = qtype == GT_Q4_K || qtype == GT_Q5_K;
    if (needs_sums && rows > 0 && cols > 0) {
        p->sums = (float *)PyMem_Malloc((size_t)cols / 16 * sizeof(float));
        if (p->sums == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        j.aux = p->sums;
    }
    if (q8fn && rows > 0 && cols > 0) {
        /* one allocation, each array 64-byte aligned: xqn [cols], sxn, xsn [cols/32]; the v4 layouts
         * xq, corr, sxl [padded bytes each], aux [cols/16] */
        int v4 = p->q8_v4;
        size_t padded = (size_t)(cols + 255) / 256 * 256, ng = (size_t)cols / 32;
        size_t pc = (size_t)pieces;
        size_t sz[7] = {pc * (size_t)cols, 4 * ng, kmin ? 4 * ng : 0, v4 ? (pieces == 3 ? 4 : 1) * padded : 0,
                        v4 ? (pieces == 3 ? 2 : 1) * padded
                        : pieces == 3 && (qtype == GT_Q6_K || qtype == GT_Q4_0) ? (size_t)cols : 0,
                        v4 ? padded : 0, v4 && kmin ? 8 * ng : 0};
        size_t total = 64;
        for (int i = 0; i < 7; i++) total += (sz[i] + 63) / 64 * 64;
        p->q8mem = PyMem_Malloc(total);
        if (p->q8mem == NULL) {
            q_prep_free(p);
            PyErr_NoMemory();
            return -1;
        }
        uint8_t *m = (uint8_t *)(((uintptr_t)p->q8mem + 63) & ~(uintptr_t)63);
        void *arr[7];
        for (int i = 0; i < 7; i++) {
            arr[i] = sz[i] ? m : NULL;
            m += (sz[i] + 63) / 64 * 64;
        }
        p->qx.xqn = arr[0], p->qx.sxn = arr[1], p->qx.xsn = arr[2], p->qx.xq = arr[3], p->qx.corr = arr[4];
        p->qx.sxl = arr[5], p->qx.aux = arr[6];
        p->qx.pieces = pieces;
        j.qx = &p->qx;
    }
    p->j = j;
    return 0;
}

/* Fills p's scratch from x (no GIL needed). */
SHARED_NOINLINE static void q_prep_fill(int qtype, q_prep *p) {
    if (p->sums) x_block_sums(p->j.x, p->j.cols, p->sums);
    if (p->q8mem) q8_prepare(qtype, &p->qx, p->j.x, p->j.cols, p->q8_v4);
}

/* Shared argument handling of q_matvec / q_dequantize. */
static PyObject *q_run(PyObject *args, int dequant) {
    const char *fname = dequant ? "q_dequantize" : "q_matvec";
    Py_buffer w, x = {0}, out;
    int qtype, threads, act = 0;
    Py_ssize_t rows, cols;
    if (dequant) {
        if (!PyArg_ParseTuple(args, "iy*w*nni", &qtype, &w, &out, &rows, &cols, &threads)) return NULL;
    } else {
        if (!PyArg_ParseTuple(args, "iy*y*w*nni|i", &qtype, &w, &x, &out, &rows, &cols, &threads, &act)) return NULL;
    }
    PyObject *result = NULL;
    q_prep p;
    if (q_prepare(fname, qtype, &w, dequant ? NULL : x.buf, dequant ? -1 : x.len, &out, rows, cols, threads, act,
                  &p) < 0)
        goto done;
    if (rows > 0 && cols > 0) {
        Py_BEGIN_ALLOW_THREADS
        q_prep_fill(qtype, &p);
        matvec(&p.j);
        Py_END_ALLOW_THREADS
        q_prep_free(&p);
    } else if (!dequant && rows > 0) {
        memset(out.buf, 0, (size_t)out.len);
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&w);
    if (!dequant) PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    return result;
}

/* ------------------------------------------------------------- several products of one x (or of a batch)
 * q_matvec_many(x, cols, threads, act, ((qtype, w, out, rows), ...)[, batch=1]): out_i[b] =
 * dequant(w_i) @ x[b] for up to MANY_MAX weights of `cols` columns (a layer's q, k, v; gate and up)
 * and `batch` activation rows (x fp32 [batch, cols], each out_i fp32 [batch, rows_i]: batched decode),
 * as one job on the pool: each x row is prepared (summed / quantized) once per distinct type, the
 * rows of all products are claimed from one counter, and the caller waits once. A block of weight
 * rows (about 16 KiB) is multiplied by every x row in turn while it sits in L1/L2, so the weights
 * are read from memory once for the whole batch. Each (row, x row) is computed by the same row
 * function as q_matvec, so every output equals q_matvec's of that x row bit for bit. */
#define MANY_MAX 8
#ifndef MANY_BLOCK_BYTES
#define MANY_BLOCK_BYTES 16384 /* weight bytes per pass over the x rows (64 and 256 KiB measured no faster) */
#endif
#define MANY_BATCH_MAX 256

typedef void (*tile_fn)(const matvec_job *const *subs, int batch, Py_ssize_t r0, Py_ssize_t r1);

typedef struct {
    int n, batch;
    Py_ssize_t start[MANY_MAX + 1]; /* rows of product i are start[i] .. start[i+1]-1 of the job */
    const matvec_job *const *sub;   /* [n * batch]: product i, x row b at sub[i * batch + b] */
    tile_fn tile[MANY_MAX];         /* product i's kernel for several x rows at once, or NULL */
} many_job;

/* The several-x-row kernel of a row function (the weight unpacked once for a tile of x rows), or NULL. */
static tile_fn tile_of(rows_fn fn) {
#if Q_X86
    if (fn == q4_k_mv_v4) return q4_k_tile_v4;
    if (fn == q6_k_mv_v4) return q6_k_tile_v4;
    if (fn == q4_k_x3mv_v4) return q4_k_x3tile_v4;
    if (fn == q6_k_x3mv_v4) return q6_k_x3tile_v4;
#else
    (void)fn;
#endif
    return NULL;
}

static void many_rows(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    const many_job *m = (const many_job *)j->w;
    for (int i = 0; i < m->n; i++) {
        Py_ssize_t a = r0 > m->start[i] ? r0 : m->start[i], b = r1 < m->start[i + 1] ? r1 : m->start[i + 1];
        if (a >= b) continue;
        const matvec_job *const *sub = m->sub + (Py_ssize_t)i * m->batch;
        if (m->batch == 1) {
            sub[0]->fn(sub[0], a - m->start[i], b - m->start[i]);
            continue;
        }
        if (m->tile[i]) {
            m->tile[i](sub, m->batch, a - m->start[i], b - m->start[i]);
            continue;
        }
        Py_ssize_t blk = sub[0]->row_bytes > 0 ? MANY_BLOCK_BYTES / sub[0]->row_bytes : 1;
        if (blk < 1) blk = 1;
        for (Py_ssize_t c0 = a; c0 < b; c0 += blk) {
            Py_ssize_t c1 = c0 + blk < b ? c0 + blk : b;
            for (int bb = 0; bb < m->batch; bb++) sub[bb]->fn(sub[bb], c0 - m->start[i], c1 - m->start[i]);
        }
    }
}

static PyObject *q_matvec_many(PyObject *self, PyObject *args) {
    Py_buffer x;
    Py_ssize_t cols, batch = 1;
    int threads, act;
    PyObject *specs;
    if (!PyArg_ParseTuple(args, "y*niiO|n", &x, &cols, &threads, &act, &specs, &batch)) return NULL;
    PyObject *result = NULL;
    Py_buffer w[MANY_MAX], out[MANY_MAX];
    int qtypes[MANY_MAX], n = 0, held = 0, prepared = 0;
    Py_ssize_t nrows[MANY_MAX];
    q_prep *p = NULL;               /* [n * batch] */
    int *owner = NULL;              /* [n * batch]: the prep whose x scratch a product shares */
    const matvec_job **subs = NULL; /* [n * batch] */
    many_job m = {0};
    if (!PyTuple_Check(specs) || PyTuple_GET_SIZE(specs) < 1 || PyTuple_GET_SIZE(specs) > MANY_MAX) {
        PyErr_Format(PyExc_ValueError, "q_matvec_many: specs must be a tuple of 1 to %d (qtype, w, out, rows) tuples",
                     MANY_MAX);
        goto done;
    }
    if (batch < 1 || batch > MANY_BATCH_MAX) {
        PyErr_Format(PyExc_ValueError, "q_matvec_many: batch must be 1 to %d, not %zd", MANY_BATCH_MAX, batch);
        goto done;
    }
    if (cols < 0 || x.len != batch * cols * 4) {
        PyErr_Format(PyExc_ValueError, "q_matvec_many: x must be fp32 [%zd, %zd] (%zd bytes), the buffer has %zd bytes",
                     batch, cols, batch * cols * 4, x.len);
        goto done;
    }
    n = (int)PyTuple_GET_SIZE(specs);
    p = (q_prep *)PyMem_Calloc((size_t)(n * batch), sizeof *p);
    owner = (int *)PyMem_Calloc((size_t)(n * batch), sizeof *owner);
    subs = (const matvec_job **)PyMem_Calloc((size_t)(n * batch), sizeof *subs);
    if (p == NULL || owner == NULL || subs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_ssize_t total = 0;
    for (int i = 0; i < n; i++) {
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(specs, i), "iy*w*n", &qtypes[i], &w[i], &out[i], &nrows[i])) goto done;
        held = i + 1;
        if (nrows[i] < 0 || out[i].len != batch * nrows[i] * 4) {
            PyErr_Format(PyExc_ValueError, "q_matvec_many: out %d must be fp32 [%zd, %zd] (%zd bytes), the buffer has "
                         "%zd bytes", i, batch, nrows[i], batch * nrows[i] * 4, out[i].len);
            goto done;
        }
        for (Py_ssize_t b = 0; b < batch; b++) {
            int k = i * (int)batch + (int)b;
            Py_buffer ob = out[i]; /* x row b's slice of out_i */
            ob.buf = (float *)out[i].buf + b * nrows[i];
            ob.len = nrows[i] * 4;
            const float *xb = (const float *)x.buf + b * cols;
            if (q_prepare("q_matvec_many", qtypes[i], &w[i], xb, cols * 4, &ob, nrows[i], cols, threads, act, &p[k]) < 0)
                goto done;
            prepared = k + 1;
            owner[k] = k;
            for (int e = 0; e < i; e++) /* the same type for the same x row: share its prepared x */
                if (qtypes[e] == qtypes[i] && owner[e * (int)batch + (int)b] == e * (int)batch + (int)b) {
                    owner[k] = e * (int)batch + (int)b;
                    break;
                }
            if (owner[k] != k) {
                q_prep_free(&p[k]);
                p[k].j.aux = p[owner[k]].j.aux;
                p[k].j.qx = p[owner[k]].j.qx;
            }
            subs[k] = &p[k].j;
        }
        m.start[i] = total;
        total += nrows[i];
        m.tile[i] = batch > 1 ? tile_of(p[i * (int)batch].j.fn) : NULL;
    }
    m.start[n] = total;
    m.n = n;
    m.batch = (int)batch;
    m.sub = subs;
    if (cols == 0) {
        for (int i = 0; i < n; i++) memset(out[i].buf, 0, (size_t)out[i].len);
    } else if (total > 0) {
        matvec_job all = {many_rows, &m, (const float *)x.buf, NULL, NULL, total, cols, 0,
                          pool_parts(threads), NULL};
        Py_BEGIN_ALLOW_THREADS
        for (int k = 0; k < n * (int)batch; k++)
            if (owner[k] == k) q_prep_fill(qtypes[k / (int)batch], &p[k]);
        matvec(&all);
        Py_END_ALLOW_THREADS
    }
    result = Py_None;
    Py_INCREF(result);
done:
    for (int k = 0; k < prepared; k++)
        if (owner[k] == k) q_prep_free(&p[k]);
    for (int i = 0; i < held; i++) {
        PyBuffer_Release(&w[i]);
        PyBuffer_Release(&out[i]);
    }
    PyMem_Free(p);
    PyMem_Free(owner);
    PyMem_Free(subs);
    PyBuffer_Release(&x);
    return result;
}

static PyObject *q_matvec(PyObject *self, PyObject *args) { return q_run(args, 0); }
static PyObject *q_dequantize(PyObject *self, PyObject *args) { return q_run(args, 1); }

static PyObject *q_isa(PyObject *self, PyObject *args) {
    q_detect();
    return PyLong_FromLong(q_isa_level);
}

static PyObject *q_prefetch(PyObject *self, PyObject *args) {
    const char *mode = NULL;
    if (!PyArg_ParseTuple(args, "|z", &mode)) return NULL;
    q_detect();
    const char *old = q_pf_l2 ? "l2" : "nta";
    if (mode) {
        if (strcmp(mode, "l2") && strcmp(mode, "nta")) {
            PyErr_Format(PyExc_ValueError, "q_prefetch: mode must be 'l2' or 'nta', got '%s'", mode);
            return NULL;
        }
        q_pf_l2 = !strcmp(mode, "l2");
    }
    return PyUnicode_FromString(old);
}

static PyObject *q_vnni(PyObject *self, PyObject *args) {
    q_detect();
    return PyBool_FromLong(q_has_vnni && q_isa_level >= 4);
}

static PyObject *q_set_isa(PyObject *self, PyObject *args) {
    int level;
    if (!PyArg_ParseTuple(args, "i", &level)) return NULL;
    q_detect();
    int lv = level >= 4 ? 4 : level >= 3 ? 3 : 0;
    if (lv > q_isa_supported) lv = q_isa_supported;
    pthread_mutex_lock(&call_mu); /* not while a product runs */
    q_isa_level = lv;
    pthread_mutex_unlock(&call_mu);
    return PyLong_FromLong(lv);
}

/* ------------------------------------------------------------- one-token decode steps (fp32)
 * The small operations between a layer's products, each one call instead of several torch ops
 * (runtime/model.py and runtime/kv/cache.py use them for one-row passes in fp32):
 * rms_norm(x, w, out, n, eps): out = w * (x * 1/sqrt(mean(x^2) + eps));
 * rope(x, out, heads, d, cos, sin, interleaved): out = x * cos + rotate(x) * sin per head, rotate
 *   = (-x[half:], x[:half]) or, interleaved, (-x1, x0) per adjacent pair (runtime/model.apply_rope);
 * attend(q, k, v, out, hq, hkv, d, lo, end, head_stride, scale, threads[, table, block]): for each query head h
 *   (kv head h / (hq / hkv)): softmax over positions lo..end-1 of scale * q_h . k_p, times v_p. k
 *   and v hold each kv head's positions contiguously [p, d] with head_stride floats between heads.
 *   Scores are fp32, the softmax subtracts the maximum (exp of <= 0), sums are fp32. Heads run on
 *   the pool when the work is large enough. With an int64 block table, position p lives in row
 *   table[p / block] * block + p % block of its head (a KV block pool shared by sequences): the
 *   positions are visited in the same order, so the result is bit-identical to the rows in order. */
MULTIVERSION
SHARED_NOINLINE static void rms_norm_impl(const float *restrict x, const float *restrict w, float *restrict out, Py_ssize_t n,
                          float eps) {
    float ss = 0.f;
    for (Py_ssize_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.f / sqrtf(ss / (float)n + eps);
    for (Py_ssize_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

MULTIVERSION
SHARED_NOINLINE static void rope_impl(const float *restrict x, float *restrict out, Py_ssize_t heads, Py_ssize_t d,
                      const float *restrict c, const float *restrict sn, int interleaved) {
    const Py_ssize_t half = d / 2;
    for (Py_ssize_t h = 0; h < heads; h++) {
        const float *xh = x + h * d;
        float *o = out + h * d;
        if (interleaved) {
            for (Py_ssize_t i = 0; i < half; i++) {
                float x0 = xh[2 * i], x1 = xh[2 * i + 1];
                o[2 * i] = x0 * c[2 * i] + (-x1) * sn[2 * i];
                o[2 * i + 1] = x1 * c[2 * i + 1] + x0 * sn[2 * i + 1];
            }
        } else {
            for (Py_ssize_t i = 0; i < half; i++) o[i] = xh[i] * c[i] + (-xh[i + half]) * sn[i];
            for (Py_ssize_t i = half; i < d; i++) o[i] = xh[i] * c[i] + xh[i - half] * sn[i];
        }
    }
}

typedef struct {
    const float *q, *k, *v;
    float *out;
    Py_ssize_t hq, hkv, d, lo, end, head_stride;
    float scale;
    const int64_t *table; /* NULL: positions in order; else logical block -> physical block */
    int block_log2;       /* log2 of the positions per block (with a table) */
} attend_args;

/* The row of position pos in one kv head's [P, d] rows: in order, or through the block table (the
 * same rows in the same order either way, so the arithmetic is the same). */
static ALWAYS_INLINE const float *kv_row(const attend_args *a, const float *head, Py_ssize_t pos) {
    if (a->table == NULL) return head + pos * a->d;
    const Py_ssize_t b = a->block_log2;
    return head + ((Py_ssize_t)a->table[pos >> b] * ((Py_ssize_t)1 << b) + (pos & (((Py_ssize_t)1 << b) - 1))) * a->d;
}

/* The query heads g0..g1-1 of kv head kvh (they share its keys and values): sc holds (g1-g0) * n
 * floats of scratch. */
MULTIVERSION
static void attend_group(const attend_args *a, Py_ssize_t kvh, Py_ssize_t g0, Py_ssize_t g1, float *restrict sc) {
    const Py_ssize_t d = a->d, n = a->end - a->lo, G = a->hq / a->hkv, ng = g1 - g0;
    const float *K = a->k + kvh * a->head_stride, *V = a->v + kvh * a->head_stride;
    const float *restrict Q = a->q + (kvh * G + g0) * d;
    const int vec = d % 16 == 0;
    for (Py_ssize_t p = 0; p < n; p++) { /* each key row read once for the group's queries */
        const float *kp = kv_row(a, K, a->lo + p);
        for (Py_ssize_t g = 0; g < ng; g++) {
            const float *qg = Q + g * d;
            float t = 0.f;
            if (vec) {
                v16f acc = {0};
                for (Py_ssize_t i = 0; i < d; i += 16) acc += load_f32x16(qg + i) * load_f32x16(kp + i);
                t = hsum16(acc);
            } else {
                for (Py_ssize_t i = 0; i < d; i++) t += qg[i] * kp[i];
            }
            sc[g * n + p] = t * a->scale;
        }
    }
    for (Py_ssize_t g = 0; g < ng; g++) {
        float *sg = sc + g * n, mx = -INFINITY, sum = 0.f;
        for (Py_ssize_t p = 0; p < n; p++) mx = sg[p] > mx ? sg[p] : mx;
        for (Py_ssize_t p = 0; p < n; p++) {
            sg[p] = exp_le0(sg[p] - mx);
            sum += sg[p];
        }
        float *restrict o = a->out + (kvh * G + g0 + g) * d;
        const float inv = 1.f / sum;
        if (vec && d <= 256) { /* the output row in registers / L1 while the values stream */
            v16f acc[16];
            for (Py_ssize_t c = 0; c < d / 16; c++) acc[c] = (v16f){0};
            for (Py_ssize_t p = 0; p < n; p++) {
                const float w = sg[p];
                const float *vp = kv_row(a, V, a->lo + p);
                for (Py_ssize_t c = 0; c < d / 16; c++) acc[c] += w * load_f32x16(vp + 16 * c);
            }
            for (Py_ssize_t c = 0; c < d / 16; c++) {
                v16f r = acc[c] * inv;
                memcpy(o + 16 * c, &r, sizeof r);
            }
        } else {
            for (Py_ssize_t i = 0; i < d; i++) o[i] = 0.f;
            for (Py_ssize_t p = 0; p < n; p++) {
                const float *vp = kv_row(a, V, a->lo + p);
                for (Py_ssize_t i = 0; i < d; i++) o[i] += sg[p] * vp[i];
            }
            for (Py_ssize_t i = 0; i < d; i++) o[i] *= inv;
        }
    }
}

#define ATTEND_GROUP 8 /* query heads scored together against one kv head's keys */

/* kv heads h0..h1-1 (the pool's rows). */
static void attend_rows(const matvec_job *j, Py_ssize_t h0, Py_ssize_t h1) {
    const attend_args *a = (const attend_args *)j->ctx;
    const Py_ssize_t n = a->end - a->lo, G = a->hq / a->hkv, ng = G < ATTEND_GROUP ? G : ATTEND_GROUP;
    float stack[8192];
    float *sc = n * ng <= 8192 ? stack : (float *)malloc((size_t)(n * ng) * sizeof(float));
    if (sc == NULL) { /* out of memory in a worker: NaN rows (the caller's finiteness checks see them) */
        for (Py_ssize_t i = h0 * G * a->d; i < h1 * G * a->d; i++) a->out[i] = NAN;
        return;
    }
    for (Py_ssize_t h = h0; h < h1; h++)
        for (Py_ssize_t g0 = 0; g0 < G; g0 += ng) attend_group(a, h, g0, g0 + ng < G ? g0 + ng : G, sc);
    if (sc != stack) free(sc);
}

static PyObject *rms_norm(PyObject *self, PyObject *args) {
    Py_buffer x, w, out;
    Py_ssize_t n;
    float eps;
    if (!PyArg_ParseTuple(args, "y*y*w*nf", &x, &w, &out, &n, &eps)) return NULL;
    PyObject *result = NULL;
    if (n <= 0 || x.len != n * 4 || w.len != n * 4 || out.len != n * 4) {
        PyErr_Format(PyExc_ValueError, "rms_norm: x, w and out must be fp32 [%zd] (got %zd, %zd, %zd bytes)", n, x.len,
                     w.len, out.len);
    } else {
        rms_norm_impl((const float *)x.buf, (const float *)w.buf, (float *)out.buf, n, eps);
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    return result;
}

static PyObject *rope(PyObject *self, PyObject *args) {
    Py_buffer x, out, c, sn;
    Py_ssize_t heads, d;
    int interleaved;
    if (!PyArg_ParseTuple(args, "y*w*nny*y*p", &x, &out, &heads, &d, &c, &sn, &interleaved)) return NULL;
    PyObject *result = NULL;
    if (heads <= 0 || d <= 0 || d % 2 || x.len != heads * d * 4 || out.len != x.len || c.len != d * 4 ||
        sn.len != d * 4) {
        PyErr_Format(PyExc_ValueError, "rope: x and out must be fp32 [%zd, %zd] (even d), cos and sin fp32 [%zd]", heads,
                     d, d);
    } else {
        rope_impl((const float *)x.buf, (float *)out.buf, heads, d, (const float *)c.buf, (const float *)sn.buf,
                  interleaved);
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    PyBuffer_Release(&c);
    PyBuffer_Release(&sn);
    return result;
}

/* Checks attend's geometry (q and out hold a->hq * a->d floats; k / v buffers of k_len / v_len
 * bytes) and sets its block table from `tab` (NULL: positions in order). Returns 0, or -1 with a
 * ValueError naming `fname` (attend, attn_step). */
static int attend_setup(const char *fname, attend_args *a, Py_ssize_t q_len, Py_ssize_t out_len, Py_ssize_t k_len,
                        Py_ssize_t v_len, const Py_buffer *tab, Py_ssize_t block) {
    a->table = NULL, a->block_log2 = 0;
    Py_ssize_t need = (a->hkv - 1) * a->head_stride + a->end * a->d; /* floats of k / v read */
    if (tab != NULL && tab->buf != NULL) { /* positions through a block table: every block it names must lie in a head's rows */
        if (block <= 0 || (block & (block - 1)) || tab->len % 8 || ((uintptr_t)tab->buf & 7) ||
            (Py_ssize_t)(tab->len / 8) * block < a->end || a->head_stride <= 0 || a->d <= 0) {
            PyErr_Format(PyExc_ValueError, "%s: the block table (%zd bytes of int64) must cover positions ..%zd "
                         "in blocks of a power of two (got %zd)", fname, tab->len, a->end, block);
            return -1;
        }
        while (((Py_ssize_t)1 << a->block_log2) < block) a->block_log2++;
        const int64_t *t = (const int64_t *)tab->buf;
        for (Py_ssize_t i = a->lo / block; i * block < a->end; i++) {
            if (t[i] < 0 || (t[i] + 1) * block * a->d > a->head_stride) {
                PyErr_Format(PyExc_ValueError, "%s: block table entry %zd is %lld, outside the %zd blocks of a "
                             "head", fname, i, (long long)t[i], a->head_stride / (block * a->d));
                return -1;
            }
        }
        a->table = t;
        need = a->hkv * a->head_stride; /* every head's rows may be read */
    }
    if (a->hq <= 0 || a->hkv <= 0 || a->hq % a->hkv || a->d <= 0 || a->lo < 0 || a->end <= a->lo ||
        a->head_stride < a->end * a->d || q_len != a->hq * a->d * 4 || out_len != q_len || k_len < need * 4 ||
        v_len < need * 4) {
        PyErr_Format(PyExc_ValueError, "%s: q/out fp32 [%zd x %zd], %zd kv heads, positions %zd..%zd, head "
                     "stride %zd do not fit buffers of %zd / %zd bytes", fname, a->hq, a->d, a->hkv, a->lo, a->end,
                     a->head_stride, k_len, v_len);
        return -1;
    }
    return 0;
}

/* Runs a checked attention (GIL released): on the pool when the work is large enough. */
SHARED_NOINLINE static void attend_run(const attend_args *a, int threads) {
    matvec_job j = {attend_rows, NULL, NULL, NULL, NULL, a->hkv, 0, 0,
                    pool_parts(threads), NULL, a, 1};
    /* below ~512K multiply-adds (~30 us) one thread is faster than waking another */
    if ((a->end - a->lo) * a->hq * a->d >= (1 << 19)) pool_run(&j, 2);
    else attend_rows(&j, 0, a->hkv);
}

static PyObject *attend(PyObject *self, PyObject *args) {
    Py_buffer q, k, v, out, tab = {0};
    attend_args a;
    int threads;
    Py_ssize_t block = 0;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nnnnnnfi|y*n", &q, &k, &v, &out, &a.hq, &a.hkv, &a.d, &a.lo, &a.end,
                          &a.head_stride, &a.scale, &threads, &tab, &block))
        return NULL;
    PyObject *result = NULL;
    if (attend_setup("attend", &a, q.len, out.len, k.len, v.len, &tab, block) < 0) goto done;
    if (((uintptr_t)q.buf & 3) || ((uintptr_t)k.buf & 3) || ((uintptr_t)v.buf & 3) || ((uintptr_t)out.buf & 3)) {
        PyErr_SetString(PyExc_ValueError, "attend: q, k, v and out must be 4-byte aligned fp32 buffers");
        goto done;
    }
    a.q = (const float *)q.buf, a.k = (const float *)k.buf, a.v = (const float *)v.buf, a.out = (float *)out.buf;
    Py_BEGIN_ALLOW_THREADS
    attend_run(&a, threads);
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&q);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&out);
    if (tab.buf != NULL) PyBuffer_Release(&tab);
    return result;
}

/* ------------------------------------------------------------- fused one-token layer steps (fp32)
 * A decode step of a small quantized model spent ~3 ms per token in Python between a layer's ~10
 * native calls (argument conversion, tensor allocation, checks). These run each half of a layer as
 * one call, with the same C functions in the same order as those separate calls, so their results
 * are bit-identical (runtime/model.py takes this path where it applies and the separate one
 * elsewhere: a streamed weight, several rows, another cache; both compute the same numbers):
 * attn_step(x, out, norm, eps, (q, k, v), o, cos, sin, interleaved, k_cache, v_cache, head_stride, table,
 *   block, lo, end, hq, hkv, d, scale, threads, attn_threads, act): xn = rms_norm(x); q, k, v of xn
 *   (as q_matvec_many); rope on q and k; this token's key and value written at position end-1 of the
 *   caches (attend's layout: kv head h's rows head_stride floats apart, through the block table);
 *   out = x + o(attend(q over positions lo..end-1));
 * ffn_step(x, out, norm, eps, (gate, up), down, kind, threads, act) -> bool: xn = rms_norm(x);
 *   out = x + down(act_mul(gate(xn), up(xn))); returns whether out is all finite.
 * A weight spec is (qtype, w, rows, bias or None): bias fp32 [rows] added to the product, as the
 * separate path adds it. act_mul(g, u, out, n, kind): out = act(g) * u, kind 0 silu, 1 gelu (tanh
 * approximation), 2 gelu (erf): the FFN activation of both paths. */
MULTIVERSION
SHARED_NOINLINE static void act_mul_impl(const float *restrict g, const float *restrict u, float *restrict out, Py_ssize_t n,
                         int kind) {
    if (kind == 0)
        for (Py_ssize_t i = 0; i < n; i++) out[i] = g[i] / (1.f + exp_f32(-g[i])) * u[i];
    else if (kind == 1) /* 0.5 g (1 + tanh(y)) = g / (1 + exp(-2y)): no cancellation where tanh(y) ~ -1 */
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = g[i] / (1.f + exp_f32(-1.5957691216057308f * (g[i] + 0.044715f * g[i] * g[i] * g[i]))) * u[i];
    else /* 0.5 g (1 + erf(g / sqrt 2)) = 0.5 g erfc(-g / sqrt 2), likewise */
        for (Py_ssize_t i = 0; i < n; i++) out[i] = 0.5f * g[i] * erfcf(g[i] * -0.7071067811865476f) * u[i];
}

static PyObject *act_mul(PyObject *self, PyObject *args) {
    Py_buffer g, u, out;
    Py_ssize_t n;
    int kind;
    if (!PyArg_ParseTuple(args, "y*y*w*ni", &g, &u, &out, &n, &kind)) return NULL;
    PyObject *result = NULL;
    if (n <= 0 || g.len != n * 4 || u.len != n * 4 || out.len != n * 4 || kind < 0 || kind > 2) {
        PyErr_Format(PyExc_ValueError, "act_mul: g, u and out must be fp32 [%zd] (got %zd, %zd, %zd bytes), kind 0 "
                     "(silu), 1 (gelu tanh) or 2 (gelu erf), not %d", n, g.len, u.len, out.len, kind);
    } else {
        Py_BEGIN_ALLOW_THREADS
        act_mul_impl((const float *)g.buf, (const float *)u.buf, (float *)out.buf, n, kind);
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&g);
    PyBuffer_Release(&u);
    PyBuffer_Release(&out);
    return result;
}

#define STEP_MAX MANY_MAX /* products in one job of a step (q, k, v; the gates and ups of 4 experts) */

/* The products of a step's job: the weights held, their prepared jobs, one many_job. */
typedef struct {
    int n, held, prepared;
    int qtype[STEP_MAX], owner[STEP_MAX];
    Py_buffer w[STEP_MAX], bias[STEP_MAX];
    Py_ssize_t rows[STEP_MAX], total, cols;
    q_prep p[STEP_MAX];
    const matvec_job *subs[STEP_MAX];
    many_job m;
    float *out;
    int threads;
} step_products;

/* Appends one weight spec (qtype, w, rows, bias or None) to sp. 0, or -1 (exception set). */
static int step_parse_one(const char *fname, PyObject *it, step_products *sp) {
    const int i = sp->n;
    PyObject *b;
    if (i >= STEP_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: more than %d products in one job", fname, STEP_MAX);
        return -1;
    }
    if (!PyTuple_Check(it)) {
        PyErr_Format(PyExc_ValueError, "%s: a weight spec must be a (qtype, w, rows, bias) tuple", fname);
        return -1;
    }
    if (!PyArg_ParseTuple(it, "iy*nO", &sp->qtype[i], &sp->w[i], &sp->rows[i], &b)) return -1;
    sp->held = sp->n = i + 1;
    if (b != Py_None) {
        if (PyObject_GetBuffer(b, &sp->bias[i], PyBUF_SIMPLE) < 0) return -1;
        if (sp->bias[i].len != sp->rows[i] * 4 || ((uintptr_t)sp->bias[i].buf & 3)) {
            PyErr_Format(PyExc_ValueError, "%s: a bias must be fp32 [%zd] (%zd bytes), got %zd bytes", fname,
                         sp->rows[i], sp->rows[i] * 4, sp->bias[i].len);
            return -1;
        }
    }
    return 0;
}

/* Parses one weight spec, or with `group` a tuple of 1..STEP_MAX of them. 0, or -1 (exception set). */
static int step_parse(const char *fname, PyObject *specs, int group, step_products *sp) {
    if (group && (!PyTuple_Check(specs) || PyTuple_GET_SIZE(specs) < 1 || PyTuple_GET_SIZE(specs) > STEP_MAX)) {
        PyErr_Format(PyExc_ValueError, "%s: a group of products must be a tuple of 1 to %d (qtype, w, rows, bias) "
                     "tuples", fname, STEP_MAX);
        return -1;
    }
    const int n = group ? (int)PyTuple_GET_SIZE(specs) : 1;
    for (int i = 0; i < n; i++)
        if (step_parse_one(fname, group ? PyTuple_GET_ITEM(specs, i) : specs, sp) < 0) return -1;
    return 0;
}

/* Sets up sp's products into out [total rows] (x not read yet: step_run does): product i of xs[i]
 * [cols[i]] (xs == NULL: all of x [cols]). Products of one x and type share its prepared x. 0 or -1. */
static int step_prepare_each(const char *fname, step_products *sp, const float *x, Py_ssize_t cols,
                             const float *const *xs, const Py_ssize_t *colss, float *out, int threads, int act) {
    Py_ssize_t total = 0;
    for (int i = 0; i < sp->n; i++) {
        Py_buffer ob = {0};
        ob.buf = out + total;
        ob.len = sp->rows[i] * 4;
        const float *xi = xs ? xs[i] : x;
        const Py_ssize_t ci = xs ? colss[i] : cols;
        if (q_prepare(fname, sp->qtype[i], &sp->w[i], xi, ci * 4, &ob, sp->rows[i], ci, threads, act, &sp->p[i]) < 0)
            return -1;
        sp->prepared = i + 1;
        sp->owner[i] = i;
        for (int e = 0; e < i && !xs; e++) /* the same x and type: share its prepared x */
            if (sp->qtype[e] == sp->qtype[i] && sp->owner[e] == e) {
                sp->owner[i] = e;
                break;
            }
        if (sp->owner[i] != i) {
            q_prep_free(&sp->p[i]);
            sp->p[i].j.aux = sp->p[sp->owner[i]].j.aux;
            sp->p[i].j.qx = sp->p[sp->owner[i]].j.qx;
        }
        sp->subs[i] = &sp->p[i].j;
        sp->m.start[i] = total;
        sp->m.tile[i] = NULL;
        total += sp->rows[i];
    }
    sp->m.start[sp->n] = total;
    sp->m.n = sp->n;
    sp->m.batch = 1;
    sp->m.sub = sp->subs;
    sp->total = total;
    sp->cols = xs ? colss[0] : cols;
    sp->out = out;
    sp->threads = threads;
    return 0;
}

/* step_prepare_each with one x [cols] for every product. */
static int step_prepare(const char *fname, step_products *sp, const float *x, Py_ssize_t cols, float *out,
                        int threads, int act) {
    return step_prepare_each(fname, sp, x, cols, NULL, NULL, out, threads, act);
}

/* Runs sp's products (GIL released): each x prepared once per type, one job on the pool, biases added. */
static void step_run(step_products *sp) {
    for (int k = 0; k < sp->n; k++)
        if (sp->owner[k] == k) q_prep_fill(sp->qtype[k], &sp->p[k]);
    matvec_job all = {many_rows, &sp->m, sp->p[0].j.x, NULL, NULL, sp->total, sp->cols, 0, pool_parts(sp->threads),
                      NULL};
    matvec(&all);
    for (int i = 0; i < sp->n; i++)
        if (sp->bias[i].buf != NULL) {
            float *o = sp->out + sp->m.start[i];
            const float *b = (const float *)sp->bias[i].buf;
            for (Py_ssize_t r = 0; r < sp->rows[i]; r++) o[r] = o[r] + b[r];
        }
}

static void step_free(step_products *sp) {
    for (int k = 0; k < sp->prepared; k++)
        if (sp->owner[k] == k) q_prep_free(&sp->p[k]);
    for (int i = 0; i < sp->held; i++) {
        PyBuffer_Release(&sp->w[i]);
        if (sp->bias[i].buf != NULL) PyBuffer_Release(&sp->bias[i]);
    }
    sp->prepared = sp->held = 0;
}

/* 64-byte aligned scratch arrays of n[i] floats each, one allocation (free *mem). 0 or -1. */
static int step_scratch(void **mem, int count, const Py_ssize_t *n, float **arr) {
    size_t total = 64;
    for (int i = 0; i < count; i++) total += ((size_t)n[i] * 4 + 63) / 64 * 64;
    *mem = PyMem_Malloc(total);
    if (*mem == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    uint8_t *m = (uint8_t *)(((uintptr_t)*mem + 63) & ~(uintptr_t)63);
    for (int i = 0; i < count; i++) {
        arr[i] = (float *)m;
        m += ((size_t)n[i] * 4 + 63) / 64 * 64;
    }
    return 0;
}

/* Whether x, out (and norm, unless NULL) are aligned fp32 [H] of one size, out not x; else 0 with
 * a ValueError naming fname. */
static int step_vector_ok(const char *fname, const Py_buffer *x, const Py_buffer *out, const Py_buffer *norm) {
    if (x->len <= 0 || x->len % 4 || out->len != x->len || ((uintptr_t)x->buf & 3) || ((uintptr_t)out->buf & 3) ||
        x->buf == out->buf || (norm != NULL && (norm->len != x->len || ((uintptr_t)norm->buf & 3)))) {
        if (norm != NULL)
            PyErr_Format(PyExc_ValueError, "%s: x, out and norm must be fp32 [H] of the same size, out not x (got "
                         "%zd, %zd and %zd bytes)", fname, x->len, out->len, norm->len);
        else
            PyErr_Format(PyExc_ValueError, "%s: x and out must be fp32 [H] of the same size, out not x (got %zd and "
                         "%zd bytes)", fname, x->len, out->len);
        return 0;
    }
    return 1;
}

static PyObject *attn_step(PyObject *self, PyObject *args) {
    Py_buffer x, out, norm, cs, sn, k, v, tab;
    PyObject *qkv_specs, *o_spec, *result = NULL;
    float eps, scale;
    int interleaved, threads, attn_threads, act;
    Py_ssize_t block;
    attend_args a;
    if (!PyArg_ParseTuple(args, "y*w*y*fOOy*y*pw*w*ny*nnnnnnfiii", &x, &out, &norm, &eps, &qkv_specs, &o_spec, &cs, &sn,
                          &interleaved, &k, &v, &a.head_stride, &tab, &block, &a.lo, &a.end, &a.hq, &a.hkv, &a.d,
                          &scale, &threads, &attn_threads, &act))
        return NULL;
    a.scale = scale;
    step_products qkv, o;
    memset(&qkv, 0, sizeof qkv);
    memset(&o, 0, sizeof o);
    void *mem = NULL;
    const Py_ssize_t H = x.len / 4, d = a.d, nq = a.hq * d, nk = a.hkv * d;
    if (!step_vector_ok("attn_step", &x, &out, &norm)) goto done;
    if (d <= 0 || d % 2 || cs.len != d * 4 || sn.len != d * 4 || ((uintptr_t)cs.buf & 3) || ((uintptr_t)sn.buf & 3) ||
        ((uintptr_t)k.buf & 3) || ((uintptr_t)v.buf & 3)) {
        PyErr_Format(PyExc_ValueError, "attn_step: cos and sin must be fp32 [d] for an even head dim d (%zd), the "
                     "caches fp32", d);
        goto done;
    }
    if (attend_setup("attn_step", &a, nq * 4, nq * 4, k.len, v.len, &tab, block) < 0) goto done;
    if (step_parse("attn_step", qkv_specs, 1, &qkv) < 0 || step_parse("attn_step", o_spec, 0, &o) < 0) goto done;
    if (qkv.n != 3 || qkv.rows[0] != nq || qkv.rows[1] != nk || qkv.rows[2] != nk || o.rows[0] != H) {
        PyErr_Format(PyExc_ValueError, "attn_step: q, k, v need %zd, %zd, %zd rows and o %zd (got %d products, o %zd)",
                     nq, nk, nk, H, qkv.n, o.rows[0]);
        goto done;
    }
    /* scratch: xn [H], q|k|v [nq + 2 nk], rotated q [nq], rotated k [nk], attention [nq], o(attention) [H] */
    float *xn, *qkvo, *qr, *kr, *att, *oo;
    {
        const Py_ssize_t sizes[6] = {H, nq + 2 * nk, nq, nk, nq, H};
        float *arr[6];
        if (step_scratch(&mem, 6, sizes, arr) < 0) goto done;
        xn = arr[0], qkvo = arr[1], qr = arr[2], kr = arr[3], att = arr[4], oo = arr[5];
    }
    if (step_prepare("attn_step", &qkv, xn, H, qkvo, threads, act) < 0 ||
        step_prepare("attn_step", &o, att, nq, oo, threads, act) < 0)
        goto done;
    a.q = qr, a.k = (const float *)k.buf, a.v = (const float *)v.buf, a.out = att;
    {
        const float *xv = (const float *)x.buf;
        float *ov = (float *)out.buf, *kc = (float *)k.buf, *vc = (float *)v.buf;
        const Py_ssize_t pos = a.end - 1, b = a.block_log2;
        const Py_ssize_t row = a.table == NULL ? pos
                               : (Py_ssize_t)a.table[pos >> b] * ((Py_ssize_t)1 << b) + (pos & (((Py_ssize_t)1 << b) - 1));
        Py_BEGIN_ALLOW_THREADS
        rms_norm_impl(xv, (const float *)norm.buf, xn, H, eps);
        step_run(&qkv);
        rope_impl(qkvo, qr, a.hq, d, (const float *)cs.buf, (const float *)sn.buf, interleaved);
        rope_impl(qkvo + nq, kr, a.hkv, d, (const float *)cs.buf, (const float *)sn.buf, interleaved);
        for (Py_ssize_t h = 0; h < a.hkv; h++) {
            memcpy(kc + h * a.head_stride + row * d, kr + h * d, (size_t)d * 4);
            memcpy(vc + h * a.head_stride + row * d, qkvo + nq + nk + h * d, (size_t)d * 4);
        }
        attend_run(&a, attn_threads);
        step_run(&o);
        for (Py_ssize_t i = 0; i < H; i++) ov[i] = xv[i] + oo[i];
        Py_END_ALLOW_THREADS
    }
    result = Py_None;
    Py_INCREF(result);
done:
    step_free(&qkv);
    step_free(&o);
    PyMem_Free(mem);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    PyBuffer_Release(&norm);
    PyBuffer_Release(&cs);
    PyBuffer_Release(&sn);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&tab);
    return result;
}

static PyObject *ffn_step(PyObject *self, PyObject *args) {
    Py_buffer x, out, norm;
    PyObject *gu_specs, *down_spec, *result = NULL;
    float eps;
    int kind, threads, act;
    if (!PyArg_ParseTuple(args, "y*w*y*fOOiii", &x, &out, &norm, &eps, &gu_specs, &down_spec, &kind, &threads, &act))
        return NULL;
    step_products gu, dn;
    memset(&gu, 0, sizeof gu);
    memset(&dn, 0, sizeof dn);
    void *mem = NULL;
    const Py_ssize_t H = x.len / 4;
    if (!step_vector_ok("ffn_step", &x, &out, &norm)) goto done;
    if (kind < 0 || kind > 2) {
        PyErr_Format(PyExc_ValueError, "ffn_step: kind must be 0 (silu), 1 (gelu tanh) or 2 (gelu erf), not %d", kind);
        goto done;
    }
    if (step_parse("ffn_step", gu_specs, 1, &gu) < 0 || step_parse("ffn_step", down_spec, 0, &dn) < 0) goto done;
    if (gu.n != 2 || gu.rows[0] != gu.rows[1] || gu.rows[0] <= 0 || dn.rows[0] != H) {
        PyErr_Format(PyExc_ValueError, "ffn_step: gate and up need the same rows, down %zd (got %d products, down %zd)",
                     H, gu.n, dn.rows[0]);
        goto done;
    }
    const Py_ssize_t I = gu.rows[0];
    float *xn, *guo, *am, *dd; /* xn [H], gate|up [2 I], act(gate) * up [I], down [H] */
    {
        const Py_ssize_t sizes[4] = {H, 2 * I, I, H};
        float *arr[4];
        if (step_scratch(&mem, 4, sizes, arr) < 0) goto done;
        xn = arr[0], guo = arr[1], am = arr[2], dd = arr[3];
    }
    if (step_prepare("ffn_step", &gu, xn, H, guo, threads, act) < 0 ||
        step_prepare("ffn_step", &dn, am, I, dd, threads, act) < 0)
        goto done;
    int finite = 1;
    {
        const float *xv = (const float *)x.buf;
        float *ov = (float *)out.buf;
        Py_BEGIN_ALLOW_THREADS
        rms_norm_impl(xv, (const float *)norm.buf, xn, H, eps);
        step_run(&gu);
        act_mul_impl(guo, guo + I, am, I, kind);
        step_run(&dn);
        for (Py_ssize_t i = 0; i < H; i++) {
            ov[i] = xv[i] + dd[i];
            finite &= isfinite(ov[i]) != 0;
        }
        Py_END_ALLOW_THREADS
    }
    result = PyBool_FromLong(finite);
done:
    step_free(&gu);
    step_free(&dn);
    PyMem_Free(mem);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    PyBuffer_Release(&norm);
    return result;
}


/* experts_step(xn, out, ((gate, up, down), ...), weights, kind, threads, act[, h]): the routed
 * experts of one token, out [H] = sum over e in order of weights[e] * down_e(act_mul(gate_e(xn),
 * up_e(xn))) (each term rounded, then added to the sum: the separate path's operations), 1 to 4
 * experts: their gates and ups in one job, their downs in another. With the residual h: out = h +
 * that sum, and returns whether out is all finite (else None). */
#define EXPERTS_MAX (STEP_MAX / 2)

__attribute__((optimize("fp-contract=off"))) /* product rounded, then added: never one fused multiply-add */
SHARED_NOINLINE static void weighted_sum(float *restrict out, const float *restrict d, const float *w, int n,
                                         Py_ssize_t H) {
    for (Py_ssize_t i = 0; i < H; i++) out[i] = d[i] * w[0];
    for (int e = 1; e < n; e++) {
        const float *de = d + e * H;
        for (Py_ssize_t i = 0; i < H; i++) {
            const float t = de[i] * w[e];
            out[i] = out[i] + t;
        }
    }
}

static PyObject *experts_step(PyObject *self, PyObject *args) {
    Py_buffer x, out, wts, res = {0};
    PyObject *experts, *result = NULL;
    int kind, threads, act;
    if (!PyArg_ParseTuple(args, "y*w*Oy*iii|y*", &x, &out, &experts, &wts, &kind, &threads, &act, &res)) return NULL;
    step_products gu, dn;
    memset(&gu, 0, sizeof gu);
    memset(&dn, 0, sizeof dn);
    void *mem = NULL;
    const Py_ssize_t H = x.len / 4;
    Py_ssize_t inter[EXPERTS_MAX], total_i = 0;
    int n = 0;
    if (!step_vector_ok("experts_step", &x, &out, NULL)) goto done;
    if (!PyTuple_Check(experts) || PyTuple_GET_SIZE(experts) < 1 || PyTuple_GET_SIZE(experts) > EXPERTS_MAX) {
        PyErr_Format(PyExc_ValueError, "experts_step: experts must be a tuple of 1 to %d (gate, up, down) spec tuples",
                     EXPERTS_MAX);
        goto done;
    }
    if (res.buf != NULL && (res.len != x.len || ((uintptr_t)res.buf & 3) || res.buf == out.buf)) {
        PyErr_Format(PyExc_ValueError, "experts_step: the residual must be fp32 [H] like x, not out (got %zd bytes)",
                     res.len);
        goto done;
    }
    n = (int)PyTuple_GET_SIZE(experts);
    if (kind < 0 || kind > 2 || wts.len != n * 4 || ((uintptr_t)wts.buf & 3)) {
        PyErr_Format(PyExc_ValueError, "experts_step: weights must be fp32 [%d] (got %zd bytes), kind 0 (silu), 1 "
                     "(gelu tanh) or 2 (gelu erf), not %d", n, wts.len, kind);
        goto done;
    }
    for (int e = 0; e < n; e++) {
        PyObject *t = PyTuple_GET_ITEM(experts, e);
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 3) {
            PyErr_SetString(PyExc_ValueError, "experts_step: each expert must be a (gate, up, down) tuple of specs");
            goto done;
        }
        if (step_parse_one("experts_step", PyTuple_GET_ITEM(t, 0), &gu) < 0 ||
            step_parse_one("experts_step", PyTuple_GET_ITEM(t, 1), &gu) < 0 ||
            step_parse_one("experts_step", PyTuple_GET_ITEM(t, 2), &dn) < 0)
            goto done;
        inter[e] = gu.rows[2 * e];
        if (inter[e] <= 0 || gu.rows[2 * e + 1] != inter[e] || dn.rows[e] != H) {
            PyErr_Format(PyExc_ValueError, "experts_step: expert %d: gate and up need the same rows, down %zd (got "
                         "%zd, %zd, %zd)", e, H, gu.rows[2 * e], gu.rows[2 * e + 1], dn.rows[e]);
            goto done;
        }
        total_i += inter[e];
    }
    float *guo, *am, *dd; /* gate|up of each expert [2 I_e], act(gate) * up [I_e], downs [n, H] */
    {
        const Py_ssize_t sizes[3] = {2 * total_i, total_i, (Py_ssize_t)n * H};
        float *arr[3];
        if (step_scratch(&mem, 3, sizes, arr) < 0) goto done;
        guo = arr[0], am = arr[1], dd = arr[2];
    }
    const float *axs[EXPERTS_MAX];
    {
        Py_ssize_t off = 0;
        for (int e = 0; e < n; e++) {
            axs[e] = am + off;
            off += inter[e];
        }
    }
    if (step_prepare("experts_step", &gu, (const float *)x.buf, H, guo, threads, act) < 0 ||
        step_prepare_each("experts_step", &dn, NULL, 0, axs, inter, dd, threads, act) < 0)
        goto done;
    int finite = 1;
    {
        const float *wv = (const float *)wts.buf;
        float *ov = (float *)out.buf;
        Py_BEGIN_ALLOW_THREADS
        step_run(&gu);
        Py_ssize_t off = 0;
        for (int e = 0; e < n; e++) { /* gate_e | up_e sit together in guo: rows 2 off .. 2 (off + I_e) */
            act_mul_impl(guo + 2 * off, guo + 2 * off + inter[e], am + off, inter[e], kind);
            off += inter[e];
        }
        step_run(&dn);
        weighted_sum(ov, dd, wv, n, H);
        if (res.buf != NULL) {
            const float *rv = (const float *)res.buf;
            for (Py_ssize_t i = 0; i < H; i++) {
                ov[i] = rv[i] + ov[i];
                finite &= isfinite(ov[i]) != 0;
            }
        }
        Py_END_ALLOW_THREADS
    }
    if (res.buf != NULL) {
        result = PyBool_FromLong(finite);
    } else {
        result = Py_None;
        Py_INCREF(result);
    }
done:
    step_free(&gu);
    step_free(&dn);
    PyMem_Free(mem);
    PyBuffer_Release(&x);
    PyBuffer_Release(&out);
    PyBuffer_Release(&wts);
    if (res.buf != NULL) PyBuffer_Release(&res);
    return result;
}


/* route_row(x, w, ids, weights, k, norm): the router of one fp32 token: logits = w @ x (w fp32
 * [E, H]), softmax (exp_f32 of logit - max, summed in expert order), the k most probable experts
 * in descending order (ties: the lower index first) into ids (int64 [k]) and their probabilities
 * into weights (fp32 [k]), divided by their sum (in that order) when norm. Both the fused MoE step
 * and the separate path call it for a one-token group, so they route identically. */
MULTIVERSION SHARED_NOINLINE
static void router_logits(const float *restrict x, const float *restrict w, float *restrict logits, Py_ssize_t E,
                          Py_ssize_t H) {
    for (Py_ssize_t e = 0; e < E; e++) {
        const float *we = w + e * H;
        float t = 0.f;
        for (Py_ssize_t h = 0; h < H; h++) t += we[h] * x[h];
        logits[e] = t;
    }
}

SHARED_NOINLINE static void route_pick(float *p, Py_ssize_t E, int k, int norm, int64_t *ids, float *weights) {
    float mx = -INFINITY, sum = 0.f;
    for (Py_ssize_t e = 0; e < E; e++) mx = p[e] > mx ? p[e] : mx;
    for (Py_ssize_t e = 0; e < E; e++) {
        p[e] = exp_f32(p[e] - mx);
        sum += p[e];
    }
    for (Py_ssize_t e = 0; e < E; e++) p[e] = p[e] / sum;
    for (int j = 0; j < k; j++) {
        Py_ssize_t best = -1;
        for (Py_ssize_t e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || p[e] > p[best])) best = e;
        }
        ids[j] = best;
        weights[j] = p[best];
    }
    if (norm) {
        float t = 0.f;
        for (int j = 0; j < k; j++) t += weights[j];
        for (int j = 0; j < k; j++) weights[j] = weights[j] / t;
    }
}

static PyObject *route_row(PyObject *self, PyObject *args) {
    Py_buffer x, w, ids, wo;
    int k, norm;
    if (!PyArg_ParseTuple(args, "y*y*w*w*ip", &x, &w, &ids, &wo, &k, &norm)) return NULL;
    PyObject *result = NULL;
    const Py_ssize_t H = x.len / 4, E = H > 0 ? w.len / (4 * H) : 0;
    float *p = NULL;
    if (H <= 0 || x.len % 4 || E < 1 || w.len != E * H * 4 || k < 1 || k > E || ids.len != (Py_ssize_t)k * 8 ||
        wo.len != (Py_ssize_t)k * 4 || ((uintptr_t)x.buf & 3) || ((uintptr_t)w.buf & 3) || ((uintptr_t)ids.buf & 7) ||
        ((uintptr_t)wo.buf & 3)) {
        PyErr_Format(PyExc_ValueError, "route_row: x fp32 [H], w fp32 [E, H], 1 <= k <= E, ids int64 [k] and weights "
                     "fp32 [k] (got %zd, %zd, %zd and %zd bytes, k = %d)", x.len, w.len, ids.len, wo.len, k);
        goto done;
    }
    p = (float *)PyMem_Malloc((size_t)E * sizeof(float));
    if (p == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    router_logits((const float *)x.buf, (const float *)w.buf, p, E, H);
    route_pick(p, E, k, norm, (int64_t *)ids.buf, (float *)wo.buf);
    result = Py_None;
    Py_INCREF(result);
done:
    PyMem_Free(p);
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&wo);
    return result;
}

/* ------------------------------------------------------------- KV rows from a host block pool
 * kv_gather(records, table, rows, heads, block, kv_heads, d, elem, out_k, out_v, slots_out): the key
 * and value rows at positions rows[r, i] of kv head heads[r] (runtime/kv/host.py HostKVPool.gather,
 * raw records [2, kv_heads, block, d] of `elem`-byte values, one per slot of `records`; table[b]: the
 * slot of block b, or -1 when it is not in host memory) into out_k / out_v [R, n, d], and the slot
 * of each row into slots_out [R * n] (for the pool's recency). Returns 0; 1 when a block is not in
 * host memory or a position is outside the table (nothing is promised about the outputs then: the
 * caller takes its general path, which brings blocks back or names the bad positions). */
#define GATHER_AHEAD 8 /* rows prefetched ahead of the one copied (~DRAM latency / time per row) */

static PyObject *kv_gather(PyObject *self, PyObject *args) {
    Py_buffer rec, table, rows, heads, ok, ov, so;
    Py_ssize_t block, kvh, d, elem;
    if (!PyArg_ParseTuple(args, "y*y*y*y*nnnnw*w*w*", &rec, &table, &rows, &heads, &block, &kvh, &d, &elem, &ok, &ov,
                          &so))
        return NULL;
    PyObject *result = NULL;
    Py_ssize_t R = heads.len / 8, n = R > 0 ? rows.len / 8 / R : 0, nblocks = table.len / 8;
    Py_ssize_t row_bytes = d * elem, rec_bytes = 2 * kvh * block * row_bytes;
    if (block <= 0 || kvh <= 0 || d <= 0 || (elem != 2 && elem != 4) || rows.len != R * n * 8 || rec_bytes <= 0 ||
        rec.len % rec_bytes || ok.len != R * n * row_bytes || ov.len != ok.len || so.len != R * n * 8) {
        PyErr_Format(PyExc_ValueError, "kv_gather: buffers do not match %zd rows of %zd positions, %zd kv heads, "
                     "blocks of %zd, %zd values of %zd bytes", R, n, kvh, block, d, elem);
        goto done;
    }
    const Py_ssize_t nslots = rec.len / rec_bytes;
    const int64_t *tb = (const int64_t *)table.buf, *pos = (const int64_t *)rows.buf, *hd = (const int64_t *)heads.buf;
    const uint8_t *base = (const uint8_t *)rec.buf;
    uint8_t *kout = (uint8_t *)ok.buf, *vout = (uint8_t *)ov.buf;
    int64_t *slots = (int64_t *)so.buf;
    int miss = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < R && !miss; r++) {
        int64_t h = hd[r];
        if (h < 0 || h >= kvh) {
            miss = 1;
            break;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t slot;
            if (i + GATHER_AHEAD < n) {  /* rows are scattered over the pool: ask for a later one now */
                const int64_t key2 = kv_pool_key_row(tb, nblocks, nslots, block, kvh, h, pos[r * n + i + GATHER_AHEAD],
                                                     &slot);
                if (key2 >= 0)
                    for (Py_ssize_t o = 0; o < row_bytes; o += 64) {
                        __builtin_prefetch(base + key2 * row_bytes + o, 0, 0);
                        __builtin_prefetch(base + (key2 + kvh * block) * row_bytes + o, 0, 0);
                    }
            }
            const int64_t key = kv_pool_key_row(tb, nblocks, nslots, block, kvh, h, pos[r * n + i], &slot);
            if (key < 0) {
                miss = 1;
                break;
            }
            memcpy(kout + (r * n + i) * row_bytes, base + key * row_bytes, (size_t)row_bytes);
            memcpy(vout + (r * n + i) * row_bytes, base + (key + kvh * block) * row_bytes, (size_t)row_bytes);
            slots[r * n + i] = slot;
        }
    }
    Py_END_ALLOW_THREADS
    result = PyLong_FromLong(miss);
done:
    PyBuffer_Release(&rec);
    PyBuffer_Release(&table);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&heads);
    PyBuffer_Release(&ok);
    PyBuffer_Release(&ov);
    PyBuffer_Release(&so);
    return result;
}

static PyMethodDef methods[] = {
    {"bf16_matvec_rows", bf16_matvec_rows, METH_VARARGS,
     "bf16_matvec_rows(w, x, out, rows, cols, batch, threads): out[b] = bf16(w) @ x[b] in fp32 for each of the "
     "batch rows of x, each exactly as bf16_matvec computes it, the weight read once (GIL released)."},
    {"bf16_matvec", bf16_matvec, METH_VARARGS,
     "bf16_matvec(w, x, out, rows, cols, threads): out = bf16(w) @ x in fp32 (GIL released)."},
    {"q_matvec", q_matvec, METH_VARARGS,
     "q_matvec(qtype, w, x, out, rows, cols, threads, act=0): out = dequant(w) @ x in fp32, w ggml blocks of type "
     "qtype; act=1: x quantized to int8 per 32 values, integer dot products (an approximation) (GIL released)."},
    {"q_dequantize", q_dequantize, METH_VARARGS,
     "q_dequantize(qtype, w, out, rows, cols, threads): out [rows, cols] fp32 = the dequantized ggml blocks "
     "(GIL released)."},
    {"q_matvec_many", q_matvec_many, METH_VARARGS,
     "q_matvec_many(x, cols, threads, act, ((qtype, w, out, rows), ...)[, batch=1]): several q_matvec products "
     "(up to 8) of each of `batch` fp32 x rows (x [batch, cols], out [batch, rows]) as one job on the pool, each x "
     "row prepared once per type, the weights read once for the batch; each output equals q_matvec's (GIL released)."},
    {"rms_norm", rms_norm, METH_VARARGS, "rms_norm(x, w, out, n, eps): out = w * (x / sqrt(mean(x^2) + eps)), fp32."},
    {"rope", rope, METH_VARARGS,
     "rope(x, out, heads, d, cos, sin, interleaved): rotary embedding of one position, fp32 [heads, d]."},
    {"act_mul", act_mul, METH_VARARGS,
     "act_mul(g, u, out, n, kind): out = act(g) * u, fp32 [n]; kind 0 silu, 1 gelu (tanh), 2 gelu (erf)."},
    {"attn_step", attn_step, METH_VARARGS,
     "attn_step(x, out, norm, eps, (q, k, v), o, cos, sin, interleaved, k_cache, v_cache, head_stride, table, block, "
     "lo, end, hq, hkv, d, scale, threads, attn_threads, act): one token's attention half of a layer, out = x + "
     "o(attend(rope(q), rope(k) written at end-1, v)) of rms_norm(x); specs (qtype, w, rows, bias|None) (GIL released)."},
    {"ffn_step", ffn_step, METH_VARARGS,
     "ffn_step(x, out, norm, eps, (gate, up), down, kind, threads, act) -> finite: one token's FFN half of a layer, "
     "out = x + down(act_mul(gate(xn), up(xn))), xn = rms_norm(x) (GIL released)."},
    {"experts_step", experts_step, METH_VARARGS,
     "experts_step(xn, out, ((gate, up, down), ...), weights, kind, threads, act[, h]): one token's routed experts (1 "
     "to 4), out = [h +] sum_e weights[e] * down_e(act_mul(gate_e(xn), up_e(xn))) in expert order; with h returns "
     "whether out is all finite (GIL released)."},
    {"route_row", route_row, METH_VARARGS,
     "route_row(x, w, ids, weights, k, norm): one fp32 token's router: softmax of w @ x, the k most probable "
     "experts (descending, ties to the lower index) and their probabilities, normalised to sum 1 when norm."},
    {"kv_gather", kv_gather, METH_VARARGS,
     "kv_gather(records, table, rows, heads, block, kv_heads, d, elem, out_k, out_v, slots_out): key and value rows "
     "of a host KV block pool at positions rows [R, n] of kv heads heads [R]; returns 0, or 1 when a block is not "
     "in host memory (GIL released)."},
    {"attend", attend, METH_VARARGS,
     "attend(q, k, v, out, hq, hkv, d, lo, end, head_stride, scale, threads[, table, block]): one query row's "
     "attention over positions lo..end-1, fp32 (GIL released); with an int64 block table, position p is row "
     "table[p / block] * block + p % block of each head (same arithmetic as the rows in order)."},
    {"cluster_search", cluster_search, METH_VARARGS,
     "cluster_search(q, ptrs, counts, out_pos, out_scanned, est_out, est_lse, R, D, k, budget, oversample, formats, "
     "two_level, estimate, bound_weight, group_scale, est_scale, threads): ClusterIndex searches of every kv head "
     "of a layer (+ the estimate of the rest) in one call; formats: bit 0 keys and summaries bf16, bit 1 summaries "
     "int8 with a scale per row; see native/cluster_search.c (GIL released)."},
    {"retrieval_attend", retrieval_attend, METH_VARARGS,
     "retrieval_attend(q, rk, rv, tk, tv, est_out, est_lse, out, H, G, S, n, D, res_bf16, ret_bf16, scale, threads): "
     "each query row's exact attention over its kv head's resident keys and its own retrieved keys, merged with "
     "the estimate of the rest; see native/cluster_search.c (GIL released)."},
    {"retrieval_attend_pool", retrieval_attend_pool, METH_VARARGS,
     "retrieval_attend_pool(q, resident_segments, records, table, positions, slots_out, est_out, est_lse, out, H, G, "
     "S, n, D, block, kv_heads, res_bf16, ret_bf16, scale, threads) -> 1 if a block is not in memory (nothing "
     "computed), else 0: retrieval_attend with the resident rows as segments and the retrieved rows read in place "
     "from a host KV pool (GIL released)."},
    {"sparse_ffn_rows", sparse_ffn_rows, METH_VARARGS,
     "sparse_ffn_rows(win, buf, row_bytes, hidden, bf16, idx, ptr, x, acc, batch, threads): acc[b] += the FFN of "
     "x[b] over its neuron rows idx[ptr[b]:ptr[b+1]] (>= 0 rows of win, < 0 rows -i-1 of buf), each column summed "
     "over the neurons in order; see native/sparse_ffn.c (GIL released)."},
    {"q_isa", q_isa, METH_NOARGS, "q_isa(): the kernel level in use: 4 AVX-512, 3 AVX2/FMA, 0 baseline."},
    {"q_prefetch", q_prefetch, METH_VARARGS,
     "q_prefetch([mode]) -> the mode before: how the quantized kernels prefetch weights ('l2': into L2 4 KiB "
     "ahead, Intel's default; 'nta': non-temporally 2 KiB ahead, the others'); results do not depend on it."},
    {"q_vnni", q_vnni, METH_NOARGS,
     "q_vnni(): whether int8-activation products (act=1) use the AVX-512 VNNI kernels (else AVX2 / baseline)."},
    {"q_set_isa", q_set_isa, METH_VARARGS,
     "q_set_isa(level): use at most that kernel level (4, 3, 0; for tests); returns the level now in use."},
    {"interleave16", interleave16, METH_VARARGS,
     "interleave16(low, high, out): out[2i] = low[i], out[2i+1] = high[i] (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
