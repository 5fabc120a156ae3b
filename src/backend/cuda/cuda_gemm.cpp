#include "backend/cuda/cuda_gemm.h"

#include <fmt/format.h>

#include <bit>
#include <functional>

#include "backend/cuda/cuda_check.h"
#include "core/check.h"

namespace switcht5::cuda {

namespace {

size_t element_size(cudaDataType_t t) { return t == CUDA_R_16BF ? 2 : 4; }

const char* type_name(cudaDataType_t t) {
  return t == CUDA_R_32F ? "fp32" : t == CUDA_R_16BF ? "bf16" : "?";
}

// The largest power of two (<= 256) dividing the address of every batch entry: the address and,
// when there are several entries, the batch stride in bytes.
uint32_t alignment(const void* ptr, int64_t stride, cudaDataType_t t, int batch) {
  uint64_t bits = reinterpret_cast<uintptr_t>(ptr) | 256u;
  if (batch > 1) bits |= static_cast<uint64_t>(stride) * element_size(t);
  return static_cast<uint32_t>(bits & (~bits + 1));  // lowest set bit
}

void set_layout(cublasLtMatrixLayout_t* layout, cudaDataType_t type, uint64_t rows,
                uint64_t cols, int64_t ld, int batch, int64_t stride) {
  SWT_CUBLAS_CHECK(cublasLtMatrixLayoutCreate(layout, type, rows, cols, ld));
  const int32_t count = batch;
  SWT_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(*layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT,
                                                    &count, sizeof count));
  SWT_CUBLAS_CHECK(cublasLtMatrixLayoutSetAttribute(
      *layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, &stride, sizeof stride));
}

}  // namespace

std::string CublasLtGemm::describe(const GemmProblem& p) {
  return fmt::format(
      "gemm {}x{}->{} trans={}{} M={} N={} K={} lda={} ldb={} ldc={} strides {}/{}/{} batch={}",
      type_name(p.a_type), type_name(p.b_type), type_name(p.c_type), p.trans_a, p.trans_b, p.M,
      p.N, p.K, p.lda, p.ldb, p.ldc, p.stride_a, p.stride_b, p.stride_c, p.batch);
}

bool CublasLtGemm::Key::operator==(const Key& o) const {
  return p.trans_a == o.p.trans_a && p.trans_b == o.p.trans_b && p.M == o.p.M && p.N == o.p.N &&
         p.K == o.p.K && p.lda == o.p.lda && p.ldb == o.p.ldb && p.ldc == o.p.ldc &&
         p.stride_a == o.p.stride_a && p.stride_b == o.p.stride_b &&
         p.stride_c == o.p.stride_c && p.batch == o.p.batch && p.a_type == o.p.a_type &&
         p.b_type == o.p.b_type && p.c_type == o.p.c_type && align_a == o.align_a &&
         align_b == o.align_b && align_c == o.align_c;
}

size_t CublasLtGemm::KeyHash::operator()(const Key& k) const {
  uint64_t h = 0xcbf29ce484222325ull;
  auto mix = [&h](uint64_t v) { h = (h ^ v) * 0x100000001b3ull; };
  const GemmProblem& p = k.p;
  mix(uint64_t(p.trans_a) | uint64_t(p.trans_b) << 1);
  for (int64_t v : {int64_t(p.M), int64_t(p.N), int64_t(p.K), p.lda, p.ldb, p.ldc, p.stride_a,
                    p.stride_b, p.stride_c, int64_t(p.batch)})
    mix(static_cast<uint64_t>(v));
  mix(uint64_t(p.a_type) | uint64_t(p.b_type) << 16 | uint64_t(p.c_type) << 32);
  mix(uint64_t(k.align_a) | uint64_t(k.align_b) << 16 | uint64_t(k.align_c) << 32);
  return static_cast<size_t>(h);
}

CublasLtGemm::CublasLtGemm(cudaStream_t stream, void* workspace, size_t workspace_bytes)
    : stream_(stream), workspace_(workspace), workspace_bytes_(workspace_bytes) {
  SWT_CUBLAS_CHECK(cublasLtCreate(&handle_));
}

CublasLtGemm::~CublasLtGemm() {
  for (auto& [key, plan] : plans_) destroy(plan);
  if (handle_) cublasLtDestroy(handle_);
}

void CublasLtGemm::destroy(Plan& plan) {
  // Not checked: called from a destructor and on an error path.
  if (plan.a) cublasLtMatrixLayoutDestroy(plan.a);
  if (plan.b) cublasLtMatrixLayoutDestroy(plan.b);
  if (plan.c) cublasLtMatrixLayoutDestroy(plan.c);
  if (plan.op) cublasLtMatmulDescDestroy(plan.op);
  plan = Plan{};
}

CublasLtGemm::Plan CublasLtGemm::make_plan(const Key& k) const {
  const GemmProblem& p = k.p;
  Plan plan;
  cublasLtMatmulPreference_t pref = nullptr;
  try {
    SWT_CUBLAS_CHECK(cublasLtMatmulDescCreate(&plan.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    // Column-major view (file comment of cuda_gemm.h): cuBLASLt's A is our B, its B our A.
    const cublasOperation_t op_a = p.trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
    const cublasOperation_t op_b = p.trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
    SWT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSA, &op_a,
                                                    sizeof op_a));
    SWT_CUBLAS_CHECK(cublasLtMatmulDescSetAttribute(plan.op, CUBLASLT_MATMUL_DESC_TRANSB, &op_b,
                                                    sizeof op_b));
    // Stored (column-major) shapes. Ours: B is [K,N] row-major ([N,K] when trans_b), i.e.
    // column-major [N,K] ([K,N]); A is [M,K] ([K,M]) row-major, column-major [K,M] ([M,K]);
    // C is [M,N] row-major, column-major [N,M].
    set_layout(&plan.a, p.b_type, p.trans_b ? p.K : p.N, p.trans_b ? p.N : p.K, p.ldb, p.batch,
               p.stride_b);
    set_layout(&plan.b, p.a_type, p.trans_a ? p.M : p.K, p.trans_a ? p.K : p.M, p.lda, p.batch,
               p.stride_a);
    set_layout(&plan.c, p.c_type, p.N, p.M, p.ldc, p.batch, p.stride_c);

    SWT_CUBLAS_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    const uint64_t ws = workspace_bytes_;
    SWT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws));
    // Split-K partial sums only in the compute type (fp32, in the workspace): the "in place"
    // and "output type" schemes add partials in C's type, which for a bf16 C rounds more than
    // once (backend.h: C is rounded once). No split-K at all is always allowed.
    const uint32_t reduction = CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    SWT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(
        pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &reduction, sizeof reduction));
    const uint32_t align[4] = {k.align_b, k.align_a, k.align_c, k.align_c};  // cuBLASLt A B C D
    const cublasLtMatmulPreferenceAttributes_t align_attr[4] = {
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
        CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES};
    for (int i = 0; i < 4; ++i)
      SWT_CUBLAS_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, align_attr[i], &align[i],
                                                            sizeof align[i]));
    cublasLtMatmulHeuristicResult_t result{};
    int found = 0;
    const cublasStatus_t st = cublasLtMatmulAlgoGetHeuristic(handle_, plan.op, plan.a, plan.b,
                                                             plan.c, plan.c, pref, 1, &result,
                                                             &found);
    // "No algorithm" comes back as found == 0 or as CUBLAS_STATUS_NOT_SUPPORTED.
    if (st != CUBLAS_STATUS_NOT_SUPPORTED) SWT_CUBLAS_CHECK(st);
    if (st != CUBLAS_STATUS_SUCCESS) found = 0;
    plan.found = found > 0 && result.state == CUBLAS_STATUS_SUCCESS;
    if (plan.found) plan.algo = result.algo;
    cublasLtMatmulPreferenceDestroy(pref);
  } catch (...) {
    if (pref) cublasLtMatmulPreferenceDestroy(pref);
    destroy(plan);
    throw;
  }
  return plan;
}

bool CublasLtGemm::run(const GemmProblem& p, float alpha, const void* A, const void* B,
                       float beta, void* C) {
  SWT_CHECK(p.M > 0 && p.N > 0 && p.K > 0 && p.batch > 0, "CublasLtGemm::run on an empty {}",
            describe(p));
  const bool fp32 = p.a_type == CUDA_R_32F && p.b_type == CUDA_R_32F && p.c_type == CUDA_R_32F;
  const bool bf16 = p.a_type == CUDA_R_16BF && p.b_type == CUDA_R_16BF &&
                    (p.c_type == CUDA_R_16BF || p.c_type == CUDA_R_32F);
  SWT_CHECK(fp32 || bf16, "CublasLtGemm::run: unsupported types in {}", describe(p));
  Key key{p, alignment(A, p.stride_a, p.a_type, p.batch),
          alignment(B, p.stride_b, p.b_type, p.batch),
          alignment(C, p.stride_c, p.c_type, p.batch)};
  auto it = plans_.find(key);
  if (it == plans_.end()) it = plans_.emplace(key, make_plan(key)).first;
  const Plan& plan = it->second;
  if (!plan.found) return false;
  SWT_CUBLAS_CHECK(cublasLtMatmul(handle_, plan.op, &alpha, B, plan.a, A, plan.b, &beta, C,
                                  plan.c, C, plan.c, &plan.algo, workspace_, workspace_bytes_,
                                  stream_));
  return true;
}

}  // namespace switcht5::cuda
