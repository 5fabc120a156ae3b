// GradientReducer without MPI (train/gradient_reducer.h): ZeRO-1's balanced contiguous cut
// against a brute-force optimum; the buckets tile each region, launch in reverse backward order
// and only once every parameter they touch is reported; ZeRO-1 shards are parameter-aligned and
// each bucket's reduce-scatter blocks are its intersections with them. The data plane here is a
// recording stand-in of any size (nothing is summed); tests/mpi/test_gradient_reducer.cpp runs
// the real reductions.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "comm/data_plane.h"
#include "config/config.h"
#include "core/rng.h"
#include "model/model.h"
#include "model/params.h"
#include "train/gradient_reducer.h"

namespace switcht5 {
namespace {

// Records every call (offset into `base`, element count, block counts) and changes nothing.
class RecordingPlane final : public DataPlane {
 public:
  struct Call {
    std::string op;
    int64_t offset, n;
    std::vector<int64_t> counts;
  };
  RecordingPlane(int size, int rank, const float* base) : size_(size), rank_(rank), base_(base) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  void all_reduce_sum(float* data, int64_t n) override {
    calls.push_back({"all_reduce", data - base_, n, {}});
  }
  void reduce_scatter_sum(float* data, std::span<const int64_t> counts) override {
    int64_t n = 0;
    for (int64_t c : counts) n += c;
    calls.push_back({"reduce_scatter", data - base_, n, {counts.begin(), counts.end()}});
  }
  void all_gather(float* data, std::span<const int64_t> counts) override {
    int64_t n = 0;
    for (int64_t c : counts) n += c;
    calls.push_back({"all_gather", data - base_, n, {counts.begin(), counts.end()}});
  }
  void all_to_all(float*, const float*, int64_t) override { ADD_FAILURE() << "all_to_all"; }
  void broadcast(float*, int64_t, int) override { ADD_FAILURE() << "broadcast"; }
  void synchronize() override { ++synchronized; }

  std::vector<Call> calls;
  int synchronized = 0;

 private:
  int size_, rank_;
  const float* base_;
};

// The tiny test model's parameters (two Switch blocks per stack), allocated on the cpu backend.
struct TinyParams {
  std::unique_ptr<Backend> be = make_backend("cpu");
  ParamStore ps;
  TinyParams() {
    RunConfig cfg =
        load_config(std::string(SWITCHT5_SOURCE_DIR) + "/configs/tiny-synthetic.yaml", {});
    register_model_params(ps, cfg.model);
    ps.allocate(*be);
  }
};

// The smallest possible largest shard of a contiguous cut of `sizes` into `parts`, by DP.
int64_t optimal_largest(const std::vector<int64_t>& sizes, int parts) {
  const size_t n = sizes.size();
  const int64_t inf = std::numeric_limits<int64_t>::max();
  // best[p][i]: first i sizes in p shards.
  std::vector<std::vector<int64_t>> best(size_t(parts) + 1, std::vector<int64_t>(n + 1, inf));
  best[0][0] = 0;
  for (int p = 1; p <= parts; ++p)
    for (size_t i = 0; i <= n; ++i) {
      int64_t last = 0;
      for (size_t j = i + 1; j-- > 0;) {  // shard p holds sizes [j, i)
        if (best[size_t(p) - 1][j] != inf)
          best[size_t(p)][i] = std::min(best[size_t(p)][i], std::max(best[size_t(p) - 1][j], last));
        if (j > 0) last += sizes[j - 1];
      }
    }
  return best[size_t(parts)][n];
}

TEST(BalancedShards, ContiguousParameterAlignedAndOptimal) {
  CounterRng rng(11);
  for (int trial = 0; trial < 300; ++trial) {
    const int params = 1 + int(rng.next_below(9)), parts = 1 + int(rng.next_below(5));
    std::vector<int64_t> sizes, offsets;
    int64_t end = 0;
    for (int i = 0; i < params; ++i) {
      offsets.push_back(end);
      sizes.push_back(1 + int64_t(rng.next_below(20)));
      end += sizes.back();
    }
    const std::vector<int64_t> b = balanced_shards(offsets, end, parts);
    ASSERT_EQ(b.size(), size_t(parts) + 1);
    EXPECT_EQ(b.front(), 0);
    EXPECT_EQ(b.back(), end);
    int64_t largest = 0;
    for (int d = 0; d < parts; ++d) {
      EXPECT_LE(b[size_t(d)], b[size_t(d) + 1]);
      largest = std::max(largest, b[size_t(d) + 1] - b[size_t(d)]);
      EXPECT_TRUE(b[size_t(d)] == end ||
                  std::find(offsets.begin(), offsets.end(), b[size_t(d)]) != offsets.end())
          << "boundary " << b[size_t(d)] << " is not a parameter's start";
    }
    EXPECT_EQ(largest, optimal_largest(sizes, parts)) << "trial " << trial;
  }
}

// Buckets of each region tile it, are at most the bucket size, and launch in decreasing
// registration index of their first parameter (higher offsets first among equals).
TEST(GradientReducer, BucketsTileEachRegionInReverseBackwardOrder) {
  TinyParams t;
  const int64_t dense_end = t.ps.expert_region_begin(), total = t.ps.total_numel();
  for (int64_t bucket : {int64_t{1}, int64_t{7}, int64_t{1000}, int64_t{1} << 40}) {
    RecordingPlane data(2, 0, t.ps.grads()), replica(2, 1, t.ps.grads());
    GradientReducer reducer(*t.be, t.ps, data, replica, bucket, /*zero1=*/false);
    const std::vector<GradientBucket>& buckets = reducer.buckets();
    std::vector<std::pair<int64_t, int64_t>> dense, experts;
    for (size_t k = 0; k < buckets.size(); ++k) {
      const GradientBucket& b = buckets[k];
      EXPECT_LE(b.end - b.begin, bucket);
      EXPECT_GT(b.end, b.begin);
      (b.experts ? experts : dense).emplace_back(b.begin, b.end);
      if (k > 0) {
        EXPECT_GE(buckets[k - 1].first_param, b.first_param) << "bucket " << k;
        if (buckets[k - 1].first_param == b.first_param) {
          EXPECT_GT(buckets[k - 1].begin, b.begin);
        }
      }
      // first_param is the parameter holding the bucket's first float.
      const ParamInfo& p = t.ps.infos()[size_t(b.first_param)];
      EXPECT_LE(p.offset, b.begin);
      EXPECT_LT(b.begin, p.offset + (p.numel + 15) / 16 * 16);
    }
    for (auto* region : {&dense, &experts}) std::sort(region->begin(), region->end());
    auto tiles = [](const std::vector<std::pair<int64_t, int64_t>>& r, int64_t lo, int64_t hi) {
      int64_t at = lo;
      for (auto [b, e] : r) {
        if (b != at) return false;
        at = e;
      }
      return at == hi;
    };
    EXPECT_TRUE(tiles(dense, 0, dense_end)) << "bucket " << bucket;
    EXPECT_TRUE(tiles(experts, dense_end, total)) << "bucket " << bucket;
    // The shared embedding, registered first and finished last by backward, goes last.
    EXPECT_EQ(t.ps.infos()[size_t(buckets.back().first_param)].name, "shared.weight");
    reducer.begin_step();
    reducer.finish();
    // Every bucket reduced once, in launch order, on its region's plane.
    ASSERT_EQ(data.calls.size() + replica.calls.size(), buckets.size());
    size_t di = 0, ri = 0;
    for (const GradientBucket& b : buckets) {
      const RecordingPlane::Call& c = b.experts ? replica.calls[ri++] : data.calls[di++];
      EXPECT_EQ(c.op, "all_reduce");
      EXPECT_EQ(c.offset, b.begin);
      EXPECT_EQ(c.n, b.end - b.begin);
    }
  }
}

// Reporting parameters in reverse registration order (as backward finishes them) launches each
// bucket as soon as, and not before, every parameter it touches is reported.
TEST(GradientReducer, LaunchesABucketOnceItsParametersAreFinal) {
  TinyParams t;
  RecordingPlane data(2, 0, t.ps.grads()), replica(2, 0, t.ps.grads());
  GradientReducer reducer(*t.be, t.ps, data, replica, 3000, /*zero1=*/false);
  const std::vector<ParamInfo>& infos = t.ps.infos();
  auto touches = [&](const GradientBucket& b, const ParamInfo& p) {
    return p.offset < b.end && p.offset + (p.numel + 15) / 16 * 16 > b.begin;
  };
  for (int step = 0; step < 2; ++step) {
    reducer.begin_step();
    EXPECT_EQ(reducer.launched(), 0u);
    std::vector<bool> reported(infos.size(), false);
    size_t before = 0;
    for (size_t i = infos.size(); i-- > 0;) {
      reducer.on_gradients_ready(infos[i].offset, infos[i].offset + infos[i].numel);
      reported[i] = true;
      const size_t launched = reducer.launched();
      EXPECT_GE(launched, before);
      before = launched;
      for (size_t k = 0; k < reducer.buckets().size(); ++k) {
        bool all = true;
        for (size_t p = 0; p < infos.size(); ++p)
          if (touches(reducer.buckets()[k], infos[p]) && !reported[p]) all = false;
        if (k < launched) {
          EXPECT_TRUE(all) << "bucket " << k << " launched early";
        } else if (k == launched) {
          EXPECT_FALSE(all) << "bucket " << k << " is ready but waits";
        }
      }
    }
    EXPECT_EQ(reducer.launched(), reducer.buckets().size());
    reducer.finish();  // nothing left
    EXPECT_EQ(data.calls.size() + replica.calls.size(), (step + 1) * reducer.buckets().size());
  }
}

// ZeRO-1 over 3 data ranks: every dense parameter lies in its owner's contiguous shard, the
// shards tile the dense region, and each bucket is reduce-scattered onto them.
TEST(GradientReducer, Zero1ShardsAreParameterAlignedAndCutEachBucket) {
  TinyParams t;
  const int64_t dense_end = t.ps.expert_region_begin();
  for (int rank = 0; rank < 3; ++rank) {
    RecordingPlane data(3, rank, t.ps.grads()), replica(1, 0, t.ps.grads());
    GradientReducer reducer(*t.be, t.ps, data, replica, 5000, /*zero1=*/true);
    ASSERT_TRUE(reducer.zero1());
    int64_t held = 0;
    for (size_t i = 0; i < t.ps.infos().size(); ++i) {
      const ParamInfo& p = t.ps.infos()[i];
      const int owner = reducer.param_owner()[i];
      if (p.offset >= dense_end) {
        EXPECT_EQ(owner, -1) << p.name;
        continue;
      }
      ASSERT_GE(owner, 0) << p.name;
      ASSERT_LT(owner, 3) << p.name;
      if (owner == rank) {
        EXPECT_GE(p.offset, reducer.shard_begin()) << p.name;
        EXPECT_LE(p.offset + p.numel, reducer.shard_end()) << p.name;
        held += (p.numel + 15) / 16 * 16;
      }
    }
    EXPECT_EQ(held, reducer.shard_end() - reducer.shard_begin());
    reducer.begin_step();
    reducer.finish();
    EXPECT_TRUE(replica.calls.empty());  // one replica: experts are not reduced
    for (const RecordingPlane::Call& c : data.calls) {
      EXPECT_EQ(c.op, "reduce_scatter");
      ASSERT_EQ(c.counts.size(), 3u);
      const int64_t mine = std::max<int64_t>(0, std::min(c.offset + c.n, reducer.shard_end()) -
                                                    std::max(c.offset, reducer.shard_begin()));
      EXPECT_EQ(c.counts[size_t(rank)], mine);
    }
    data.calls.clear();
    reducer.all_gather_parameters();
    ASSERT_EQ(data.calls.size(), 1u);
    EXPECT_EQ(data.calls[0].op, "all_gather");
    EXPECT_EQ(data.calls[0].n, dense_end);
  }
}

// One process: no buckets, no calls, and no pass over the gradients: the caller's sums over
// the final gradients are this rank's own (the Trainer's non-finite check reads them; Training.
// OneProcessNamesItsOwnNonFiniteGradient).
TEST(GradientReducer, OneProcessReducesNothingAndLeavesTheChecksToTheFinalSums) {
  TinyParams t;
  auto self = make_self_communicator();
  auto plane = make_data_plane(*self, *t.be);
  GradientReducer reducer(*t.be, t.ps, *plane, *plane, 100, /*zero1=*/true);
  EXPECT_TRUE(reducer.buckets().empty());
  EXPECT_FALSE(reducer.zero1());
  EXPECT_EQ(reducer.shard_begin(), 0);
  EXPECT_EQ(reducer.shard_end(), t.ps.expert_region_begin());
  EXPECT_FALSE(reducer.reduces_dense());
  EXPECT_FALSE(reducer.reduces_experts());
  t.be->fill(t.ps.grads(), 0.5f, t.ps.total_numel());
  DeviceArray<double> sq(*t.be, 1);
  t.be->zero_bytes(sq.data(), sq.bytes());
  reducer.begin_step(sq.data());
  reducer.finish();
  double host = -1;
  t.be->copy_to_host(&host, sq.data(), sizeof(double));
  EXPECT_EQ(host, 0.0);
}

}  // namespace
}  // namespace switcht5
