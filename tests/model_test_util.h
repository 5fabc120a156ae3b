// Whole-model test inputs shared by the backend comparisons (test_model_backends.cpp: CPU vs
// reference; test_cuda_model.cpp: CUDA vs CPU): one small Switch-T5 and a padded batch.
#pragma once
#include <cstdint>
#include <string>

#include "config/config.h"
#include "core/rng.h"
#include "model/batch.h"

namespace switcht5::testing {

// A Switch-T5 small enough for every gradient to be compared: 3 encoder and 2 decoder blocks,
// 3 heads of 4, 4 experts every `sparse_step` blocks (0: dense), vocabulary 40. Dropout, expert
// dropout and router jitter are on: their masks come from core/rng.h, the same bits on every
// backend.
inline ModelConfig tiny_model_config(int sparse_step, const std::string& ffn, bool tied) {
  ModelConfig m;
  m.vocab_size = 40;
  m.d_model = 16;
  m.d_ff = 24;
  m.d_kv = 4;
  m.num_heads = 3;
  m.num_layers = 3;
  m.num_decoder_layers = 2;
  m.num_experts = 4;
  m.encoder_sparse_step = sparse_step;
  m.decoder_sparse_step = sparse_step;
  m.relative_attention_num_buckets = 8;
  m.relative_attention_max_distance = 20;
  m.feed_forward_proj = ffn;
  m.tie_word_embeddings = tied;
  m.dropout_rate = 0.1;
  m.expert_dropout = 0.2;
  m.router_jitter_noise = 0.01;
  m.group_size = 0;
  return m;
}

// B sequences of Ti input and Tt target tokens (ids < 40): row b keeps Ti - pad_per_row * b
// input tokens (the rest padding) and ignores its last b labels.
inline Batch padded_batch(int B, int Ti, int Tt, int pad_per_row, uint64_t seed = 17) {
  Batch batch;
  batch.resize(B, Ti, Tt);
  CounterRng rng(seed);
  for (int b = 0; b < B; ++b) {
    const int len = Ti - pad_per_row * b;
    for (int i = 0; i < len; ++i) {
      batch.encoder_input_tokens[b * Ti + i] = 3 + int(rng.next_below(37));
      batch.encoder_mask[b * Ti + i] = 1;
    }
    for (int i = 0; i < Tt; ++i) {
      batch.decoder_input_tokens[b * Tt + i] = int(rng.next_below(40));
      batch.decoder_mask[b * Tt + i] = 1;
      batch.labels[b * Tt + i] = i < Tt - b ? int(rng.next_below(40)) : kIgnoreLabel;
    }
  }
  return batch;
}

}  // namespace switcht5::testing
