// One batch of encoder-decoder examples on the host, T5 feature names.
#pragma once
#include <algorithm>
#include <cstdint>
#include <vector>

namespace switcht5 {

inline constexpr int32_t kIgnoreLabel = -100;  // cross-entropy skips these target positions

struct Batch {
  int batch = 0;           // sequences
  int inputs_length = 0;   // encoder length
  int targets_length = 0;  // decoder length
  std::vector<int32_t> encoder_input_tokens;  // [batch, inputs_length], pad = 0
  std::vector<float> encoder_mask;            // [batch, inputs_length], 1 = real token
  std::vector<int32_t> decoder_input_tokens;  // [batch, targets_length], labels shifted right
  std::vector<float> decoder_mask;            // [batch, targets_length]
  std::vector<int32_t> labels;                // [batch, targets_length], kIgnoreLabel = skip

  void resize(int b, int in_len, int tgt_len) {
    batch = b;
    inputs_length = in_len;
    targets_length = tgt_len;
    encoder_input_tokens.assign(size_t(b) * in_len, 0);
    encoder_mask.assign(size_t(b) * in_len, 0.0f);
    decoder_input_tokens.assign(size_t(b) * tgt_len, 0);
    decoder_mask.assign(size_t(b) * tgt_len, 0.0f);
    labels.assign(size_t(b) * tgt_len, kIgnoreLabel);
  }
  // dst = rows [first, first + count) of this batch.
  void slice_rows(int first, int count, Batch& dst) const {
    dst.resize(count, inputs_length, targets_length);
    const size_t ei = size_t(first) * inputs_length, di = size_t(first) * targets_length;
    const size_t en = size_t(count) * inputs_length, dn = size_t(count) * targets_length;
    std::copy_n(encoder_input_tokens.begin() + ei, en, dst.encoder_input_tokens.begin());
    std::copy_n(encoder_mask.begin() + ei, en, dst.encoder_mask.begin());
    std::copy_n(decoder_input_tokens.begin() + di, dn, dst.decoder_input_tokens.begin());
    std::copy_n(decoder_mask.begin() + di, dn, dst.decoder_mask.begin());
    std::copy_n(labels.begin() + di, dn, dst.labels.begin());
  }
  // Writes row `row` (resized already) from one example's token strings, EOS included:
  //   encoder_input_tokens = inputs + pad            decoder_input_tokens = [start] + targets[:-1]
  //   labels = targets + [kIgnoreLabel ...]           masks mark the real tokens
  // Requires inputs.size() <= inputs_length and targets.size() <= targets_length (the caller
  // checks; the loader and the synthetic tasks do so with their own messages).
  void set_row(int row, const std::vector<int32_t>& inputs, const std::vector<int32_t>& targets,
               int32_t pad_id, int32_t decoder_start_id) {
    const size_t ei = size_t(row) * inputs_length, di = size_t(row) * targets_length;
    for (int i = 0; i < inputs_length; ++i) {
      const bool real = i < int(inputs.size());
      encoder_input_tokens[ei + i] = real ? inputs[size_t(i)] : pad_id;
      encoder_mask[ei + i] = real ? 1.0f : 0.0f;
    }
    for (int i = 0; i < targets_length; ++i) {
      const bool real = i < int(targets.size());
      labels[di + i] = real ? targets[size_t(i)] : kIgnoreLabel;
      decoder_input_tokens[di + i] =
          i == 0 ? decoder_start_id : (real ? targets[size_t(i) - 1] : pad_id);
      decoder_mask[di + i] = real ? 1.0f : 0.0f;
    }
  }
  int64_t target_tokens() const {
    int64_t n = 0;
    for (int32_t l : labels) n += (l != kIgnoreLabel);
    return n;
  }
};

}  // namespace switcht5
