/* sparse_ffn_rows: the sparse FFN of several one-token rows over neuron rows held in two row
 * matrices (runtime/weights/sparse_ffn.py), straight from the bundles (no gather copy).
 *
 * A bundle row of neuron j is gate[j] | up[j] | down[:, j] (H values each, fp32 or bf16, padded
 * to row_bytes). For each activation row b and each of its neurons in the order given:
 *
 *     h = relu(gate[j] . x[b]) * (up[j] . x[b])      (dot products as the bf16 decode kernel: one
 *                                                     16-lane fp32 accumulator over the 16-value
 *                                                     chunks in order, the fixed lane sum, the tail)
 *     acc[b, c] += h * down[j, c]   for every column c, one neuron after the other
 *
 * Each column of acc is a sequential fp32 sum over the neurons in the order given, and each h is a
 * function of (neuron row, x row) alone: a call over neurons [a, b, c] leaves acc as a call over
 * [a, b] followed by a call over [c] does. The caller splits a row's neurons (ascending ids) over
 * several calls where some are read into another buffer (overflow), and the result is the same bits
 * as one call: a row's output depends on its input and its neurons only, not on the batch it is in
 * nor on which neurons the window held (batch and history invariance).
 *
 * Arguments: win, buf: row matrices (uint8, rows of row_bytes); idx [nnz] int64: >= 0 a row of win,
 * < 0 the row -idx-1 of buf; ptr [batch + 1] int64: row b's neurons are idx[ptr[b] .. ptr[b+1]);
 * x [batch, H] fp32; acc [batch, H] fp32, accumulated into. Threads: the dot products are split over
 * neurons, the accumulation over 64-column blocks (each column summed by one thread, in order).
 */
#include "common.h"

typedef struct {
    const uint8_t *win, *buf;
    Py_ssize_t win_rows, buf_rows, row_bytes, hidden, batch;
    int bf16;
    const int64_t *idx, *ptr;
    const int32_t *row_of_item; /* [nnz]: the activation row of each item */
    const float *x;
    float *h;   /* [nnz] */
    float *acc; /* [batch, hidden] */
} sffn_args;

static ALWAYS_INLINE const uint8_t *sffn_row(const sffn_args *a, int64_t i) {
    return i >= 0 ? a->win + i * a->row_bytes : a->buf + (-i - 1) * a->row_bytes;
}

#pragma GCC push_options
#pragma GCC optimize("no-associative-math")
static ALWAYS_INLINE float sffn_dot(const uint8_t *row, const float *restrict x, Py_ssize_t n, int bf16) {
    v16f s = (v16f){0};
    Py_ssize_t i = 0;
    if (bf16) {
        const uint16_t *w = (const uint16_t *)row;
        for (; i + 16 <= n; i += 16) s += load_bf16x16(w + i) * load_f32x16(x + i);
        float t = hsum16_tree(s);
        for (; i < n; i++) t += bf16_to_f32(w[i]) * x[i];
        return t;
    }
    const float *w = (const float *)row;
    for (; i + 16 <= n; i += 16) s += load_f32x16(w + i) * load_f32x16(x + i);
    float t = hsum16_tree(s);
    for (; i < n; i++) t += w[i] * x[i];
    return t;
}

MULTIVERSION
static void sffn_dots(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    const sffn_args *a = (const sffn_args *)j->ctx;
    Py_ssize_t hd = a->hidden, es = a->bf16 ? 2 : 4;
    for (Py_ssize_t r = r0; r < r1; r++) {
        const uint8_t *row = sffn_row(a, a->idx[r]);
        const float *x = a->x + (Py_ssize_t)a->row_of_item[r] * hd;
        float g = sffn_dot(row, x, hd, a->bf16);
        float u = sffn_dot(row + hd * es, x, hd, a->bf16);
        a->h[r] = (g > 0.f ? g : 0.f) * u;
    }
}

/* Job rows: batch x column blocks of 64. */
MULTIVERSION
static void sffn_accumulate(const matvec_job *j, Py_ssize_t r0, Py_ssize_t r1) {
    const sffn_args *a = (const sffn_args *)j->ctx;
    Py_ssize_t hd = a->hidden, es = a->bf16 ? 2 : 4, blocks = (hd + 63) / 64;
    for (Py_ssize_t r = r0; r < r1; r++) {
        Py_ssize_t b = r / blocks, c0 = (r % blocks) * 64, c1 = c0 + 64 < hd ? c0 + 64 : hd;
        float *restrict acc = a->acc + b * hd;
        for (int64_t t = a->ptr[b]; t < a->ptr[b + 1]; t++) {
            const uint8_t *down = sffn_row(a, a->idx[t]) + 2 * hd * es;
            float hv = a->h[t];
            if (a->bf16) {
                const uint16_t *d = (const uint16_t *)down;
                for (Py_ssize_t c = c0; c < c1; c++) acc[c] += hv * bf16_to_f32(d[c]);
            } else {
                const float *d = (const float *)down;
                for (Py_ssize_t c = c0; c < c1; c++) acc[c] += hv * d[c];
            }
        }
    }
}
#pragma GCC pop_options

HIDDEN PyObject *sparse_ffn_rows(PyObject *self, PyObject *args) {
    Py_buffer win, buf, idx, ptr, x, acc;
    Py_ssize_t row_bytes, hidden, batch;
    int bf16, threads;
    if (!PyArg_ParseTuple(args, "y*y*nnpy*y*y*w*ni", &win, &buf, &row_bytes, &hidden, &bf16, &idx, &ptr, &x, &acc,
                          &batch, &threads))
        return NULL;
    PyObject *result = NULL;
    int32_t *row_of_item = NULL;
    float *h = NULL;
    Py_ssize_t es = bf16 ? 2 : 4, nnz = idx.len / 8;
    if (row_bytes <= 0 || hidden <= 0 || batch < 1 || 3 * hidden * es > row_bytes || win.len % row_bytes
        || buf.len % row_bytes || idx.len % 8 || ptr.len != (batch + 1) * 8 || x.len != batch * hidden * 4
        || acc.len != batch * hidden * 4 || ((uintptr_t)x.buf & 3) || ((uintptr_t)acc.buf & 3)
        || ((uintptr_t)idx.buf & 7) || ((uintptr_t)ptr.buf & 7) || ((uintptr_t)win.buf & 3) || ((uintptr_t)buf.buf & 3)
        || (row_bytes & 3)) {
        PyErr_Format(PyExc_ValueError,
                     "sparse_ffn_rows: buffers do not match %zd rows of %zd bytes holding 3 x %zd %s values, "
                     "x/acc [%zd, %zd] fp32, int64 ptr [%zd] and idx (or are misaligned)",
                     win.len / (row_bytes > 0 ? row_bytes : 1), row_bytes, hidden, bf16 ? "bf16" : "fp32", batch,
                     hidden, batch + 1);
        goto done;
    }
    const int64_t *ix = (const int64_t *)idx.buf, *pt = (const int64_t *)ptr.buf;
    Py_ssize_t win_rows = win.len / row_bytes, buf_rows = buf.len / row_bytes;
    if (pt[0] != 0 || pt[batch] != nnz) {
        PyErr_Format(PyExc_ValueError, "sparse_ffn_rows: ptr must run from 0 to len(idx) = %zd", nnz);
        goto done;
    }
    row_of_item = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof *row_of_item);
    h = malloc((size_t)(nnz > 0 ? nnz : 1) * sizeof *h);
    if (row_of_item == NULL || h == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t b = 0; b < batch; b++) {
        if (pt[b + 1] < pt[b]) {
            PyErr_Format(PyExc_ValueError, "sparse_ffn_rows: ptr must not decrease (row %zd)", b);
            goto done;
        }
        for (int64_t t = pt[b]; t < pt[b + 1]; t++) {
            int64_t i = ix[t];
            if (i >= win_rows || (i < 0 && -i - 1 >= buf_rows)) {
                PyErr_Format(PyExc_IndexError, "sparse_ffn_rows: neuron row %lld outside the %zd window rows and "
                             "%zd buffer rows", (long long)i, win_rows, buf_rows);
                goto done;
            }
            row_of_item[t] = (int32_t)b;
        }
    }
    sffn_args a = {win.buf, buf.buf, win_rows, buf_rows, row_bytes, hidden, batch, bf16, ix, pt, row_of_item,
                   (const float *)x.buf, h, (float *)acc.buf};
    matvec_job dots = {sffn_dots, NULL, NULL, NULL, NULL, nnz, hidden, row_bytes, pool_parts(threads), NULL, &a, 0};
    matvec_job sums = {sffn_accumulate, NULL, NULL, NULL, NULL, batch * ((hidden + 63) / 64), hidden, row_bytes,
                       pool_parts(threads), NULL, &a, 1};
    Py_BEGIN_ALLOW_THREADS
    if (nnz > 0) {
        pool_run(&dots, 64);
        pool_run(&sums, 4);
    }
    Py_END_ALLOW_THREADS
    result = Py_None;
    Py_INCREF(result);
done:
    free(row_of_item);
    free(h);
    PyBuffer_Release(&win);
    PyBuffer_Release(&buf);
    PyBuffer_Release(&idx);
    PyBuffer_Release(&ptr);
    PyBuffer_Release(&x);
    PyBuffer_Release(&acc);
    return result;
}
