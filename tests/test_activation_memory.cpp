// What the layers keep between forward and backward, and what they only borrow: the forward
// workspace (q/k/v before the head-major permute, dropout(probs), a Switch layer's evaluation
// buffers) lives in the caller's scratch, which the model reuses for every layer and for
// backward. These tests overwrite that scratch between the calls, as the model does, and check
// that the values are bitwise those of the paths that keep everything.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "core/dtype.h"
#include "model/activation_buffer.h"
#include "model/attention.h"
#include "model/feed_forward.h"
#include "model/model.h"
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

// An fp32 ActivationBuffer is the fp32 buffer itself: layers compute in it, and store / load do
// nothing. A bf16 one holds half the bytes; storing bf16 values and loading them back is exact.
TEST_P(ActivationMemory, ActivationBufferStoresInTheComputeDtype) {
  auto be = make_backend(GetParam());
  const int64_t n = 37;
  std::vector<float> values = random_vector(n, 11, -3, 3);
  for (float& v : values) v = round_to_bf16(v);  // what store_activation leaves in bf16 mode
  DeviceArray<float> staging(*be, n);

  ActivationBuffer f32(*be, DType::kF32, n);
  EXPECT_EQ(f32.bytes(), sizeof(float) * n);
  EXPECT_EQ(f32.staging_floats(), 0);
  float* in_place = f32.f32_or(staging.data());
  EXPECT_EQ(static_cast<void*>(in_place), f32.data());
  be->copy_to_device(in_place, values.data(), sizeof(float) * n);
  f32.store(*be, in_place);
  EXPECT_EQ(static_cast<const void*>(f32.load(*be, staging.data())), f32.data());
  EXPECT_ANY_THROW(f32.store(*be, staging.data())) << "an fp32 activation is computed in place";

  ActivationBuffer bf16(*be, DType::kBF16, n);
  EXPECT_EQ(bf16.bytes(), 2u * n);
  EXPECT_EQ(bf16.staging_floats(), n);
  EXPECT_EQ(bf16.f32_or(staging.data()), staging.data());
  auto src = upload(*be, values);
  bf16.store(*be, src.data());
  const float* loaded = bf16.load(*be, staging.data());
  EXPECT_EQ(loaded, staging.data());
  EXPECT_TRUE(bitwise_equal(download(*be, loaded, n), values));
}

// In bf16 mode a layer keeps its activations in bf16: attention and feed-forward layers keep
// exactly half the bytes of fp32 mode. Their scratch grows by the fp32 copies they cast into.
TEST_P(ActivationMemory, Bf16LayersKeepHalfTheBytes) {
  auto be = make_backend(GetParam());
  struct Sizes {
    size_t attention, relu, gated;
    int64_t attention_scratch, relu_scratch, gated_scratch;
  };
  auto sizes = [&](DType dtype) {
    ParamStore ps;
    Attention::register_params(ps, "attn", 6, 2, 3, 1.0);
    FeedForward::register_params(ps, "relu", 1, false, 6, 10, false, 1.0);
    FeedForward::register_params(ps, "gated", 1, false, 6, 10, true, 1.0);
    ps.allocate(*be);
    ps.set_compute_dtype(*be, dtype);
    const Attention attn(*be, ps, "attn", {2, 5, 7, 6, 2, 3, false});
    const FeedForward relu(*be, ps, "relu", 1, 9, 6, 10, false);
    const FeedForward gated(*be, ps, "gated", 1, 9, 6, 10, true);
    return Sizes{attn.activation_bytes(), relu.activation_bytes(), gated.activation_bytes(),
                 attn.scratch_floats(), relu.scratch_floats(), gated.scratch_floats()};
  };
  const Sizes f32 = sizes(DType::kF32), bf16 = sizes(DType::kBF16);
  EXPECT_EQ(2 * bf16.attention, f32.attention);
  EXPECT_EQ(2 * bf16.relu, f32.relu);
  EXPECT_EQ(2 * bf16.gated, f32.gated);
  EXPECT_EQ(bf16.attention_scratch, f32.attention_scratch + 2 * 2 * 5 * 7);  // + probs [B,H,Tq,Tk]
  EXPECT_EQ(bf16.relu_scratch, f32.relu_scratch + 9 * 10);                    // + a [N,F]
  EXPECT_EQ(bf16.gated_scratch, f32.gated_scratch + 3 * 9 * 10);              // + a, b, da
}

// The model in bf16 mode keeps little more than half the activation bytes of fp32 mode for
// backward (the router, norm statistics, logits and loss stay fp32), and trains (forward and
// backward run). The workspace of a pass (scratch, gradients) is fp32 and grows a little.
TEST_P(ActivationMemory, Bf16ModelHoldsLittleMoreThanHalfTheBytes) {
  auto be = make_backend(GetParam());
  ModelConfig m;  // configs/tiny-synthetic.yaml's model
  m.vocab_size = 128;
  m.d_model = 64;
  m.d_ff = 128;
  m.d_kv = 16;
  m.num_heads = 4;
  m.num_layers = 2;
  m.num_decoder_layers = 2;
  m.num_experts = 4;
  m.encoder_sparse_step = 2;
  m.decoder_sparse_step = 2;
  m.group_size = 0;
  const ModelShape shape{16, 12, 12};
  SwitchT5Model f32(*be, m, shape, {}, DType::kF32);
  SwitchT5Model bf16(*be, m, shape, {}, DType::kBF16);
  EXPECT_EQ(bf16.params().compute_dtype(), DType::kBF16);
  const double ratio = double(bf16.kept_activation_bytes()) / double(f32.kept_activation_bytes());
  std::printf("kept activation bytes: fp32 %zu, bf16 %zu (%.3f); with the workspace: fp32 %zu, "
              "bf16 %zu\n", f32.kept_activation_bytes(), bf16.kept_activation_bytes(), ratio,
              f32.activation_bytes(), bf16.activation_bytes());
  EXPECT_LT(ratio, 0.6);
  EXPECT_GT(ratio, 0.5);

  Batch batch;
  batch.resize(shape.batch, shape.inputs_length, shape.targets_length);
  for (size_t i = 0; i < batch.labels.size(); ++i) {
    batch.encoder_input_tokens[i] = int32_t(i % 120) + 3;
    batch.encoder_mask[i] = 1;
    batch.decoder_input_tokens[i] = int32_t(i % 110) + 1;
    batch.decoder_mask[i] = 1;
    batch.labels[i] = int32_t(i % 100) + 2;
  }
  bf16.params().initialize(*be, 5);
  const ForwardStats st = bf16.forward(batch, /*training=*/true, 9);
  EXPECT_TRUE(std::isfinite(st.ce_sum));
  bf16.backward(LossWeights{1.0 / double(batch.target_tokens()), 0.0, 1.0});
  const double g2 = be->sum_squares(bf16.params().grads(), bf16.params().total_numel());
  EXPECT_TRUE(std::isfinite(g2));
  EXPECT_GT(g2, 0.0);
}

INSTANTIATE_TEST_SUITE_P(Backends, ActivationMemory, ::testing::Values("reference", "cpu"),
                         [](const auto& info) { return std::string(info.param); });

}  // namespace
}  // namespace switcht5
