#include "model/tensor_parallel.h"

#include "comm/communicator.h"

namespace switcht5 {

bool TensorParallel::active() const { return group_ != nullptr && group_->size() > 1; }

int TensorParallel::size() const { return group_ ? group_->size() : 1; }

void TensorParallel::sum_partials(float* x, int64_t n) const {
  if (active()) group_->all_reduce_sum(x, n);
}

void TensorParallel::broadcast_from_first(float* x, int64_t n) const {
  if (active()) group_->broadcast(x, n, 0);
}

}  // namespace switcht5
