#!/usr/bin/env bash
# Sets up a CUDA 13.0 build toolchain from PyPI wheels on a machine without CUDA or a GPU,
# so that candle's `cuda` feature compiles and links here. Prints the exports to use.
#   usage: scripts/cuda_toolchain.sh [DIR]        (default DIR: ~/.cache/granite-cuda)
#   then:  eval "$(bash scripts/cuda_toolchain.sh)"; cargo build --release --features cuda
#   to run a test binary here (no GPU): LD_LIBRARY_PATH=$CUDA_HOME/lib64
set -euo pipefail
DIR=${1:-$HOME/.cache/granite-cuda}
mkdir -p "$DIR"
if [ ! -x "$DIR/venv/bin/python" ]; then
  python3 -m venv "$DIR/venv" >&2
  "$DIR/venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-runtime==13.0.96 \
    nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85 nvidia-nvvm==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-cuda-nvrtc==13.0.88 nvidia-curand >&2
fi
CU=$("$DIR/venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')
HOME_DIR="$DIR/cudahome"
if [ ! -f "$HOME_DIR/lib64/libcuda.so" ]; then
  mkdir -p "$HOME_DIR/lib64"
  for d in bin include nvvm; do ln -sfn "$CU/$d" "$HOME_DIR/$d"; done
  # The wheels ship only versioned libraries; the linker wants unversioned names.
  for f in "$CU"/lib/*.so.*; do
    b=$(basename "$f"); ln -sf "$f" "$HOME_DIR/lib64/$b"; ln -sf "$f" "$HOME_DIR/lib64/${b%%.so.*}.so"
  done
  # No wheel has the driver library: link against a stub with the driver's SONAME.
  # Every cu* name in cuda.h, before and after its versioning macros (cuMemFree -> cuMemFree_v2).
  { grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CU/include/cuda.h"
    gcc -E -P "$CU/include/cuda.h" | grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' | sed 's/\s*($//'
  } | sort -u | sed 's/.*/int &(void){return 999;}/' > "$HOME_DIR/cuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$HOME_DIR/lib64/libcuda.so" "$HOME_DIR/cuda_stub.c"
fi
# Lets binaries built here start without a driver (CUDA calls then fail cleanly): the stub's SONAME.
ln -sf libcuda.so "$HOME_DIR/lib64/libcuda.so.1"
echo "export CUDA_HOME=$HOME_DIR CUDA_ROOT=$HOME_DIR CUDA_COMPUTE_CAP=\${CUDA_COMPUTE_CAP:-90} PATH=$HOME_DIR/bin:\$PATH"
echo "# run-time libraries for the GPU machine (not the stub): $CU/lib"
