// CublasLtGemm: strided-batched GEMMs of the Backend's row-major API (backend.h, Backend::gemm)
// on cuBLASLt, with the matmul descriptors, layouts and chosen algorithm cached per shape so that
// steady-state steps build none of them. Internal to the CUDA backend (includes cuBLASLt).
//
// Row-major to column-major: a row-major [R,C] matrix with leading dimension ld is, in the same
// memory, the column-major [C,R] matrix with the same ld, i.e. its transpose. So the row-major
//   C[M,N] = op(A) op(B)        is the column-major        C^T[N,M] = op(B)^T op(A)^T
// and cuBLASLt is called with its "A" = our B (op = trans_b), its "B" = our A (op = trans_a),
// m = N, n = M, k = K, and every leading dimension and batch stride as given.
//
// Numerics: compute type CUBLAS_COMPUTE_32F (never the TF32 fast mode), fp32 alpha/beta (host
// pointers). fp32 inputs give fp32 products and sums, as the CPU backend's sgemm; bf16 inputs
// are multiplied exactly and summed in fp32, the result rounded once to nearest even when the
// output is bf16. With beta == 0, C is not read (NaN there does not propagate).
// Determinism: one algorithm per cached shape, one stream, one workspace: cuBLAS gives bitwise
// the same result run to run on the same GPU model and library version.
#pragma once
#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>

namespace switcht5::cuda {

// One product C_b = alpha op(A_b) op(B_b) + beta C_b, b < batch, in the Backend's row-major
// terms. Supported types: A, B, C all CUDA_R_32F; or A, B CUDA_R_16BF and C CUDA_R_16BF or
// CUDA_R_32F. M, N, K, batch >= 1.
struct GemmProblem {
  bool trans_a = false, trans_b = false;
  int M = 0, N = 0, K = 0;
  int64_t lda = 0, ldb = 0, ldc = 0;
  int64_t stride_a = 0, stride_b = 0, stride_c = 0;
  int batch = 1;
  cudaDataType_t a_type = CUDA_R_32F, b_type = CUDA_R_32F, c_type = CUDA_R_32F;
};

class CublasLtGemm {
 public:
  // cuBLASLt's workspace: `workspace_bytes` of device memory at `workspace` (256-byte aligned),
  // used only by work on `stream`.
  CublasLtGemm(cudaStream_t stream, void* workspace, size_t workspace_bytes);
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // Enqueues the product on the stream (C is read when beta != 0, and written in place) and
  // returns true; returns false, enqueueing nothing, when cuBLASLt has no algorithm for this
  // problem and these pointers' alignments (the caller then widens bf16 operands to fp32).
  bool run(const GemmProblem& p, float alpha, const void* A, const void* B, float beta, void* C);
  static std::string describe(const GemmProblem& p);

  size_t cached_plans() const { return plans_.size(); }

 private:
  // What selects an algorithm: the problem, and the alignment (a power of two <= 256 bytes) of
  // every batch entry's pointer, which rules algorithms in or out.
  struct Key {
    GemmProblem p;
    uint32_t align_a = 0, align_b = 0, align_c = 0;
    bool operator==(const Key& o) const;
  };
  struct KeyHash {
    size_t operator()(const Key& k) const;
  };
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;  // cuBLASLt's A, B, C (= D)
    cublasLtMatmulAlgo_t algo{};
    bool found = false;  // false: cuBLASLt offered no algorithm (remembered, not asked again)
  };
  Plan make_plan(const Key& k) const;
  static void destroy(Plan& plan);

  cudaStream_t stream_;
  void* workspace_;
  size_t workspace_bytes_;
  cublasLtHandle_t handle_ = nullptr;
  std::unordered_map<Key, Plan, KeyHash> plans_;
};

}  // namespace switcht5::cuda
