#!/usr/bin/env bash
# Install llama.cpp, through llama-cpp-python 0.3.36, into the project's .venv: the llama.cpp peer of
# the benchmarks (benchmarks/peers/llamacpp.py) and its GGUF quantizer / logits oracle.
#   bash scripts/install_llamacpp.sh          # does nothing when `import llama_cpp` already works
# PyPI ships llama-cpp-python only as a source distribution, so this compiles llama.cpp (cmake +
# ninja, a Release CPU build with -march=native) with only what the Python package loads: libllama
# and ggml. Left out: the multimodal library (mtmd/llava), llama.cpp's common library, tools,
# examples, tests, server, curl/openssl and OpenMP (ggml's own thread pool is used). About 3 minutes
# on 2 cores. The wheel is kept in a cache folder keyed by these flags, so a reinstall on the same
# machine takes a second. Env: PY (default .venv/bin/python), LLAMACPP_WHEEL_DIR (the cache folder),
# CMAKE_BUILD_PARALLEL_LEVEL (default: all cores).
#
# Models must be loaded with llama_model_params.use_extra_bufts = False (benchmarks/peers/llamacpp.py
# does it): the default CPU "repack" buffers copy Q4_0/Q4_K/IQ4_NL weights into anonymous memory,
# which defeats mmap under a memory cap.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
VERSION=0.3.36

if "$PY" -c "import llama_cpp" 2>/dev/null; then
    echo "llama-cpp-python $("$PY" -c 'import llama_cpp; print(llama_cpp.__version__)') already importable by $PY"
    exit 0
fi

CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
-DGGML_OPENMP=OFF -DGGML_CCACHE=OFF"
key=$(printf '%s|%s|%s|%s' "$VERSION" "$CMAKE_ARGS" "$(uname -m)" "$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true)" \
      | sha256sum | cut -c1-12)
WHEELS=${LLAMACPP_WHEEL_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/flashtier/llama-cpp-python-$VERSION-$key}
mkdir -p "$WHEELS"
whl=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)

if [ -z "$whl" ]; then
    # llama-cpp-python forces LLAMA_BUILD_COMMON ON in the CMake cache, but the Python package never
    # loads libllama-common (it is llama.cpp's CLI/server helper code, a third of the compile): a
    # directory-scope variable set right after llama.cpp's project() shadows the cached ON.
    cat > "$WHEELS/no_common.cmake" <<'EOF'
set(LLAMA_BUILD_COMMON OFF)
EOF
    export CMAKE_ARGS="$CMAKE_ARGS -DCMAKE_PROJECT_llama.cpp_INCLUDE=$WHEELS/no_common.cmake"
    export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
    echo "building llama-cpp-python $VERSION (CMAKE_ARGS=$CMAKE_ARGS) into $WHEELS"
    t0=$(date +%s)
    # --no-cache-dir: pip's own wheel cache is keyed by the sdist, not by CMAKE_ARGS, so it could
    # hand back a wheel built with other flags; this script keeps its own, keyed by the flags.
    "$PY" -m pip wheel --no-cache-dir --no-deps --no-binary llama-cpp-python -w "$WHEELS" "llama-cpp-python==$VERSION"
    echo "built in $(( $(date +%s) - t0 )) s"
    whl=$(ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl | head -n1)
fi

"$PY" -m pip install "$whl"
"$PY" - <<'EOF'
import llama_cpp

p = llama_cpp.llama_model_default_params()
p.use_extra_bufts = False
print("llama-cpp-python", llama_cpp.__version__, "|", llama_cpp.llama_print_system_info().decode().strip())
EOF
