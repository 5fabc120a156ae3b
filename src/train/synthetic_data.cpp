#include "train/synthetic_data.h"

#include <algorithm>
#include <vector>

#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {

SyntheticTask::SyntheticTask(const DataConfig& data, const ModelConfig& model, uint64_t seed)
    : reverse_(data.task == "reverse"), inputs_length_(data.inputs_length),
      targets_length_(data.targets_length), vocab_lo_(3),
      vocab_hi_(data.synthetic_vocab > 0 ? std::min(data.synthetic_vocab, model.vocab_size)
                                         : model.vocab_size),
      eos_(model.eos_token_id), start_(model.decoder_start_token_id), seed_(seed) {
  // Ids 0..2 are pad, EOS and unk in the T5 vocabulary: content tokens avoid them.
  SWT_USER_CHECK(vocab_hi_ > vocab_lo_ + 1,
                 "data.synthetic_vocab: got {}, expected at least {} (ids 0-2 are reserved)",
                 data.synthetic_vocab, vocab_lo_ + 2);
}

void SyntheticTask::fill(Batch& out, Stream stream, int64_t first, int count) {
  out.resize(count, inputs_length_, targets_length_);
  const int L = std::max(1, std::min(inputs_length_, targets_length_) - 1);
  std::vector<int32_t>& w = words_;
  for (int b = 0; b < count; ++b) {
    CounterRng rng(derive_seed(derive_seed(seed_, uint64_t(stream)), uint64_t(first + b)));
    const int len = std::max(1, L / 2) + int(rng.next_below(uint64_t(L - std::max(1, L / 2) + 1)));
    w.resize(len);
    for (int32_t& t : w) t = vocab_lo_ + int32_t(rng.next_below(uint64_t(vocab_hi_ - vocab_lo_)));
    const size_t ei = size_t(b) * inputs_length_, di = size_t(b) * targets_length_;
    for (int i = 0; i < len; ++i) {
      out.encoder_input_tokens[ei + i] = w[i];
      out.encoder_mask[ei + i] = 1.0f;
    }
    out.encoder_input_tokens[ei + len] = eos_;
    out.encoder_mask[ei + len] = 1.0f;
    if (reverse_) std::reverse(w.begin(), w.end());
    w.push_back(eos_);
    for (int i = 0; i <= len; ++i) {
      out.labels[di + i] = w[i];
      out.decoder_input_tokens[di + i] = i == 0 ? start_ : w[i - 1];
      out.decoder_mask[di + i] = 1.0f;
    }
  }
}

}  // namespace switcht5
