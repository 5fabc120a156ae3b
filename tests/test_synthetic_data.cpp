// Synthetic tasks (src/train/synthetic_data.h): the span_corruption task's batches have the
// shape of T5 pre-training (a full encoder, T5's target length, no padding, sentinels counting
// down from the top of the vocabulary) and are span corruption of random token strings; examples
// are pure functions of (seed, stream, index); bad lengths and vocabularies are user errors
// naming the key. Hand-worked rows of the copy / reverse tasks pin their layout, which the
// golden trajectories also depend on.
#include <gtest/gtest.h>

#include <map>
#include <string>
#include <vector>

#include "config/config.h"
#include "core/check.h"
#include "model/batch.h"
#include "train/synthetic_data.h"

namespace switcht5 {
namespace {

struct TaskConfig {
  DataConfig data;
  ModelConfig model;
};

TaskConfig span_setup(int inputs, int targets) {
  TaskConfig s;
  s.data.source = "synthetic";
  s.data.task = "span_corruption";
  s.data.inputs_length = inputs;
  s.data.targets_length = targets;
  s.model.vocab_size = 32128;
  return s;
}

std::vector<int32_t> row_of(const std::vector<int32_t>& v, int row, int len) {
  return {v.begin() + size_t(row) * len, v.begin() + size_t(row + 1) * len};
}

// T5's shapes: 568 random tokens into exactly 512 inputs and 114 targets, no padding. Sentinels
// are 32127, 32126, ... (the top 100 ids of the 32128-id vocabulary), in the same order in the
// inputs and the targets; content tokens lie in [3, 32028). Putting each target span back in
// place of its sentinel gives 568 content tokens: the batch is span corruption of a string.
TEST(SyntheticSpanCorruption, FullEncoderAndT5TargetsWithoutPadding) {
  const TaskConfig s = span_setup(512, 114);
  SyntheticTask task(s.data, s.model, /*seed=*/5);
  Batch b;
  const int rows = 6;
  task.fill(b, SyntheticTask::Stream::kTrain, 0, rows);
  ASSERT_EQ(b.batch, rows);
  auto is_sentinel = [](int32_t t) { return t >= 32028 && t <= 32127; };
  for (int r = 0; r < rows; ++r) {
    SCOPED_TRACE("row " + std::to_string(r));
    const auto in = row_of(b.encoder_input_tokens, r, 512);
    const auto lab = row_of(b.labels, r, 114);
    const auto dec = row_of(b.decoder_input_tokens, r, 114);
    for (int i = 0; i < 512; ++i) EXPECT_EQ(b.encoder_mask[size_t(r) * 512 + i], 1.0f) << i;
    for (int i = 0; i < 114; ++i) EXPECT_EQ(b.decoder_mask[size_t(r) * 114 + i], 1.0f) << i;
    EXPECT_EQ(in.back(), 1);   // EOS
    EXPECT_EQ(lab.back(), 1);  // EOS
    EXPECT_EQ(dec[0], 0);      // decoder start
    for (int i = 1; i < 114; ++i) EXPECT_EQ(dec[size_t(i)], lab[size_t(i) - 1]);
    std::vector<int32_t> in_sentinels, target_sentinels;
    for (int i = 0; i + 1 < 512; ++i) {
      if (is_sentinel(in[size_t(i)])) in_sentinels.push_back(in[size_t(i)]);
      else EXPECT_TRUE(in[size_t(i)] >= 3 && in[size_t(i)] < 32028) << in[size_t(i)];
    }
    for (int i = 0; i + 1 < 114; ++i)
      if (is_sentinel(lab[size_t(i)])) target_sentinels.push_back(lab[size_t(i)]);
    ASSERT_FALSE(in_sentinels.empty());
    EXPECT_EQ(in_sentinels, target_sentinels);
    for (size_t k = 0; k < in_sentinels.size(); ++k) EXPECT_EQ(in_sentinels[k], 32127 - int(k));
    EXPECT_TRUE(is_sentinel(lab[0]));  // targets start with <extra_id_0>
    // Reassemble: each input sentinel is replaced by its target span.
    std::map<int32_t, std::vector<int32_t>> span;
    int32_t cur = -1;
    for (int i = 0; i + 1 < 114; ++i) {
      if (is_sentinel(lab[size_t(i)])) cur = lab[size_t(i)];
      else span[cur].push_back(lab[size_t(i)]);
    }
    size_t raw = 0;
    for (int i = 0; i + 1 < 512; ++i)
      raw += is_sentinel(in[size_t(i)]) ? span[in[size_t(i)]].size() : 1;
    EXPECT_EQ(raw, 568u);
  }
  // Rows differ (random strings, random masks).
  EXPECT_NE(row_of(b.encoder_input_tokens, 0, 512), row_of(b.encoder_input_tokens, 1, 512));
}

// Example k is the same whichever batch or offset asks for it, and the streams and seeds differ.
TEST(SyntheticSpanCorruption, ExamplesArePureFunctionsOfSeedStreamAndIndex) {
  const TaskConfig s = span_setup(128, 40);
  SyntheticTask task(s.data, s.model, 9);
  Batch whole, one, val, other_seed;
  task.fill(whole, SyntheticTask::Stream::kTrain, 10, 4);
  task.fill(one, SyntheticTask::Stream::kTrain, 12, 1);
  EXPECT_EQ(row_of(whole.encoder_input_tokens, 2, 128), row_of(one.encoder_input_tokens, 0, 128));
  EXPECT_EQ(row_of(whole.labels, 2, 40), row_of(one.labels, 0, 40));
  task.fill(val, SyntheticTask::Stream::kValidation, 12, 1);
  EXPECT_NE(val.encoder_input_tokens, one.encoder_input_tokens);
  SyntheticTask task2(s.data, s.model, 10);
  task2.fill(other_seed, SyntheticTask::Stream::kTrain, 12, 1);
  EXPECT_NE(other_seed.encoder_input_tokens, one.encoder_input_tokens);
  // 128 inputs: T5's helper takes 141 raw tokens (21 noise tokens in 7 spans: 141 - 21 + 7 + 1
  // = 128 inputs; 142 would give 129), whose targets are 21 + 7 + 1 = 29, so target positions
  // 29-39 are padding with no loss.
  EXPECT_EQ(one.labels[28], 1);
  for (int i = 29; i < 40; ++i) {
    EXPECT_EQ(one.labels[size_t(i)], kIgnoreLabel);
    EXPECT_EQ(one.decoder_mask[size_t(i)], 0.0f);
  }
}

// A targets length below T5's for the inputs, or a vocabulary the sentinels fill, is the user's
// error, naming the key.
TEST(SyntheticSpanCorruption, BadLengthsAndVocabulariesNameTheKey) {
  auto message = [](const TaskConfig& s) -> std::string {
    try {
      SyntheticTask task(s.data, s.model, 0);
    } catch (const UserError& e) {
      return e.what();
    }
    return "no error";
  };
  const std::string short_targets = message(span_setup(512, 100));
  EXPECT_NE(short_targets.find("data.targets_length: got 100, expected at least 114"),
            std::string::npos)
      << short_targets;
  TaskConfig small_vocab = span_setup(64, 30);
  small_vocab.data.synthetic_vocab = 50;
  const std::string vocab = message(small_vocab);
  EXPECT_NE(vocab.find("data.extra_ids: got 100"), std::string::npos) << vocab;
  small_vocab.data.extra_ids = 10;  // 50 ids: 0-2 reserved, 37 content tokens, 10 sentinels
  EXPECT_EQ(message(small_vocab), "no error");
}

// The reverse task's row structure for one short example (its token values are pinned by the
// golden trajectories, which train on it). Vocabulary [3, 5): tokens are 3 or 4.
TEST(SyntheticReverse, RowLayout) {
  TaskConfig s;
  s.data.task = "reverse";
  s.data.inputs_length = 8;
  s.data.targets_length = 5;
  s.data.synthetic_vocab = 5;
  SyntheticTask task(s.data, s.model, 3);
  Batch b;
  task.fill(b, SyntheticTask::Stream::kTrain, 0, 1);
  // L = min(8, 5) - 1 = 4, so w has 2-4 tokens; w + EOS, then padding.
  int len = 0;
  while (len < 8 && b.encoder_mask[size_t(len)] == 1.0f) ++len;
  ASSERT_GE(len, 3);
  ASSERT_LE(len, 5);
  EXPECT_EQ(b.encoder_input_tokens[size_t(len) - 1], 1);
  for (int i = len; i < 8; ++i) EXPECT_EQ(b.encoder_input_tokens[size_t(i)], 0);
  // labels = reverse(w) + EOS; decoder inputs = [0] + labels[:-1]; the rest ignored.
  for (int i = 0; i + 1 < len; ++i)
    EXPECT_EQ(b.labels[size_t(i)], b.encoder_input_tokens[size_t(len - 2 - i)]) << i;
  EXPECT_EQ(b.labels[size_t(len) - 1], 1);
  EXPECT_EQ(b.decoder_input_tokens[0], 0);
  for (int i = 1; i < len; ++i)
    EXPECT_EQ(b.decoder_input_tokens[size_t(i)], b.labels[size_t(i) - 1]);
  for (int i = len; i < 5; ++i) {
    EXPECT_EQ(b.labels[size_t(i)], kIgnoreLabel);
    EXPECT_EQ(b.decoder_mask[size_t(i)], 0.0f);
    EXPECT_EQ(b.decoder_input_tokens[size_t(i)], 0);
  }
}

}  // namespace
}  // namespace switcht5
