#include "model/expert_exchange.h"

#include "comm/communicator.h"
#include "core/check.h"

namespace switcht5 {

ExpertExchange::ExpertExchange(Backend& be, Communicator* group, int num_experts,
                                   int64_t max_rows_per_expert, int D)
    : be_(be), group_(group), P_(group ? group->size() : 1), E_local_(num_experts / P_), D_(D) {
  SWT_CHECK(num_experts % P_ == 0, "{} experts over an expert-parallel group of {}", num_experts,
            P_);
  if (P_ > 1) exchange_ = DeviceArray<float>(be, int64_t(num_experts) * max_rows_per_expert * D);
}

void ExpertExchange::to_experts(float* out, const float* buf, int GC) {
  const int64_t block = int64_t(E_local_) * GC * D_;
  if (P_ == 1) {
    be_.copy(out, buf, sizeof(float) * block);
    return;
  }
  group_->all_to_all(exchange_.data(), buf, block);
  bytes_sent_ += int64_t(sizeof(float)) * block * (P_ - 1);
  // [P, E_loc, GC*D] -> [E_loc, P, GC*D]
  be_.permute_0213(out, exchange_.data(), 1, P_, E_local_, GC * D_);
}

void ExpertExchange::from_experts(float* out, const float* y, int GC) {
  const int64_t block = int64_t(E_local_) * GC * D_;
  if (P_ == 1) {
    be_.copy(out, y, sizeof(float) * block);
    return;
  }
  // [E_loc, P, GC*D] -> [P, E_loc, GC*D], then each block back to the process it came from.
  be_.permute_0213(exchange_.data(), y, 1, E_local_, P_, GC * D_);
  group_->all_to_all(out, exchange_.data(), block);
  bytes_sent_ += int64_t(sizeof(float)) * block * (P_ - 1);
}

}  // namespace switcht5
