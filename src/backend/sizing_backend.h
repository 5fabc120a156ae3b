// SizingBackend: a backend that allocates nothing and counts what would be allocated, so that
// `switcht5 plan` builds the real model, optimizer and step state of a configuration (however
// large) and reports exactly the bytes training would allocate, from the allocation code itself
// rather than from a second formula that could drift from it (train/memory_plan.h).
//
// alloc_bytes hands out distinct addresses that are never backed by memory: each is
// kAddressBit (bit 56) plus a running offset, non-canonical on x86-64 under 4-level paging and
// never mapped otherwise, so a dereference ends the process (as GuardedBackend's do, on bit 55).
// The ops that construction performs on memory (copy_to_device, copy, fill, zero_bytes, cast,
// synchronize) do nothing; every other op, compute or a read back to the host, throws Error
// ("the sizing backend computes nothing: <op>"), so misuse is loud.
//
// Counting: `requested` bytes are what the callers asked for (a DeviceArray's bytes());
// `occupied` bytes are what the target backend would hold for them, each request rounded up to
// whole blocks of `block_bytes` (at least one block): 64 for the host backends (aligned_alloc),
// DeviceArena::kAlignment (256) for the CUDA arena.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>

#include "backend/backend.h"

namespace switcht5 {

class SizingBackend final : public Backend {
 public:
  static constexpr uintptr_t kAddressBit = uintptr_t{1} << 56;

  explicit SizingBackend(size_t block_bytes = 64);
  std::string name() const override { return "sizing"; }
  bool host_accessible() const override { return false; }

  // Requested and occupied bytes of the live allocations now, and the most ever live.
  size_t requested_bytes() const { return requested_; }
  size_t occupied_bytes() const { return occupied_; }
  size_t peak_requested_bytes() const { return peak_requested_; }
  size_t peak_occupied_bytes() const { return peak_occupied_; }
  size_t live_allocations() const { return live_.size(); }
  // What one request of `bytes` occupies.
  size_t occupied(size_t bytes) const;

  // ---- memory: counted, never touched ---------------------------------------------------------
  void* alloc_bytes(size_t bytes) override;
  void free_bytes(void* ptr) override;
  void copy_to_host(void*, const void*, size_t) override { refuse("copy_to_host"); }
  void copy_to_device(void*, const void*, size_t) override {}
  void copy(void*, const void*, size_t) override {}
  void fill(float*, float, int64_t) override {}
  void zero_bytes(void*, size_t) override {}
  void cast(void*, DType, const void*, DType, int64_t) override {}

  // ---- everything else: refused -----------------------------------------------------------------
  void gemm(bool, bool, int, int, int, float, const float*, int, int64_t, const float*, int,
            int64_t, float, float*, int, int64_t, int) override { refuse("gemm"); }
  void gemm_ex(bool, bool, int, int, int, float, const void*, DType, int, int64_t, const void*,
               DType, int, int64_t, float, void*, DType, int, int64_t, int) override {
    refuse("gemm_ex");
  }
  void round_to_bf16(float*, int64_t) override { refuse("round_to_bf16"); }
  void add(float*, const float*, const float*, int64_t) override { refuse("add"); }
  void axpy(float*, float, const float*, int64_t) override { refuse("axpy"); }
  void scale(float*, float, int64_t) override { refuse("scale"); }
  double sum(const float*, int64_t) override { refuse("sum"); }
  double sum_squares(const float*, int64_t) override { refuse("sum_squares"); }
  void sum_over_batch(float*, const float*, int, int64_t) override { refuse("sum_over_batch"); }
  int64_t count_nonfinite(const float*, int64_t) override { refuse("count_nonfinite"); }
  void accumulate_sum_squares(double*, const float*, int64_t) override {
    refuse("accumulate_sum_squares");
  }
  void accumulate_loss_statistics(double*, const float*, const float*, const int32_t*,
                                  int64_t) override {
    refuse("accumulate_loss_statistics");
  }
  void accumulate_router_statistics(double*, const float*, const float*, const float*, int, int,
                                    int, int) override {
    refuse("accumulate_router_statistics");
  }
  void accumulate_router_confidence(double*, const float*, const float*, const float*, int64_t,
                                    int) override {
    refuse("accumulate_router_confidence");
  }
  void permute_0213(float*, const float*, int, int, int, int) override { refuse("permute_0213"); }
  void embedding_forward(float*, const int32_t*, const float*, int64_t, int) override {
    refuse("embedding_forward");
  }
  void embedding_backward(float*, const int32_t*, const float*, int64_t, int, int) override {
    refuse("embedding_backward");
  }
  void rmsnorm_forward(float*, float*, const float*, const float*, int64_t, int, float) override {
    refuse("rmsnorm_forward");
  }
  void rmsnorm_backward(float*, float*, const float*, const float*, const float*, const float*,
                        int64_t, int) override {
    refuse("rmsnorm_backward");
  }
  void attention_softmax_forward(float*, const float*, const float*, const float*, int, int, int,
                                 int, bool) override {
    refuse("attention_softmax_forward");
  }
  void softmax_backward(float*, const float*, const float*, int64_t, int) override {
    refuse("softmax_backward");
  }
  void attention_softmax_dropout_forward(void*, DType, float*, const float*, const float*,
                                         const float*, int, int, int, int, bool, float,
                                         RandomKey) override {
    refuse("attention_softmax_dropout_forward");
  }
  void attention_softmax_dropout_backward(float*, float*, const float*, const float*, int, int,
                                          int, int, float, RandomKey, bool) override {
    refuse("attention_softmax_dropout_backward");
  }
  void relpos_bias_forward(float*, const float*, const int32_t*, int, int, int) override {
    refuse("relpos_bias_forward");
  }
  void relpos_bias_backward(float*, const float*, const int32_t*, int, int, int, int) override {
    refuse("relpos_bias_backward");
  }
  void relu_forward(float*, const float*, int64_t) override { refuse("relu_forward"); }
  void relu_backward(float*, const float*, const float*, int64_t) override {
    refuse("relu_backward");
  }
  void gated_gelu_forward(float*, const float*, const float*, int64_t) override {
    refuse("gated_gelu_forward");
  }
  void gated_gelu_backward(float*, float*, const float*, const float*, const float*,
                           int64_t) override {
    refuse("gated_gelu_backward");
  }
  void dropout(float*, const float*, int64_t, float, RandomKey) override { refuse("dropout"); }
  void uniform_jitter(float*, const float*, int64_t, float, RandomKey, uint64_t) override {
    refuse("uniform_jitter");
  }
  void cross_entropy_forward(float*, float*, const float*, const int32_t*, int64_t,
                             int) override {
    refuse("cross_entropy_forward");
  }
  void cross_entropy_backward(float*, const float*, const float*, const int32_t*, int64_t, int,
                              float, const float*, float) override {
    refuse("cross_entropy_backward");
  }
  void router_forward(float*, float*, int32_t*, int32_t*, int32_t*, float*, float*, const float*,
                      int, int, int, int) override {
    refuse("router_forward");
  }
  void router_balance_loss(float*, const float*, const float*, int, int, int) override {
    refuse("router_balance_loss");
  }
  void router_backward(float*, const float*, const float*, const int32_t*, const float*,
                       const float*, int, int, int, float, float) override {
    refuse("router_backward");
  }
  void moe_dispatch(float*, const float*, const int32_t*, const int32_t*, int64_t, int, int,
                    int) override {
    refuse("moe_dispatch");
  }
  void moe_dispatch_backward(float*, const float*, const int32_t*, const int32_t*, int64_t, int,
                             int) override {
    refuse("moe_dispatch_backward");
  }
  void moe_combine(float*, const float*, const float*, const int32_t*, const int32_t*, int64_t,
                   int, int) override {
    refuse("moe_combine");
  }
  void moe_combine_backward(float*, float*, const float*, const float*, const float*,
                            const int32_t*, const int32_t*, int64_t, int, int, int) override {
    refuse("moe_combine_backward");
  }
  void adamw_update(float*, uint16_t*, const float*, float*, float*, int64_t, float, float, float,
                    float, float, float, float) override {
    refuse("adamw_update");
  }
  void adafactor_update(float*, uint16_t*, const float*, float*, float*, float*, bool, int, int,
                        int, float, float, float, float, float, float) override {
    refuse("adafactor_update");
  }

 private:
  [[noreturn]] static void refuse(const char* op);

  size_t block_bytes_;
  uintptr_t next_ = kAddressBit;
  std::unordered_map<uintptr_t, size_t> live_;  // address -> requested bytes
  size_t requested_ = 0, occupied_ = 0, peak_requested_ = 0, peak_occupied_ = 0;
};

}  // namespace switcht5
