/* flashtier._native: small CPU loops that Python and torch do slowly, built at install time.
 *
 * interleave16(low, high, out): out[2i] = low[i], out[2i+1] = high[i] for i < len(low);
 *   rebuilds little-endian 16-bit values (bf16/fp16 weights) from their byte planes
 *   (storage_backends/weight_codec.py). Runs with the GIL released.
 *
 * bf16_matvec(w, x, out, rows, cols, threads): out[r] = sum_k bf16(w[r, k]) * x[k] in fp32, for a
 *   row-major bf16 weight (raw 16-bit bits), fp32 x and fp32 out; single-token decode
 *   (runtime/kernels.py). Each bf16 is widened to fp32 exactly (a 16-bit shift); products are
 *   accumulated in fp32 in a vectorised order. Rows are split over a persistent pool of worker
 *   threads plus the caller (workers spin briefly between products, then sleep); the GIL is
 *   released. Compiled for AVX-512, AVX2+FMA and baseline
 *   x86-64, chosen at load time (GCC target_clones).
 *
 * The module is optional: when it is not built, callers fall back to torch / numba.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MULTIVERSION
#endif

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

static inline float bf16_to_f32(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Generic 16-lane vectors: GCC lowers them to one zmm (x86-64-v4), two ymm (v3) or four xmm. */
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef float v16f __attribute__((vector_size(64)));

static inline v16f load_bf16x16(const uint16_t *p) {
    v16h h;
    memcpy(&h, p, sizeof h);
    v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline v16f load_f32x16(const float *p) {
    v16f f;
    memcpy(&f, p, sizeof f);
    return f;
}

/* One row at a time (one sequential stream for the hardware prefetcher), four independent
 * 16-lane accumulators (hides the add latency), lanes summed at the end. */
MULTIVERSION
static void matvec_rows(const uint16_t *restrict w, const float *restrict x, float *restrict out,
                        Py_ssize_t r0, Py_ssize_t r1, Py_ssize_t k) {
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint16_t *row = w + r * k;
        v16f a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        Py_ssize_t i = 0;
        for (; i + 64 <= k; i += 64) {
            a0 += load_bf16x16(row + i) * load_f32x16(x + i);
            a1 += load_bf16x16(row + i + 16) * load_f32x16(x + i + 16);
            a2 += load_bf16x16(row + i + 32) * load_f32x16(x + i + 32);
            a3 += load_bf16x16(row + i + 48) * load_f32x16(x + i + 48);
        }
        for (; i + 16 <= k; i += 16) a0 += load_bf16x16(row + i) * load_f32x16(x + i);
        v16f a = (a0 + a1) + (a2 + a3);
        float acc = 0.f;
        for (int l = 0; l < 16; l++) acc += a[l];
        for (; i < k; i++) acc += bf16_to_f32(row[i]) * x[i];
        out[r] = acc;
    }
}

#define MAX_THREADS 64

typedef struct {
    const uint16_t *w;
    const float *x;
    float *out;
    Py_ssize_t rows, cols;
    int parts;
} matvec_job;

static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;   /* sleeping workers wait on it */
static pthread_cond_t pool_start = PTHREAD_COND_INITIALIZER;
static pthread_mutex_t call_mu = PTHREAD_MUTEX_INITIALIZER;   /* one product at a time */
static int pool_workers = 0;
static long pool_generation = 0;  /* bumped (seq_cst) to start a job */
static int pool_pending = 0;      /* workers that have not finished the current job */
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

static void run_part(const matvec_job *j, int part) {
    Py_ssize_t per = (j->rows + j->parts - 1) / j->parts;
    per = (per + 15) & ~(Py_ssize_t)15; /* whole cache lines of output */
    Py_ssize_t r0 = per * part, r1 = r0 + per < j->rows ? r0 + per : j->rows;
    if (r0 < r1) matvec_rows(j->w, j->x, j->out, r0, r1, j->cols);
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
        if (id < j.parts) run_part(&j, id);
        __atomic_sub_fetch(&pool_pending, 1, __ATOMIC_SEQ_CST);
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

static void matvec(const matvec_job *job_in) {
    matvec_job j = *job_in;
    if (j.parts <= 1 || j.rows < 64) {
        matvec_rows(j.w, j.x, j.out, 0, j.rows, j.cols);
        return;
    }
    pthread_mutex_lock(&call_mu);
    int workers = ensure_workers(j.parts - 1);
    if (j.parts > workers + 1) j.parts = workers + 1;
    pool_job = j;
    __atomic_store_n(&pool_pending, workers, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&pool_generation, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool_sleepers, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool_mu);
        pthread_cond_broadcast(&pool_start);
        pthread_mutex_unlock(&pool_mu);
    }
    run_part(&j, 0);
    while (__atomic_load_n(&pool_pending, __ATOMIC_SEQ_CST) > 0) cpu_relax();
    pthread_mutex_unlock(&call_mu);
}

static PyObject *bf16_matvec(PyObject *self, PyObject *args) {
    Py_buffer w, x, out;
    Py_ssize_t rows, cols;
    int threads;
    if (!PyArg_ParseTuple(args, "y*y*w*nni", &w, &x, &out, &rows, &cols, &threads)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (rows < 0 || cols < 0 || w.len != rows * cols * 2 || x.len != cols * 4 || out.len != rows * 4) {
        PyErr_Format(PyExc_ValueError,
                     "bf16_matvec: buffers of %zd, %zd and %zd bytes do not match a [%zd, %zd] bf16 weight, "
                     "an fp32 [%zd] input and an fp32 [%zd] output", w.len, x.len, out.len, rows, cols, cols, rows);
        goto done;
    }
    if (((uintptr_t)w.buf & 1) || ((uintptr_t)x.buf & 3) || ((uintptr_t)out.buf & 3)) {
        PyErr_SetString(PyExc_ValueError, "bf16_matvec: buffers must be aligned to their element size");
        goto done;
    }
    matvec_job j = {(const uint16_t *)w.buf, (const float *)x.buf, (float *)out.buf, rows, cols,
                    threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads)};
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

static PyMethodDef methods[] = {
    {"bf16_matvec", bf16_matvec, METH_VARARGS,
     "bf16_matvec(w, x, out, rows, cols, threads): out = bf16(w) @ x in fp32 (GIL released)."},
    {"interleave16", interleave16, METH_VARARGS,
     "interleave16(low, high, out): out[2i] = low[i], out[2i+1] = high[i] (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
