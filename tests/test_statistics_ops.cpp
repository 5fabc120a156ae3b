// The backend ops that accumulate a training step's statistics in backend memory
// (Backend::accumulate_*): every backend against sums computed here on the host in double,
// on shapes with odd sizes, ignored labels, dropped tokens and an empty expert; each op ADDS to
// what the array held (never assigns), and the CPU backend's sums equal its own sum /
// sum_squares (the values the trainer read before the statistics moved to the device).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "test_util.h"

namespace switcht5 {
namespace {

using testing::download;
using testing::random_vector;
using testing::upload;

constexpr double kRel = 1e-12;  // double sums of the same terms in another order

// An accumulator array in backend memory that starts at `start` (not zero), so that an op that
// assigns instead of adding fails.
DeviceArray<double> accumulator(Backend& be, const std::vector<double>& start) {
  DeviceArray<double> acc(be, int64_t(start.size()));
  be.copy_to_device(acc.data(), start.data(), acc.bytes());
  return acc;
}

std::vector<double> read(Backend& be, const DeviceArray<double>& acc) {
  std::vector<double> h(acc.size());
  be.copy_to_host(h.data(), acc.data(), acc.bytes());
  return h;
}

void expect_near_rel(double actual, double expected, const std::string& what) {
  EXPECT_NEAR(actual, expected, kRel * std::max(1.0, std::fabs(expected))) << what;
}

class StatisticsOps : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    be_ = testing::backend_or_skip(GetParam(), why);
    if (!be_) GTEST_SKIP() << why;
  }
  std::unique_ptr<Backend> be_;
};

TEST_P(StatisticsOps, SumSquaresAdds) {
  for (int64_t n : {1, 17, 16384, 16384 * 3 + 5}) {
    const auto x = random_vector(n, 11 + n, -2.0f, 2.0f);
    auto dx = upload(*be_, x);
    auto acc = accumulator(*be_, {0.75, -3.0});
    be_->accumulate_sum_squares(acc.data() + 1, dx.data(), n);
    be_->accumulate_sum_squares(acc.data() + 1, dx.data(), n);  // twice: adds up
    double expected = 0.0;
    for (float v : x) expected += double(v) * v;
    const auto h = read(*be_, acc);
    EXPECT_EQ(h[0], 0.75) << "acc[0] is not this op's slot";
    expect_near_rel(h[1], -3.0 + 2.0 * expected, "n=" + std::to_string(n));
    // The same value sum_squares returns, bitwise (the trainer's norm before and after).
    auto once = accumulator(*be_, {0.0});
    be_->accumulate_sum_squares(once.data(), dx.data(), n);
    EXPECT_EQ(read(*be_, once)[0], be_->sum_squares(dx.data(), n)) << "n=" << n;
  }
}

TEST_P(StatisticsOps, LossStatistics) {
  for (int64_t N : {1, 7, 115, 20000}) {
    const auto loss = random_vector(N, 3 + N, 0.0f, 9.0f);
    const auto lse = random_vector(N, 5 + N, -4.0f, 12.0f);
    auto labels = testing::random_int_vector(N, 7 + N, -1, 50);
    for (auto& l : labels) if (l < 0) l = -100;  // about 1 in 51 ignored
    labels[0] = -100;
    std::vector<float> loss_masked = loss;  // cross_entropy_forward writes 0 on ignored rows
    for (int64_t r = 0; r < N; ++r) if (labels[r] < 0) loss_masked[r] = 0.0f;
    auto dloss = upload(*be_, loss_masked);
    auto dlse = upload(*be_, lse);
    auto dlabels = upload(*be_, labels);
    auto acc = accumulator(*be_, {1.5, 2.5, 3.0, 42.0});
    be_->accumulate_loss_statistics(acc.data(), dloss.data(), dlse.data(), dlabels.data(), N);
    double s = 0, q = 0, c = 0;
    for (int64_t r = 0; r < N; ++r) {
      s += loss_masked[r];
      if (labels[r] >= 0) { q += double(lse[r]) * lse[r]; c += 1; }
    }
    const auto h = read(*be_, acc);
    expect_near_rel(h[0], 1.5 + s, "loss sum N=" + std::to_string(N));
    expect_near_rel(h[1], 2.5 + q, "lse^2 sum N=" + std::to_string(N));
    EXPECT_EQ(h[2], 3.0 + c) << "valid rows N=" << N;
    EXPECT_EQ(h[3], 42.0) << "wrote past its three entries";
    EXPECT_LT(c, double(N)) << "the case must contain ignored rows";
    EXPECT_EQ(h[0] - 1.5, be_->sum(dloss.data(), N)) << "loss sum differs from sum()";
  }
}

TEST_P(StatisticsOps, RouterStatistics) {
  struct Case { int G, S, E, C; };
  for (const Case& k : {Case{1, 5, 3, 2}, Case{3, 24, 4, 8}, Case{2, 114, 8, 18}, Case{4, 3, 5, 1}}) {
    const int64_t T = int64_t(k.G) * k.S;
    const auto lb = random_vector(k.G, 21 + T, 0.5f, 3.0f);
    const auto lse = random_vector(T, 23 + T, -2.0f, 6.0f);
    // Integer counts per group summing to S, expert 1 empty, expert 0 over capacity.
    std::vector<float> counts(size_t(k.G) * k.E, 0.0f);
    for (int g = 0; g < k.G; ++g) {
      const auto who = testing::random_int_vector(k.S, 31 + g + T, 0, k.E);
      for (int32_t e : who) counts[size_t(g) * k.E + (e == 1 ? 0 : e)] += 1.0f;
    }
    auto dlb = upload(*be_, lb);
    auto dlse = upload(*be_, lse);
    auto dcounts = upload(*be_, counts);
    std::vector<double> start(5 + k.E + 1);  // RouterStatsSlot: 5 fixed entries, E counts, 1 guard
    for (size_t i = 0; i < start.size(); ++i) start[i] = 0.5 * double(i) + 1.0;
    auto acc = accumulator(*be_, start);
    be_->accumulate_router_statistics(acc.data(), dlb.data(), dlse.data(), dcounts.data(), k.G,
                                      k.S, k.E, k.C);
    double lb_mean = 0, z = 0, dropped = 0;
    for (float v : lb) lb_mean += v;
    lb_mean /= k.G;
    for (float v : lse) z += double(v) * v;
    z /= double(T);
    std::vector<double> per_expert(k.E, 0.0);
    for (int g = 0; g < k.G; ++g)
      for (int e = 0; e < k.E; ++e) {
        const double c = counts[size_t(g) * k.E + e];
        per_expert[e] += c;
        dropped += std::max(0.0, c - k.C);
      }
    const auto h = read(*be_, acc);
    const std::string at = "G=" + std::to_string(k.G) + " S=" + std::to_string(k.S);
    expect_near_rel(h[0], start[0] + lb_mean, "lb " + at);
    expect_near_rel(h[1], start[1] + z, "z " + at);
    EXPECT_EQ(h[2], start[2] + 1.0) << at;
    EXPECT_EQ(h[3], start[3] + double(T)) << at;
    EXPECT_EQ(h[4], start[4] + dropped) << at;
    EXPECT_GT(dropped, 0.0) << "the case must drop tokens " << at;
    for (int e = 0; e < k.E; ++e) EXPECT_EQ(h[5 + e], start[5 + e] + per_expert[e]) << at << " e=" << e;
    EXPECT_EQ(per_expert[1], 0.0);
    EXPECT_EQ(h.back(), start.back()) << "wrote past 5 + E entries " << at;
  }
}

// Router confidence against the definitions computed here: entropy as -sum p log p (the op uses
// the identity lse - sum p * logit), the largest and second largest probability. Probabilities
// are the softmax of random logits (some rows with ties and a dominant expert), E = 1 included.
TEST_P(StatisticsOps, RouterConfidence) {
  struct Case { int64_t T; int E; };
  for (const Case& k : {Case{1, 1}, Case{7, 2}, Case{300, 4}, Case{1000, 8}, Case{33, 128}}) {
    auto logits = random_vector(k.T * k.E, 41 + k.T, -3.0f, 3.0f);
    if (k.E > 1) {
      logits[1] = logits[0];                 // a tie for token 0
      logits[size_t(k.E)] = 40.0f;           // token 1 (when T > 1): one expert takes all
    }
    std::vector<float> probs(logits.size()), lse(size_t(k.T));
    double entropy = 0, top1 = 0, margin = 0;
    for (int64_t t = 0; t < k.T; ++t) {
      const float* z = logits.data() + t * k.E;
      const double m = *std::max_element(z, z + k.E);
      double s = 0;
      for (int e = 0; e < k.E; ++e) s += std::exp(double(z[e]) - m);
      lse[size_t(t)] = float(m + std::log(s));
      std::vector<double> p(size_t(k.E));
      for (int e = 0; e < k.E; ++e) {
        probs[size_t(t * k.E + e)] = float(std::exp(double(z[e]) - lse[size_t(t)]));
        p[size_t(e)] = probs[size_t(t * k.E + e)];
        if (p[size_t(e)] > 0) entropy -= p[size_t(e)] * std::log(p[size_t(e)]);
      }
      std::sort(p.rbegin(), p.rend());
      top1 += p[0];
      margin += p[0] - (k.E > 1 ? p[1] : 0.0);
    }
    auto dprobs = upload(*be_, probs);
    auto dlogits = upload(*be_, logits);
    auto dlse = upload(*be_, lse);
    const std::vector<double> start = {0.25, 1.5, -2.0, 7.0};  // 3 entries and a guard
    auto acc = accumulator(*be_, start);
    be_->accumulate_router_confidence(acc.data(), dprobs.data(), dlogits.data(), dlse.data(), k.T,
                                      k.E);
    const auto h = read(*be_, acc);
    const std::string at = "T=" + std::to_string(k.T) + " E=" + std::to_string(k.E);
    // float probabilities and lse: the identity holds to float rounding, not double's.
    EXPECT_NEAR(h[0], start[0] + entropy / double(k.T), 1e-5) << "entropy " << at;
    EXPECT_NEAR(h[1], start[1] + top1 / double(k.T), 1e-6) << "top-1 " << at;
    EXPECT_NEAR(h[2], start[2] + margin / double(k.T), 1e-6) << "margin " << at;
    EXPECT_EQ(h[3], start[3]) << "wrote past 3 entries " << at;
    if (k.E == 1) {
      EXPECT_NEAR(h[0] - start[0], 0.0, 1e-6) << "one expert: no uncertainty";
    }
  }
}

std::vector<std::string> all_backends() {
  std::vector<std::string> names = {"reference"};
  for (const std::string& b : testing::backends_under_test()) names.push_back(b);
  return names;
}

INSTANTIATE_TEST_SUITE_P(Backends, StatisticsOps, ::testing::ValuesIn(all_backends()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace switcht5
