#include "model/expert_exchange.h"

#include "comm/communicator.h"
#include "core/check.h"

namespace switcht5 {

ExpertExchange::ExpertExchange(Backend& be, Communicator* group, int num_experts,
                                   int64_t max_rows_per_expert, int D)
    : be_(be), group_(group), P_(group ? group->size() : 1), E_local_(num_experts / P_), D_(D),
      max_rows_per_expert_(max_rows_per_expert) {
  SWT_CHECK(num_experts % P_ == 0, "{} experts over an expert-parallel group of {}", num_experts,
            P_);
  if (P_ > 1 && max_rows_per_expert > 0)
    exchange_ = DeviceArray<float>(be, int64_t(num_experts) * max_rows_per_expert * D);
}

float* ExpertExchange::staging_or_own(float* staging, int GC) {
  if (staging) return staging;
  SWT_CHECK(GC <= max_rows_per_expert_, "expert exchange of {} rows per expert without staging, "
            "sized for {}", GC, max_rows_per_expert_);
  return exchange_.data();
}

void ExpertExchange::to_experts(float* out, const float* buf, int GC, float* staging) {
  const int64_t block = int64_t(E_local_) * GC * D_;
  if (P_ == 1) {
    be_.copy(out, buf, sizeof(float) * block);
    return;
  }
  float* received = staging_or_own(staging, GC);
  group_->all_to_all(received, buf, block);
  bytes_sent_ += int64_t(sizeof(float)) * block * (P_ - 1);
  // [P, E_loc, GC*D] -> [E_loc, P, GC*D]
  be_.permute_0213(out, received, 1, P_, E_local_, GC * D_);
}

void ExpertExchange::from_experts(float* out, const float* y, int GC, float* staging) {
  const int64_t block = int64_t(E_local_) * GC * D_;
  if (P_ == 1) {
    be_.copy(out, y, sizeof(float) * block);
    return;
  }
  // [E_loc, P, GC*D] -> [P, E_loc, GC*D], then each block back to the process it came from.
  float* to_send = staging_or_own(staging, GC);
  be_.permute_0213(to_send, y, 1, E_local_, P_, GC * D_);
  group_->all_to_all(out, to_send, block);
  bytes_sent_ += int64_t(sizeof(float)) * block * (P_ - 1);
}

}  // namespace switcht5
