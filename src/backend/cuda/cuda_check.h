// The CUDA backend's error path: every CUDA runtime and cuBLASLt call is wrapped, and a failure
// throws switcht5::Error (core/check.h) with file:line, the call as written and the library's
// message, through cuda_fail (defined in cuda_check.cpp, compiled by the C++ compiler: fmt and
// spdlog stay out of .cu files, where nvcc's C++20 mode rejects them).
//   SWT_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream));
//   SWT_CUBLAS_CHECK(cublasLtMatmul(...));
// SWT_CUBLAS_CHECK names the status with cublasLtGetStatusString (cublasLt.h), so the backend
// links libcublasLt only, not libcublas.
#pragma once

namespace switcht5::cuda {
// library: "CUDA" or "cuBLAS"; code: the status; message: the library's text for it.
[[noreturn]] void cuda_fail(const char* file, int line, const char* call, const char* library,
                            int code, const char* message);
}  // namespace switcht5::cuda

#define SWT_CUDA_CHECK(call)                                                                 \
  do {                                                                                       \
    const cudaError_t swt_err_ = (call);                                                     \
    if (swt_err_ != cudaSuccess)                                                             \
      ::switcht5::cuda::cuda_fail(__FILE__, __LINE__, #call, "CUDA", int(swt_err_),          \
                                  cudaGetErrorString(swt_err_));                             \
  } while (0)

#define SWT_CUBLAS_CHECK(call)                                                               \
  do {                                                                                       \
    const cublasStatus_t swt_st_ = (call);                                                   \
    if (swt_st_ != CUBLAS_STATUS_SUCCESS)                                                    \
      ::switcht5::cuda::cuda_fail(__FILE__, __LINE__, #call, "cuBLAS", int(swt_st_),         \
                                  cublasLtGetStatusString(swt_st_));                         \
  } while (0)
