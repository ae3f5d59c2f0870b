"""Build of the optional C extension ``flashtier._native`` (everything else is in pyproject.toml).

``optional=True``: without a C compiler the install still succeeds and flashtier falls back to
torch / numba for the loops the extension speeds up (runtime/kernels.py and
storage_backends/weight_codec.py say which). The reassociation flags let GCC vectorise the fp32
sums of the matrix-vector product; they are compile-only (no -ffast-math at link time, which would
switch the whole process to flush-to-zero).
"""

from setuptools import Extension, setup

FLAGS = ["-O3", "-fassociative-math", "-fno-signed-zeros", "-fno-trapping-math", "-pthread"]

setup(ext_modules=[Extension("flashtier._native", ["native/_native.c", "native/cluster_search.c", "native/sparse_ffn.c"], extra_compile_args=FLAGS,
                             extra_link_args=["-pthread"], optional=True,
                             depends=["native/common.h"])])
