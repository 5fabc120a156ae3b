// What the layers keep between forward and backward, and what they only borrow: the forward
// workspace (q/k/v before the head-major permute, dropout(probs), a Switch layer's evaluation
// buffers) lives in the caller's scratch, which the model reuses for every layer and for
// backward. These tests overwrite that scratch between the calls, as the model does, and check
// that the values are bitwise those of the paths that keep everything.
#include <algorithm>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "model/attention.h"
#include "model/switch_ffn.h"
#include "test_util.h"

namespace switcht5 {
namespace {

using testing::download;
using testing::random_vector;
using testing::upload;

bool bitwise_equal(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

void poison(Backend& be, DeviceArray<float>& a) {
  be.fill(a.data(), std::numeric_limits<float>::quiet_NaN(), a.size());
}

class ActivationMemory : public ::testing::TestWithParam<const char*> {};

// Attention with dropout: dropout(probs) is not kept but recomputed in backward, and the
// projections live in the forward scratch. A layer whose scratch is poisoned between forward
// and backward (and reused by backward) gives bitwise the gradients of one that owns its
// forward workspace.
TEST_P(ActivationMemory, AttentionBackwardNeedsNoForwardScratch) {
  auto be = make_backend(GetParam());
  const int B = 2, Tq = 5, Tk = 7, D = 6, H = 2, K = 3;
  ParamStore ps;
  Attention::register_params(ps, "attn", D, H, K, 1.0);
  ps.allocate(*be);
  ps.initialize(*be, 3);
  const AttentionShape shape{B, Tq, Tk, D, H, K, false};
  Attention shared(*be, ps, "attn", shape), owning(*be, ps, "attn", shape);
  auto xq = upload(*be, random_vector(B * Tq * D, 4));
  auto xkv = upload(*be, random_vector(B * Tk * D, 5));
  auto mask = upload(*be, std::vector<float>(B * Tk, 1.0f));
  auto dout = upload(*be, random_vector(B * Tq * D, 6));
  const float p = 0.3f;
  const uint64_t seed = 17;

  struct Result { std::vector<float> out, dxq, dxkv, grads; };
  auto run = [&](Attention& attn, DeviceArray<float>* arena) {
    DeviceArray<float> out(*be, B * Tq * D), dxq(*be, B * Tq * D), dxkv(*be, B * Tk * D);
    be->fill(dxkv.data(), 0.0f, dxkv.size());
    ps.zero_grads(*be);
    DeviceArray<float> own_backward;
    float* backward_scratch;
    if (arena) {
      attn.forward(out.data(), xq.data(), xkv.data(), nullptr, mask.data(), p, seed, arena->data());
      poison(*be, *arena);  // the model runs other layers through the arena before backward
      backward_scratch = arena->data();
    } else {
      attn.forward(out.data(), xq.data(), xkv.data(), nullptr, mask.data(), p, seed);
      own_backward = DeviceArray<float>(*be, attn.scratch_floats());
      backward_scratch = own_backward.data();
    }
    attn.backward(dxq.data(), dxkv.data(), nullptr, dout.data(), backward_scratch);
    return Result{download(*be, out.data(), out.size()), download(*be, dxq.data(), dxq.size()),
                  download(*be, dxkv.data(), dxkv.size()),
                  download(*be, ps.grads(), ps.total_numel())};
  };
  DeviceArray<float> arena(*be, std::max(shared.scratch_floats(), shared.forward_scratch_floats()));
  poison(*be, arena);
  const Result a = run(shared, &arena);
  const Result b = run(owning, nullptr);
  EXPECT_TRUE(bitwise_equal(a.out, b.out));
  EXPECT_TRUE(bitwise_equal(a.dxq, b.dxq));
  EXPECT_TRUE(bitwise_equal(a.dxkv, b.dxkv));
  EXPECT_TRUE(bitwise_equal(a.grads, b.grads));
  EXPECT_EQ(shared.activation_bytes() + sizeof(float) * owning.forward_scratch_floats(),
            owning.activation_bytes())
      << "a layer counts the forward workspace it owns, and only that one";
}

// A Switch layer evaluates at its evaluation capacity in the caller's scratch, its kept buffers
// being sized for the smaller training capacity; the output is bitwise that of a layer whose
// training buffers have the evaluation capacity, run on the kept (training) path without
// jitter or dropout. Backward after an evaluation forward is refused.
TEST_P(ActivationMemory, SwitchEvaluatesInScratchAtTheEvaluationCapacity) {
  for (const bool gated : {false, true}) {
    SCOPED_TRACE(gated ? "gated-gelu" : "relu");
    auto be = make_backend(GetParam());
    // 2 groups of 8 tokens, 4 experts: capacity 1 drops many tokens, capacity 3 few.
    const int T = 16, S = 8, D = 5, F = 6, E = 4;
    ParamStore ps;
    SwitchFFN::register_params(ps, "mlp", D, F, E, gated, 1.0);
    ps.allocate(*be);
    ps.initialize(*be, 8);
    SwitchFFN small(*be, ps, "mlp", {T, S, D, F, E, /*capacity_train=*/1, /*capacity_eval=*/3,
                                     gated});
    SwitchFFN large(*be, ps, "mlp", {T, S, D, F, E, /*capacity_train=*/3, /*capacity_eval=*/3,
                                     gated});
    EXPECT_LT(small.activation_bytes(), large.activation_bytes());
    auto x = upload(*be, random_vector(T * D, 9, -2, 2));
    DeviceArray<float> out_eval(*be, T * D), out_train(*be, T * D);
    DeviceArray<float> arena(*be, small.forward_scratch_floats());
    poison(*be, arena);
    const RouterStats eval = small.forward(out_eval.data(), x.data(), /*training=*/false, 0.1f,
                                           0.1f, 5, 0, 0, arena.data());
    const RouterStats train = large.forward(out_train.data(), x.data(), /*training=*/true, 0.0f,
                                            0.0f, 5);
    EXPECT_GT(eval.dropped, 0);
    EXPECT_EQ(eval.dropped, train.dropped);
    EXPECT_TRUE(bitwise_equal(download(*be, out_eval.data(), T * D),
                              download(*be, out_train.data(), T * D)));
    DeviceArray<float> dx(*be, T * D), scratch(*be, small.scratch_floats());
    EXPECT_ANY_THROW(small.backward(dx.data(), out_eval.data(), 1.0f, 1.0f, scratch.data()));
  }
}

INSTANTIATE_TEST_SUITE_P(Backends, ActivationMemory, ::testing::Values("reference", "cpu"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace switcht5
