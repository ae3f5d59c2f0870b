"""Build of the optional C extension ``flashtier._native`` (everything else is in pyproject.toml).

``optional=True``: without a C compiler the install still succeeds and flashtier falls back to
torch for the loops the extension speeds up (storage_backends/weight_codec.py says which).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("flashtier._native", ["native/_native.c"], extra_compile_args=["-O3"], optional=True)])
