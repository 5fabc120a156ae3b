#!/usr/bin/env python3
"""Prints, as one JSON object, the CUDA driver, runtime, cuBLAS, cuBLASLt and NCCL versions that
this process's library path resolves (the ones the switcht5 binaries load; ctypes, no torch),
and the GPU's name and count when the driver answers (the driver's own version: nvidia-smi). Missing pieces are null. Used by scripts/gpu_check.sh
and scripts/bench_gpu.sh."""
import ctypes
import json


def load(*names):
    for n in names:
        try:
            return ctypes.CDLL(n)
        except OSError:
            pass
    return None


def dotted(v, scale):  # 13000 -> "13.0" (runtime: 1000*major + 10*minor)
    return f"{v // scale[0]}.{(v % scale[0]) // scale[1]}" if v else None


out = {"gpu": None, "gpus": 0, "driver_cuda": None, "runtime": None, "cublas": None, "cublasLt": None,
       "nccl": None}
rt = load("libcudart.so.13", "libcudart.so.12", "libcudart.so")
if rt:
    v = ctypes.c_int(0)
    if rt.cudaDriverGetVersion(ctypes.byref(v)) == 0:
        out["driver_cuda"] = dotted(v.value, (1000, 10))  # the CUDA version the driver supports
    if rt.cudaRuntimeGetVersion(ctypes.byref(v)) == 0:
        out["runtime"] = dotted(v.value, (1000, 10))
    n = ctypes.c_int(0)
    if rt.cudaGetDeviceCount(ctypes.byref(n)) == 0 and n.value > 0:
        name = ctypes.create_string_buffer(256)
        cuda = load("libcuda.so.1")
        dev = ctypes.c_int(0)
        if cuda and cuda.cuInit(0) == 0 and cuda.cuDeviceGet(ctypes.byref(dev), 0) == 0 \
                and cuda.cuDeviceGetName(name, 256, dev) == 0:
            out["gpu"] = name.value.decode()
        out["gpus"] = n.value
blas = load("libcublas.so.13", "libcublas.so.12", "libcublas.so")
if blas:
    parts = []
    for prop in (0, 1, 2):  # MAJOR_VERSION, MINOR_VERSION, PATCH_LEVEL (libraryPropertyType)
        v = ctypes.c_int(0)
        parts.append(str(v.value) if blas.cublasGetProperty(prop, ctypes.byref(v)) == 0 else "?")
    out["cublas"] = ".".join(parts)
lt = load("libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so")
if lt:
    lt.cublasLtGetVersion.restype = ctypes.c_size_t
    out["cublasLt"] = str(lt.cublasLtGetVersion())
nccl = load("libnccl.so.2", "libnccl.so")
if nccl:
    v = ctypes.c_int(0)
    if nccl.ncclGetVersion(ctypes.byref(v)) == 0:
        out["nccl"] = str(v.value)
print(json.dumps(out))
