// Optimizer kernels (adamw_update, adafactor_update) on every backend against a host double
// implementation written here from the formulas; the Optimizer classes through a ParamStore;
// global gradient-norm clipping.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <utility>
#include <vector>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "config/config.h"
#include "core/check.h"
#include "model/model.h"
#include "model/params.h"
#include "test_util.h"
#include "train/grad_clip.h"
#include "train/optimizer.h"

namespace switcht5 {
namespace {

using testing::all_close;
using testing::download;
using testing::random_vector;
using testing::upload;

std::vector<float> to_float(const std::vector<double>& x) { return {x.begin(), x.end()}; }

// ---- host double implementations (written from the formulas, independent of the kernels) ----

struct HostAdam {
  std::vector<double> m, v;
};

// m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr*((m/bc1)/(sqrt(v/bc2)+eps) + wd*p)
void host_adamw(std::vector<double>& p, const std::vector<float>& g, HostAdam& s, int64_t t,
                double lr, float b1f, float b2f, float epsf, float wdf) {
  const double b1 = b1f, b2 = b2f, eps = epsf, wd = wdf;
  // The kernel receives the bias corrections as floats.
  const double bc1 = static_cast<float>(1.0 - std::pow(b1, double(t)));
  const double bc2 = static_cast<float>(1.0 - std::pow(b2, double(t)));
  for (size_t i = 0; i < p.size(); ++i) {
    s.m[i] = b1 * s.m[i] + (1 - b1) * g[i];
    s.v[i] = b2 * s.v[i] + (1 - b2) * double(g[i]) * g[i];
    p[i] -= lr * ((s.m[i] / bc1) / (std::sqrt(s.v[i] / bc2) + eps) + wd * p[i]);
  }
}

struct HostAdafactor {
  bool factored;
  int count, R, C;
  std::vector<double> vr, vc, v;  // [count,R], [count,C] or [count,R*C]
  HostAdafactor(bool f, int n, int r, int c) : factored(f), count(n), R(r), C(c) {
    if (f) {
      vr.assign(size_t(n) * r, 0.0);
      vc.assign(size_t(n) * c, 0.0);
    } else
      v.assign(size_t(n) * r * c, 0.0);
  }
};

// As HF transformers' Adafactor.step (beta1=None, external lr), per matrix:
//   lr = lr * max(eps2, rms(p)) when eps2 > 0 (scale_parameter; rms before the step)
//   sq = g^2 + eps1; row = b2t row + (1-b2t) sq.mean(-1); col = b2t col + (1-b2t) sq.mean(-2)
//   u = g * rsqrt(row / row.mean()) [:,None] * rsqrt(col) [None,:]    (unfactored: g*rsqrt(v))
//   u /= max(1, rms(u)/clip);  p = p - lr*wd*p - lr*u
void host_adafactor(std::vector<double>& p, const std::vector<float>& g, HostAdafactor& s,
                    double lr0, double beta2t, double eps1, double clip, double wd,
                    double eps2 = 0.0) {
  const int R = s.R, C = s.C;
  const size_t RC = size_t(R) * C;
  for (int k = 0; k < s.count; ++k) {
    std::vector<double> u(RC);
    auto G = [&](int i, int j) { return double(g[k * RC + size_t(i) * C + j]); };
    double lr = lr0;
    if (eps2 > 0) {
      double ms = 0;
      for (size_t e = 0; e < RC; ++e) ms += p[k * RC + e] * p[k * RC + e] / double(RC);
      lr *= std::max(eps2, std::sqrt(ms));
    }
    if (s.factored) {
      double* row = &s.vr[size_t(k) * R];
      double* col = &s.vc[size_t(k) * C];
      for (int i = 0; i < R; ++i) {
        double mean = 0;
        for (int j = 0; j < C; ++j) mean += (G(i, j) * G(i, j) + eps1) / C;
        row[i] = beta2t * row[i] + (1 - beta2t) * mean;
      }
      for (int j = 0; j < C; ++j) {
        double mean = 0;
        for (int i = 0; i < R; ++i) mean += (G(i, j) * G(i, j) + eps1) / R;
        col[j] = beta2t * col[j] + (1 - beta2t) * mean;
      }
      double row_mean = 0;
      for (int i = 0; i < R; ++i) row_mean += row[i] / R;
      for (int i = 0; i < R; ++i)
        for (int j = 0; j < C; ++j)
          u[size_t(i) * C + j] =
              G(i, j) * (1 / std::sqrt(row[i] / row_mean)) * (1 / std::sqrt(col[j]));
    } else {
      for (size_t e = 0; e < RC; ++e) {
        double ge = g[k * RC + e];
        double& ve = s.v[k * RC + e];
        ve = beta2t * ve + (1 - beta2t) * (ge * ge + eps1);
        u[e] = ge / std::sqrt(ve);
      }
    }
    double ms = 0;
    for (double x : u) ms += x * x / double(RC);
    const double div = std::max(1.0, std::sqrt(ms) / clip);
    for (size_t e = 0; e < RC; ++e) {
      double& pe = p[k * RC + e];
      pe = pe - lr * wd * pe - lr * (u[e] / div);
    }
  }
}

double beta2t_at(int64_t t, double decay_rate = 0.8) {
  return 1.0 - std::pow(double(t), -decay_rate);
}

// ---- kernel tests, run on every backend ----

class OptimKernelTest : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    be = testing::backend_or_skip(GetParam(), why);
    if (!be) GTEST_SKIP() << why;
  }
  std::unique_ptr<Backend> be;
};

// The reference and every backend under test (test_util.h).
std::vector<std::string> all_backends() {
  std::vector<std::string> names = {"reference"};
  for (const std::string& b : testing::backends_under_test()) names.push_back(b);
  return names;
}

TEST_P(OptimKernelTest, AdamWMatchesHostOverSteps) {
  for (int64_t n : {1, 37, 1000, 50001}) {
    for (float wd : {0.0f, 0.01f}) {
      SCOPED_TRACE("n=" + std::to_string(n) + " wd=" + std::to_string(wd));
      const float b1 = 0.9f, b2 = 0.999f, eps = 1e-8f;
      std::vector<float> p0 = random_vector(n, 1);
      std::vector<double> hp(p0.begin(), p0.end());
      HostAdam hs{std::vector<double>(n, 0.0), std::vector<double>(n, 0.0)};
      auto p = upload(*be, p0);
      DeviceArray<float> m(*be, n), v(*be, n);
      for (int64_t t = 1; t <= 5; ++t) {
        std::vector<float> g = random_vector(n, 100 + t, -0.5f, 0.5f);
        auto dg = upload(*be, g);
        const double lr = 1e-2 / double(t);
        be->adamw_update(p.data(), nullptr, dg.data(), m.data(), v.data(), n, float(lr), b1, b2,
                         eps, wd, float(1.0 - std::pow(double(b1), double(t))),
                         float(1.0 - std::pow(double(b2), double(t))));
        host_adamw(hp, g, hs, t, float(lr), b1, b2, eps, wd);
        ASSERT_TRUE(all_close(download(*be, p.data(), n), to_float(hp), 1e-5, 1e-6))
            << "step " << t;
        ASSERT_TRUE(all_close(download(*be, m.data(), n), to_float(hs.m), 1e-5, 1e-7))
            << "step " << t;
        ASSERT_TRUE(all_close(download(*be, v.data(), n), to_float(hs.v), 1e-5, 1e-9))
            << "step " << t;
      }
    }
  }
}

struct AdafactorShape {
  bool factored;
  int count, R, C;
};

TEST_P(OptimKernelTest, AdafactorMatchesHostOverSteps) {
  const std::vector<AdafactorShape> shapes = {
      {true, 1, 8, 16},     {true, 3, 5, 7},     {false, 3, 5, 7},
      {false, 1, 1, 37},    {true, 1, 300, 200},  // large enough for the CPU backend's threaded
                                                  // path, several column blocks
      {false, 1, 1, 20000}, {true, 2, 2, 130},   {true, 1, 70, 1 + 64}};
  // eps2: no parameter scale; T5X's 1e-3 (every matrix's rms is above it); 1.0, where matrix 0
  // (rms ~0.58) takes the floor and the larger matrices their rms.
  for (const AdafactorShape& sh : shapes) {
    for (auto [wd, eps2] : {std::pair{0.0f, 0.0f}, {0.1f, 0.0f}, {0.1f, 1e-3f}, {0.0f, 1.0f}}) {
      SCOPED_TRACE(fmt::format("factored={} count={} R={} C={} wd={} eps2={}", sh.factored,
                               sh.count, sh.R, sh.C, wd, eps2));
      const int64_t n = int64_t(sh.count) * sh.R * sh.C;
      const float eps1 = 1e-30f, clip = 1.0f;
      // Matrix k scaled by k + 1, so each has its own parameter scale.
      std::vector<float> p0 = random_vector(n, 7);
      for (int64_t e = 0; e < n; ++e) p0[e] *= float(1 + e / (int64_t(sh.R) * sh.C));
      std::vector<double> hp(p0.begin(), p0.end());
      HostAdafactor hs(sh.factored, sh.count, sh.R, sh.C);
      auto p = upload(*be, p0);
      DeviceArray<float> vr(*be, sh.factored ? int64_t(sh.count) * sh.R : 0);
      DeviceArray<float> vc(*be, sh.factored ? int64_t(sh.count) * sh.C : 0);
      DeviceArray<float> v(*be, sh.factored ? 0 : n);
      for (int64_t t = 1; t <= 5; ++t) {
        // Gradients whose scale differs per step and per row so the factors matter.
        std::vector<float> g = random_vector(n, 200 + t, -1.0f, 1.0f);
        for (int64_t e = 0; e < n; ++e) g[e] *= 0.1f * float(1 + (e / sh.C) % 4) / float(t);
        auto dg = upload(*be, g);
        const float lr = 0.01f, beta2t = float(beta2t_at(t));
        be->adafactor_update(p.data(), nullptr, dg.data(), vr.data(), vc.data(), v.data(),
                             sh.factored, sh.count, sh.R, sh.C, lr, beta2t, eps1, clip, wd, eps2);
        host_adafactor(hp, g, hs, lr, beta2t, eps1, clip, wd, eps2);
        ASSERT_TRUE(all_close(download(*be, p.data(), n), to_float(hp), 1e-5, 1e-6))
            << "step " << t;
        if (sh.factored) {
          ASSERT_TRUE(all_close(download(*be, vr.data(), vr.size()), to_float(hs.vr), 1e-5, 1e-12));
          ASSERT_TRUE(all_close(download(*be, vc.data(), vc.size()), to_float(hs.vc), 1e-5, 1e-12));
        } else {
          ASSERT_TRUE(all_close(download(*be, v.data(), n), to_float(hs.v), 1e-5, 1e-12));
        }
      }
    }
  }
}

// With clip below the natural rms of the update, every matrix's applied update has rms == clip.
TEST_P(OptimKernelTest, AdafactorUpdateClippingPerMatrix) {
  for (bool factored : {true, false}) {
    SCOPED_TRACE(factored ? "factored" : "unfactored");
    const int count = 3, R = 5, C = 7;
    const int64_t n = int64_t(count) * R * C;
    std::vector<float> p0 = random_vector(n, 11);
    std::vector<float> g = random_vector(n, 12);
    // Matrix 2 gets much smaller gradients than the others: clipping must not couple matrices.
    for (int64_t e = 2 * R * C; e < n; ++e) g[e] *= 1e-3f;
    auto p = upload(*be, p0);
    auto dg = upload(*be, g);
    DeviceArray<float> vr(*be, count * R), vc(*be, count * C), v(*be, n);
    const float lr = 0.5f, clip = 0.25f;
    // Step 1 (beta2t = 0): the unclipped update has rms around 1 (exactly 1 when unfactored).
    be->adafactor_update(p.data(), nullptr, dg.data(), vr.data(), vc.data(), v.data(), factored,
                         count, R, C, lr, 0.0f, 1e-30f, clip, 0.0f, 0.0f);
    std::vector<float> p1 = download(*be, p.data(), n);
    for (int k = 0; k < count; ++k) {
      double ss = 0;
      for (int64_t e = k * R * C; e < (k + 1) * R * C; ++e) {
        double u = (double(p0[e]) - double(p1[e])) / lr;
        ss += u * u;
      }
      EXPECT_NEAR(std::sqrt(ss / (R * C)), clip, 1e-5) << "matrix " << k;
    }
    // Cross-check against the host implementation as well.
    std::vector<double> hp(p0.begin(), p0.end());
    HostAdafactor hs(factored, count, R, C);
    host_adafactor(hp, g, hs, lr, 0.0, 1e-30, clip, 0.0);
    EXPECT_TRUE(all_close(p1, to_float(hp), 1e-5, 1e-6));
  }
}

// Hand-worked: one step on a 2x2 matrix, beta2t = 0 (step 1), eps1 negligible.
//   g = [[1, 0], [0, 2]]        g^2 = [[1, 0], [0, 4]]
//   vr = row means = [0.5, 2]   vc = column means = [0.5, 2]   mean(vr) = 1.25
//   V  = vr_i * vc_j / mean(vr) = [[0.2, 0.8], [0.8, 3.2]]
//   u  = g / sqrt(V)            = [[sqrt(5), 0], [0, sqrt(5)/2]]       rms(u) = sqrt(6.25/4) = 1.25
//   clip 1: u /= 1.25           = [[4/sqrt(5), 0], [0, 2/sqrt(5)]] = [[1.7888544, 0], [0,
//   0.8944272]] p = 1 everywhere, lr = 0.1, wd = 0.5: p -= 0.1 * (u + 0.5 * 1) p  = [[1 -
//   0.1*(1.7888544+0.5), 0.95], [0.95, 1 - 0.1*(0.8944272+0.5)]]
//      = [[0.77111456, 0.95], [0.95, 0.86055728]]
TEST_P(OptimKernelTest, AdafactorHandWorked2x2) {
  auto p = upload(*be, std::vector<float>{1, 1, 1, 1});
  auto g = upload(*be, std::vector<float>{1, 0, 0, 2});
  DeviceArray<float> vr(*be, 2), vc(*be, 2);
  be->adafactor_update(p.data(), nullptr, g.data(), vr.data(), vc.data(), nullptr, true, 1, 2, 2,
                       0.1f, 0.0f, 1e-30f, 1.0f, 0.5f, 0.0f);
  EXPECT_TRUE(
      all_close(download(*be, p.data(), 4), {0.77111456f, 0.95f, 0.95f, 0.86055728f}, 1e-6, 0));
  // The parameter scale, same g and u: p = 2 everywhere has rms 2 (above eps2 = 1e-3), so the
  // step is lr * 2 = 0.2:  p -= 0.2 * (u + 0.5 * 2)
  //   = [[2 - 0.2 * 2.7888544, 2 - 0.2], [1.8, 2 - 0.2 * 1.8944272]]
  auto q = upload(*be, std::vector<float>{2, 2, 2, 2});
  DeviceArray<float> qr(*be, 2), qc(*be, 2);
  be->adafactor_update(q.data(), nullptr, g.data(), qr.data(), qc.data(), nullptr, true, 1, 2, 2,
                       0.1f, 0.0f, 1e-30f, 1.0f, 0.5f, 1e-3f);
  EXPECT_TRUE(
      all_close(download(*be, q.data(), 4), {1.44222912f, 1.8f, 1.8f, 1.62111456f}, 1e-6, 0));
  // A tiny matrix takes the floor: p = 1e-5 everywhere, eps2 = 1e-3: the step is lr * 1e-3.
  //   p = 1e-5 - 1e-4 * (u + 0.5e-5)
  auto t = upload(*be, std::vector<float>{1e-5f, 1e-5f, 1e-5f, 1e-5f});
  DeviceArray<float> tr(*be, 2), tc(*be, 2);
  be->adafactor_update(t.data(), nullptr, g.data(), tr.data(), tc.data(), nullptr, true, 1, 2, 2,
                       0.1f, 0.0f, 1e-30f, 1.0f, 0.5f, 1e-3f);
  const double tiny = 1e-5 - 1e-4 * 0.5e-5;
  EXPECT_TRUE(all_close(download(*be, t.data(), 4),
                        {float(tiny - 1e-4 * 1.7888544), float(tiny), float(tiny),
                         float(tiny - 1e-4 * 0.8944272)},
                        1e-6, 1e-12));
  EXPECT_TRUE(all_close(download(*be, vr.data(), 2), {0.5f, 2.0f}, 1e-7, 0));
  EXPECT_TRUE(all_close(download(*be, vc.data(), 2), {0.5f, 2.0f}, 1e-7, 0));
}

INSTANTIATE_TEST_SUITE_P(Backends, OptimKernelTest, ::testing::ValuesIn(all_backends()),
                         [](const auto& info) { return info.param; });

// The CPU kernels give bitwise the same result for any thread count.
TEST(OptimCpu, DeterministicAcrossThreadCounts) {
  auto be = make_backend("cpu");
  auto run = [&](int threads, bool factored, int R, int C) {
    omp_set_num_threads(threads);
    const int64_t n = int64_t(R) * C;
    auto p = upload(*be, random_vector(n, 21));
    DeviceArray<float> vr(*be, R), vc(*be, C), v(*be, n), m(*be, n), mv(*be, n);
    for (int64_t t = 1; t <= 3; ++t) {
      auto g = upload(*be, random_vector(n, 30 + t));
      be->adafactor_update(p.data(), nullptr, g.data(), vr.data(), vc.data(), v.data(), factored, 1,
                           R, C, 0.01f, float(beta2t_at(t)), 1e-30f, 1.0f, 0.01f,
                           t % 2 ? 1e-3f : 0.0f);  // the parameter scale's sums too
      be->adamw_update(p.data(), nullptr, g.data(), m.data(), mv.data(), n, 1e-3f, 0.9f, 0.999f,
                       1e-8f, 0.01f, 0.5f, 0.5f);
    }
    return download(*be, p.data(), n);
  };
  const int saved = omp_get_max_threads();
  for (bool factored : {true, false}) {
    std::vector<float> a = run(1, factored, 300, 257), b = run(4, factored, 300, 257),
                       c = run(3, factored, 300, 257);
    EXPECT_EQ(a, b);
    EXPECT_EQ(a, c);
  }
  omp_set_num_threads(saved);
}

// ---- Optimizer through a ParamStore ----

ParamStore make_store(Backend& be) {
  ParamStore ps;
  auto add = [&](std::string name, std::vector<int64_t> shape, ParamKind kind) {
    ParamInfo info;
    info.name = std::move(name);
    info.shape = std::move(shape);
    info.kind = kind;
    info.init_std = 0.5;
    ps.add(std::move(info));
  };
  add("encoder.block.0.layer.0.SelfAttention.q.weight", {6, 4}, ParamKind::kMatrix);
  add("encoder.block.1.layer.1.mlp.experts.wi.weight", {3, 5, 7}, ParamKind::kStacked);
  add("encoder.final_layer_norm.weight", {4}, ParamKind::kVector);
  add("shared.weight", {10, 4}, ParamKind::kEmbedding);
  add("row.weight", {1, 8}, ParamKind::kMatrix);  // a one-row matrix: unfactored, but decayed
  ps.allocate(be);
  ps.initialize(be, 1234);
  return ps;
}

std::vector<float> all_values(Backend& be, ParamStore& ps) {
  return download(be, ps.values(), ps.total_numel());
}

TEST(Optimizer, AdafactorFactoredDecisionPerKind) {
  auto be = make_backend("reference");
  ParamStore ps = make_store(*be);
  EXPECT_TRUE(adafactor_factored(ps.info("encoder.block.0.layer.0.SelfAttention.q.weight")));
  EXPECT_TRUE(adafactor_factored(ps.info("encoder.block.1.layer.1.mlp.experts.wi.weight")));
  EXPECT_FALSE(adafactor_factored(ps.info("encoder.final_layer_norm.weight")));
  EXPECT_TRUE(adafactor_factored(ps.info("shared.weight")));
  EXPECT_FALSE(adafactor_factored(ps.info("row.weight")));
}

TEST(Optimizer, AdafactorStateNamesAndShapes) {
  auto be = make_backend("reference");
  ParamStore ps = make_store(*be);
  auto opt = make_optimizer(OptimizerOptions{}, *be, ps);
  std::vector<Optimizer::StateTensor> st = opt->state();
  struct Expect {
    std::string name;
    std::vector<int64_t> shape;
  };
  const std::vector<Expect> expected = {
      {"encoder.block.0.layer.0.SelfAttention.q.weight.exp_avg_sq_row", {6}},
      {"encoder.block.0.layer.0.SelfAttention.q.weight.exp_avg_sq_col", {4}},
      {"encoder.block.1.layer.1.mlp.experts.wi.weight.exp_avg_sq_row", {3, 5}},
      {"encoder.block.1.layer.1.mlp.experts.wi.weight.exp_avg_sq_col", {3, 7}},
      {"encoder.final_layer_norm.weight.exp_avg_sq", {4}},
      {"shared.weight.exp_avg_sq_row", {10}},
      {"shared.weight.exp_avg_sq_col", {4}},
      {"row.weight.exp_avg_sq", {1, 8}},
  };
  ASSERT_EQ(st.size(), expected.size());
  for (size_t i = 0; i < st.size(); ++i) {
    EXPECT_EQ(st[i].name, expected[i].name);
    EXPECT_EQ(st[i].shape, expected[i].shape) << st[i].name;
    ASSERT_NE(st[i].data, nullptr);
  }
  // The tensors do not overlap: consecutive in one array.
  for (size_t i = 0; i + 1 < st.size(); ++i) {
    int64_t numel = 1;
    for (int64_t d : st[i].shape) numel *= d;
    EXPECT_LE(st[i].data + numel, st[i + 1].data) << st[i].name;
  }
}

TEST(Optimizer, AdamWStateNamesAndShapes) {
  auto be = make_backend("reference");
  ParamStore ps = make_store(*be);
  OptimizerOptions o;
  o.name = "adamw";
  auto opt = make_optimizer(o, *be, ps);
  std::vector<Optimizer::StateTensor> st = opt->state();
  ASSERT_EQ(st.size(), 2 * ps.infos().size());
  for (size_t i = 0; i < ps.infos().size(); ++i) {
    EXPECT_EQ(st[2 * i].name, ps.infos()[i].name + ".exp_avg");
    EXPECT_EQ(st[2 * i + 1].name, ps.infos()[i].name + ".exp_avg_sq");
    EXPECT_EQ(st[2 * i].shape, ps.infos()[i].shape);
    EXPECT_EQ(st[2 * i + 1].shape, ps.infos()[i].shape);
  }
}

// A communicator that only has a size: the optimizers' constructors read nothing else from
// their model group (no collective runs here: step() is not called).
class SizeOnlyCommunicator final : public Communicator {
 public:
  explicit SizeOnlyCommunicator(int size) : size_(size) {}
  int rank() const override { return 0; }
  int size() const override { return size_; }
  void all_reduce_sum(float*, int64_t) override { unused(); }
  void all_reduce_sum(double*, int64_t) override { unused(); }
  void all_reduce_sum(int64_t*, int64_t) override { unused(); }
  void all_reduce_max(int64_t*, int64_t) override { unused(); }
  void reduce_scatter_sum(float*, const float*, int64_t) override { unused(); }
  void all_gather(float*, const float*, int64_t) override { unused(); }
  void all_to_all(float*, const float*, int64_t) override { unused(); }
  void broadcast(float*, int64_t, int) override { unused(); }
  void broadcast(std::string&, int) override { unused(); }
  void barrier() override { unused(); }
  std::unique_ptr<Communicator> split(int, int) const override { unused(); return nullptr; }

 private:
  [[noreturn]] static void unused() { throw Error("SizeOnlyCommunicator: no collectives"); }
  int size_;
};

// optimizer_state_numel (what `switcht5 plan` reports) is exactly what the optimizers allocate:
// the sum of their state tensors, for both optimizers, tensor parallelism (Adafactor keeps a
// split matrix's whole statistics), expert shards, gated experts and a ZeRO-1 subset.
TEST(Optimizer, StateNumelIsWhatTheOptimizerAllocates) {
  auto be = make_backend("reference");
  ModelConfig m;
  m.vocab_size = 32;
  m.d_model = 8;
  m.d_ff = 16;
  m.d_kv = 4;
  m.num_heads = 2;
  m.num_layers = 2;
  m.num_decoder_layers = 2;
  m.num_experts = 4;
  m.encoder_sparse_step = m.decoder_sparse_step = 2;
  for (const char* ffn : {"relu", "gated-gelu"})
    for (int model : {1, 2})
      for (const char* name : {"adafactor", "adamw"})
        for (bool subset : {false, true}) {
          SCOPED_TRACE(::testing::Message() << ffn << " model " << model << " " << name
                                            << (subset ? " ZeRO-1 subset" : ""));
          m.feed_forward_proj = ffn;
          ParamStore ps;
          register_model_params(ps, m, Sharding{2, 1, model, model - 1});
          ps.allocate(*be);
          std::vector<bool> updates(ps.infos().size(), true);
          if (subset)
            for (size_t i = 0; i < updates.size(); i += 2) updates[i] = false;
          SizeOnlyCommunicator group(model);
          OptimizerOptions o;
          o.name = name;
          auto opt = make_optimizer(o, *be, ps, updates, model > 1 ? &group : nullptr);
          int64_t allocated = 0, predicted = 0;
          for (const Optimizer::StateTensor& t : opt->state()) {
            int64_t n = 1;
            for (int64_t d : t.shape) n *= d;
            if (t.data) allocated += n;
          }
          for (size_t i = 0; i < ps.infos().size(); ++i)
            if (updates[i]) predicted += optimizer_state_numel(name, ps.infos()[i], model);
          EXPECT_GT(allocated, 0);
          EXPECT_EQ(predicted, allocated);
        }
  EXPECT_THROW(optimizer_state_numel("sgd", ParamInfo{}, 1), UserError);
}

TEST(Optimizer, UnknownNameIsUserError) {
  auto be = make_backend("reference");
  ParamStore ps = make_store(*be);
  OptimizerOptions o;
  o.name = "sgd";
  try {
    make_optimizer(o, *be, ps);
    FAIL() << "expected UserError";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("sgd"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("adafactor"), std::string::npos) << e.what();
  }
}

// The Optimizer classes and gradient clipping on each backend (a fresh backend per case; the
// fixture only skips a GPU backend where no GPU is visible).
class OptimizerOnBackend : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    std::string why;
    if (!testing::backend_or_skip(GetParam(), why)) GTEST_SKIP() << why;
  }
};
class GradClipOnBackend : public OptimizerOnBackend {};

// Zero gradients: the update is 0 (Adafactor: g * finite factors; AdamW: 0 / (0 + eps)), so only
// the weight decay moves parameters: every non-vector parameter is scaled by (1 - lr*wd) and
// the RMSNorm scale (kVector) stays exactly as it was.
TEST_P(OptimizerOnBackend, WeightDecaySkipsVectors) {
  {
    const std::string backend = GetParam();
    for (std::string name : {"adafactor", "adamw"}) {
      SCOPED_TRACE(backend + " " + name);
      auto be = make_backend(backend);
      ParamStore ps = make_store(*be);
      OptimizerOptions o;
      o.name = name;
      o.weight_decay = 0.1;
      auto opt = make_optimizer(o, *be, ps);
      std::vector<float> before = all_values(*be, ps);
      opt->step(*be, ps, 0.5f);
      EXPECT_EQ(opt->steps_taken(), 1);
      std::vector<float> after = all_values(*be, ps);
      for (const ParamInfo& p : ps.infos()) {
        const float factor = p.kind == ParamKind::kVector ? 1.0f : 1.0f - 0.5f * 0.1f;
        for (int64_t e = p.offset; e < p.offset + p.numel; ++e)
          ASSERT_NEAR(after[e], before[e] * factor, 1e-6) << p.name;
      }
    }
  }
}

// Full optimizer steps against the host implementation, parameter by parameter.
TEST_P(OptimizerOnBackend, StepsMatchHostPerParameter) {
  {
    const std::string backend = GetParam();
    for (std::string name : {"adafactor", "adamw"}) {
      SCOPED_TRACE(backend + " " + name);
      auto be = make_backend(backend);
      ParamStore ps = make_store(*be);
      OptimizerOptions o;
      o.name = name;
      o.weight_decay = 0.05;
      auto opt = make_optimizer(o, *be, ps);
      std::vector<float> v0 = all_values(*be, ps);
      std::vector<double> hp(v0.begin(), v0.end());
      std::vector<HostAdafactor> haf;
      std::vector<HostAdam> had;
      for (const ParamInfo& p : ps.infos()) {
        haf.emplace_back(adafactor_factored(p), p.matrix_count(), int(p.rows()), int(p.cols()));
        had.push_back({std::vector<double>(p.numel, 0.0), std::vector<double>(p.numel, 0.0)});
      }
      for (int64_t t = 1; t <= 3; ++t) {
        std::vector<float> g = random_vector(ps.total_numel(), 500 + t);
        be->copy_to_device(ps.grads(), g.data(), sizeof(float) * g.size());
        const float lr = 0.02f;
        opt->step(*be, ps, lr);
        ASSERT_EQ(opt->steps_taken(), t);
        for (size_t i = 0; i < ps.infos().size(); ++i) {
          const ParamInfo& p = ps.infos()[i];
          std::vector<double> hpi(hp.begin() + p.offset, hp.begin() + p.offset + p.numel);
          std::vector<float> gi(g.begin() + p.offset, g.begin() + p.offset + p.numel);
          const float wd = p.kind == ParamKind::kVector ? 0.0f : 0.05f;
          if (name == "adafactor")
            host_adafactor(hpi, gi, haf[i], lr, float(beta2t_at(t)), float(1e-30), 1.0, wd);
          else
            host_adamw(hpi, gi, had[i], t, lr, 0.9f, 0.999f, 1e-8f, wd);
          std::copy(hpi.begin(), hpi.end(), hp.begin() + p.offset);
        }
        std::vector<float> got = all_values(*be, ps);
        for (const ParamInfo& p : ps.infos()) {
          std::vector<float> a(got.begin() + p.offset, got.begin() + p.offset + p.numel);
          std::vector<double> b(hp.begin() + p.offset, hp.begin() + p.offset + p.numel);
          ASSERT_TRUE(all_close(a, to_float(b), 1e-5, 1e-6)) << p.name << " step " << t;
        }
      }
      opt->set_steps_taken(100);
      EXPECT_EQ(opt->steps_taken(), 100);
    }
  }
}

// ---- global gradient-norm clipping ----

TEST_P(GradClipOnBackend, ReturnsNormAndScales) {
  {
    const std::string backend = GetParam();
    SCOPED_TRACE(backend);
    auto be = make_backend(backend);
    auto fresh = [&] {
      ParamStore ps;
      ParamInfo a;
      a.name = "a";
      a.shape = {2, 2};
      ps.add(a);
      ParamInfo b;
      b.name = "b";
      b.shape = {3};
      b.kind = ParamKind::kVector;
      ps.add(b);
      ps.allocate(*be);
      // Global norm = sqrt(3^2 + 4^2) = 5, the two entries in different parameters.
      float three = 3.0f, four = 4.0f;
      be->copy_to_device(ps.grad("a") + 1, &three, sizeof(float));
      be->copy_to_device(ps.grad("b") + 2, &four, sizeof(float));
      return ps;
    };
    {
      ParamStore ps = fresh();
      EXPECT_DOUBLE_EQ(clip_grad_norm(*be, ps, 1.0), 5.0);
      std::vector<float> a = download(*be, ps.grad("a"), 4), b = download(*be, ps.grad("b"), 3);
      EXPECT_TRUE(all_close(a, {0, 0.6f, 0, 0}, 1e-6, 0));
      EXPECT_TRUE(all_close(b, {0, 0, 0.8f}, 1e-6, 0));
      EXPECT_NEAR(clip_grad_norm(*be, ps, 0.0), 1.0, 1e-6);  // now unit norm, 0 = no clipping
    }
    for (double max_norm : {0.0, 5.0, 10.0}) {  // off, equal, above: unchanged
      ParamStore ps = fresh();
      EXPECT_DOUBLE_EQ(clip_grad_norm(*be, ps, max_norm), 5.0);
      EXPECT_EQ(download(*be, ps.grad("a"), 4), (std::vector<float>{0, 3, 0, 0}));
      EXPECT_EQ(download(*be, ps.grad("b"), 3), (std::vector<float>{0, 0, 4}));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, OptimizerOnBackend, ::testing::ValuesIn(all_backends()),
                         [](const auto& info) { return info.param; });
INSTANTIATE_TEST_SUITE_P(Backends, GradClipOnBackend, ::testing::ValuesIn(all_backends()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace switcht5
