// GradientReducer: sums a step's gradients (ParamStore::grads()) over the process grid on the
// data plane (comm/data_plane.h), bucket by bucket, and with ZeRO-1 shards the dense region's
// update over the data ranks.
//
// Regions (model/params.h) and their groups:
//   dense    [0, expert_region_begin())              replicated + model-split parameters,
//                                                    summed over the data group
//   experts  [expert_region_begin(), total_numel())  summed over the expert-replica group
//
// Buckets: each region is cut from its end into contiguous buckets of `bucket_floats` floats
// (the last, at the region's start, shorter); a bucket may cut through a parameter. A region
// whose group has one rank gets no buckets. Launch order: the backward pass finishes gradients
// in about reverse registration order (LM head, last decoder block, ..., embeddings), and within
// a region registration order is offset order, so a bucket is final once the lowest-offset
// parameter it touches is. Buckets launch in decreasing registration index of that parameter
// (ties: higher offsets first), which interleaves the two regions as backward reaches them.
// The order depends only on the parameter table, so it is the same on every rank.
//
// Launching: begin_step() before the backward pass that completes the gradients (the last
// micro-batch); on_gradients_ready() as parameters' gradients become final (each bucket
// launches, in the fixed order, once every parameter it touches is reported); finish() reports
// whatever is left and waits for the plane. The model reports each block's parameters as its
// backward finishes (SwitchT5Model::backward's GradientReadyListener), so buckets launch during
// the backward pass; with an asynchronous plane (NCCL on its stream) they overlap the rest of
// it. Results are the same whatever the order of reports, bitwise (data plane contract).
//
// ZeRO-1 (zero1 and data group > 1): the dense region is cut into `data` contiguous shards at
// parameter boundaries, balanced by size (the cut with the smallest largest shard; shard d is
// data rank d's, in offset order). Data rank d updates the parameters of shard d and keeps
// their optimizer state. Each dense bucket is reduce-scattered (block d = bucket ∩ shard d),
// so a rank ends with summed gradients only in its own shard (the rest keep its own
// contribution); after the update all_gather_parameters() gives every rank every shard. Why
// whole parameters: Adafactor's factored statistics and update clipping need whole matrices;
// AdamW is elementwise and could cut anywhere, but checkpoints record one owner per parameter
// (checkpoint/checkpoint.h), so both optimizers shard the same way. The cost is balance: a
// shard is at most the optimal contiguous cut, which is within one parameter of total / data.
#pragma once
#include <cstdint>
#include <vector>

#include "backend/backend.h"
#include "comm/data_plane.h"
#include "model/params.h"

namespace switcht5 {

struct GradientBucket {
  int64_t begin = 0, end = 0;  // floats of ParamStore::grads()
  bool experts = false;        // reduced over the expert-replica group, else the data group
  int first_param = 0;         // registration index of the lowest-offset parameter it touches
};

// Floats in a bucket of `bucket_mb` MiB (2^20 bytes), at least 1.
int64_t bucket_floats(double bucket_mb);

// Boundaries b[0] = 0 <= ... <= b[parts] = region_end of `parts` contiguous shards of
// [0, region_end), cut only at `offsets` (the parameters' offsets in the region, sorted), with
// the largest shard as small as it can be; later shards may be empty (more parts than
// parameters).
std::vector<int64_t> balanced_shards(const std::vector<int64_t>& offsets, int64_t region_end,
                                     int parts);

class GradientReducer : public GradientReadyListener {
 public:
  // `data_group` and `replica_group`: data planes over the grid's data and expert-replica
  // groups, for `be`, the backend of `params`. All must outlive the reducer.
  GradientReducer(Backend& be, ParamStore& params, DataPlane& data_group,
                  DataPlane& replica_group, int64_t bucket_floats, bool zero1);

  const std::vector<GradientBucket>& buckets() const { return buckets_; }  // launch order

  bool zero1() const { return zero1_; }
  // The dense floats this rank holds summed gradients for after finish(), and updates:
  // [shard_begin(), shard_end()) = its ZeRO-1 shard, else the whole dense region.
  int64_t shard_begin() const { return shards_[size_t(zero1_ ? data_.rank() : 0)]; }
  int64_t shard_end() const {
    return shards_[size_t(zero1_ ? data_.rank() + 1 : int(shards_.size()) - 1)];
  }
  // Per parameter (index into ParamStore::infos()): the data rank that updates it and keeps its
  // optimizer state (ZeRO-1, dense parameters), or -1 when every data rank holding it does.
  const std::vector<int>& param_owner() const { return owner_; }

  // Starts a step. `local_sq` (backend memory, or null): the reducer adds to local_sq[0] the sum
  // of squares of this rank's own gradients, each bucket just before it is reduced, so a rank
  // can tell whether it produced a non-finite gradient itself even once reductions overlap the
  // backward pass. A region it does not reduce (reduces_dense() / reduces_experts() false) is
  // not summed here: its gradients after finish() are this rank's own, so the caller's sums
  // over the final gradients tell the same, and a second pass over them would only cost
  // memory bandwidth (the whole gradient, 1.1 GB with 128 experts on bench-small).
  void begin_step(double* local_sq = nullptr);
  // Whether the dense region is summed over a data group of more than one rank, and the expert
  // region over an expert-replica group of more than one rank.
  bool reduces_dense() const { return data_.size() > 1; }
  bool reduces_experts() const { return replica_.size() > 1; }
  // The gradients of every parameter lying within [begin, end) (floats) are final for this
  // step; launches the buckets that became complete, in launch order. Reporting a parameter
  // twice is harmless.
  void on_gradients_ready(int64_t begin, int64_t end) override;
  // Reports every parameter, launches the remaining buckets and waits for the data plane.
  void finish();
  // Buckets launched so far this step: buckets()[0, launched()).
  size_t launched() const { return next_; }
  // ZeRO-1: every data rank's updated shard of ParamStore::values() to every data rank, and
  // the bf16 compute copies of the shards received (no-op without ZeRO-1). Waits for the data
  // plane.
  void all_gather_parameters();

 private:
  void launch(const GradientBucket& b);

  Backend& be_;
  ParamStore& params_;
  DataPlane& data_;
  DataPlane& replica_;
  bool zero1_;
  std::vector<int64_t> shards_;  // ZeRO-1 shard boundaries ([0, dense end] without ZeRO-1)
  std::vector<int64_t> shard_counts_;
  std::vector<int> owner_;
  std::vector<GradientBucket> buckets_;
  std::vector<int64_t> block_counts_;  // scratch: one bucket's blocks per data rank
  // Readiness: per parameter whether reported; per bucket the parameters it still waits for;
  // per parameter the buckets (launch indices) it touches.
  std::vector<char> param_ready_;
  std::vector<int> waiting_;
  std::vector<std::vector<int>> param_buckets_;
  std::vector<int> by_offset_;  // parameter indices sorted by offset
  size_t next_ = 0;             // next bucket to launch
  double* local_sq_ = nullptr;
};

}  // namespace switcht5
