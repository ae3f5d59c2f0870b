/* flashtier._native: small CPU loops that Python and torch do slowly, built at install time.
 *
 * interleave16(low, high, out): out[2i] = low[i], out[2i+1] = high[i] for i < len(low);
 *   rebuilds little-endian 16-bit values (bf16/fp16 weights) from their byte planes
 *   (storage_backends/weight_codec.py). Runs with the GIL released.
 *
 * The module is optional: when it is not built, callers fall back to torch (see weight_codec).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

static PyMethodDef methods[] = {
    {"interleave16", interleave16, METH_VARARGS,
     "interleave16(low, high, out): out[2i] = low[i], out[2i+1] = high[i] (GIL released)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
