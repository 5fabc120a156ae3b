#!/usr/bin/env bash
# Packs a CUDA build for the lent GPU machine: strips the build's executables (symbols only:
# every test binary links the whole core and its sm_90 kernels, and unstripped the pack passed
# the device tool's 64 MiB limit), runs ../shared/tools/device-pack on it, and checks the size.
#
#   scripts/pack_gpu.sh [BUILD]        (default build-cuda; run from anywhere)
#   scripts/pack_gpu.sh [BUILD] --selftest   also try the pack in a bare Debian first
#
# Then on the GPU machine (device tool, carry [".device/pack.tar.zst"]):
#   tar --zstd -xf .device/pack.tar.zst && source .device/env.sh && scripts/gpu_check.sh /tmp/gc
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD=${1:-build-cuda}
[[ -d $BUILD ]] || { echo "pack_gpu: no build directory '$BUILD'"; exit 2; }
LIMIT=$((64 * 1024 * 1024))
find "$BUILD" -path "$BUILD/pyenv" -prune -o -type f -perm -u+x -print | while read -r f; do
  head -c 4 "$f" | grep -q $'\x7fELF' && strip --strip-unneeded "$f"
done
../shared/tools/device-pack "$BUILD"
size=$(stat -c %s .device/pack.tar.zst)
echo "pack_gpu: .device/pack.tar.zst is $size bytes (limit $LIMIT)"
(( size <= LIMIT )) || { echo "pack_gpu: over the device tool's 64 MiB"; exit 1; }
if [[ "${2:-}" == --selftest ]]; then ../shared/tools/device-pack --selftest "$BUILD"; fi
