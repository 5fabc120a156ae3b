#include "train/gradient_reducer.h"

#include <algorithm>
#include <numeric>

#include "core/check.h"

namespace switcht5 {

int64_t bucket_floats(double bucket_mb) {
  SWT_CHECK(bucket_mb > 0.0, "bucket size {} MiB is not positive", bucket_mb);
  return std::max<int64_t>(1, static_cast<int64_t>(bucket_mb * double(1 << 20)) / 4);
}

std::vector<int64_t> balanced_shards(const std::vector<int64_t>& offsets, int64_t region_end,
                                     int parts) {
  SWT_CHECK(parts >= 1, "{} shards", parts);
  std::vector<int64_t> sizes;  // each parameter's extent up to the next one (padding included)
  for (size_t i = 0; i < offsets.size(); ++i)
    sizes.push_back((i + 1 < offsets.size() ? offsets[i + 1] : region_end) - offsets[i]);
  // Greedy packing under a cap is optimal for a contiguous cut: the smallest cap whose greedy
  // packing needs at most `parts` shards is the smallest possible largest shard.
  auto shards_needed = [&](int64_t cap) {
    int needed = 1;
    int64_t filled = 0;
    for (int64_t s : sizes) {
      if (filled + s > cap) {
        ++needed;
        filled = 0;
      }
      filled += s;
    }
    return needed;
  };
  int64_t lo = sizes.empty() ? 0 : *std::max_element(sizes.begin(), sizes.end());
  int64_t hi = std::accumulate(sizes.begin(), sizes.end(), int64_t{0});
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (shards_needed(mid) <= parts) hi = mid;
    else lo = mid + 1;
  }
  std::vector<int64_t> bounds{0};
  int64_t filled = 0;
  for (size_t i = 0; i < sizes.size(); ++i) {
    if (filled + sizes[i] > lo) {
      bounds.push_back(offsets[i]);
      filled = 0;
    }
    filled += sizes[i];
  }
  while (static_cast<int>(bounds.size()) <= parts) bounds.push_back(region_end);
  return bounds;
}

GradientReducer::GradientReducer(Backend& be, ParamStore& params, DataPlane& data_group,
                                 DataPlane& replica_group, int64_t bucket_floats, bool zero1)
    : be_(be), params_(params), data_(data_group), replica_(replica_group),
      zero1_(zero1 && data_group.size() > 1) {
  SWT_CHECK(bucket_floats >= 1, "bucket of {} floats", bucket_floats);
  const std::vector<ParamInfo>& infos = params.infos();
  const int64_t dense_end = params.expert_region_begin(), total = params.total_numel();
  by_offset_.resize(infos.size());
  std::iota(by_offset_.begin(), by_offset_.end(), 0);
  std::sort(by_offset_.begin(), by_offset_.end(),
            [&](int a, int b) { return infos[size_t(a)].offset < infos[size_t(b)].offset; });

  owner_.assign(infos.size(), -1);
  if (zero1_) {
    std::vector<int64_t> dense_offsets;
    for (int p : by_offset_)
      if (infos[size_t(p)].offset < dense_end) dense_offsets.push_back(infos[size_t(p)].offset);
    shards_ = balanced_shards(dense_offsets, dense_end, data_.size());
    for (int p : by_offset_) {
      const int64_t off = infos[size_t(p)].offset;
      if (off >= dense_end) continue;
      owner_[size_t(p)] =
          int(std::upper_bound(shards_.begin(), shards_.end(), off) - shards_.begin()) - 1;
    }
  } else {
    shards_ = {0, dense_end};
  }
  for (size_t d = 0; d + 1 < shards_.size(); ++d)
    shard_counts_.push_back(shards_[d + 1] - shards_[d]);
  block_counts_.assign(shard_counts_.size(), 0);

  // The parameter (position in by_offset_) whose extent holds float `at`. A parameter's extent
  // runs to the next one's offset (padding included): the extents tile [0, total), so every
  // bucket touches at least one parameter.
  auto holding = [&](int64_t at) {
    auto after = std::upper_bound(by_offset_.begin(), by_offset_.end(), at, [&](int64_t x, int p) {
      return x < infos[size_t(p)].offset;
    });
    return size_t(after - by_offset_.begin()) - 1;
  };
  struct Region {
    int64_t begin, end;
    bool experts;
    int group_size;
  };
  for (const Region& r : {Region{0, dense_end, false, data_.size()},
                          Region{dense_end, total, true, replica_.size()}}) {
    if (r.group_size == 1) continue;
    for (int64_t end = r.end; end > r.begin; end -= bucket_floats) {
      GradientBucket b;
      b.begin = std::max(r.begin, end - bucket_floats);
      b.end = end;
      b.experts = r.experts;
      b.first_param = by_offset_[holding(b.begin)];
      buckets_.push_back(b);
    }
  }
  std::stable_sort(buckets_.begin(), buckets_.end(),
                   [](const GradientBucket& a, const GradientBucket& b) {
                     return a.first_param > b.first_param;
                   });

  param_buckets_.resize(infos.size());
  waiting_.assign(buckets_.size(), 0);
  for (size_t k = 0; k < buckets_.size(); ++k) {
    for (size_t i = holding(buckets_[k].begin);
         i < by_offset_.size() && infos[size_t(by_offset_[i])].offset < buckets_[k].end; ++i) {
      param_buckets_[size_t(by_offset_[i])].push_back(int(k));
      ++waiting_[k];
    }
  }
  param_ready_.assign(infos.size(), 0);
  begin_step();
}

void GradientReducer::begin_step(double* local_sq) {
  local_sq_ = local_sq;
  std::fill(param_ready_.begin(), param_ready_.end(), 0);
  std::fill(waiting_.begin(), waiting_.end(), 0);
  for (const std::vector<int>& touched : param_buckets_)
    for (int k : touched) ++waiting_[size_t(k)];
  next_ = 0;
}

void GradientReducer::on_gradients_ready(int64_t begin, int64_t end) {
  const std::vector<ParamInfo>& infos = params_.infos();
  auto first = std::lower_bound(by_offset_.begin(), by_offset_.end(), begin,
                                [&](int p, int64_t x) { return infos[size_t(p)].offset < x; });
  for (auto it = first; it != by_offset_.end() && infos[size_t(*it)].offset < end; ++it) {
    const ParamInfo& p = infos[size_t(*it)];
    if (p.offset + p.numel > end || param_ready_[size_t(*it)]) continue;
    param_ready_[size_t(*it)] = 1;
    for (int k : param_buckets_[size_t(*it)]) --waiting_[size_t(k)];
  }
  while (next_ < buckets_.size() && waiting_[next_] == 0) launch(buckets_[next_++]);
}

void GradientReducer::finish() {
  on_gradients_ready(0, params_.total_numel());
  SWT_CHECK(next_ == buckets_.size(), "{} of {} gradient buckets never became ready",
            buckets_.size() - next_, buckets_.size());
  data_.synchronize();
  replica_.synchronize();
}

void GradientReducer::launch(const GradientBucket& b) {
  float* g = params_.grads() + b.begin;
  const int64_t n = b.end - b.begin;
  if (local_sq_) be_.accumulate_sum_squares(local_sq_, g, n);
  if (b.experts) return replica_.all_reduce_sum(g, n);
  if (!zero1_) return data_.all_reduce_sum(g, n);
  // Block d: the part of the bucket in data rank d's shard.
  for (size_t d = 0; d < block_counts_.size(); ++d)
    block_counts_[d] = std::max<int64_t>(
        0, std::min(b.end, shards_[d + 1]) - std::max(b.begin, shards_[d]));
  data_.reduce_scatter_sum(g, block_counts_);
}

void GradientReducer::all_gather_parameters() {
  if (!zero1_) return;
  data_.all_gather(params_.values(), shard_counts_);
  data_.synchronize();
  // bf16: the optimizer wrote the compute copy of this rank's shard; the other shards' masters
  // just arrived (fp32 on the wire: the masters must stay equal on every rank).
  const int64_t dense_end = shards_.back();
  params_.refresh_compute_copy(be_, 0, shard_begin());
  params_.refresh_compute_copy(be_, shard_end(), dense_end);
}

}  // namespace switcht5
