#include "train/synthetic_data.h"

#include <algorithm>
#include <vector>

#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {

namespace {
constexpr uint64_t kSpanTag = 0x53594E01;  // the span-corruption mask's seed, apart from the words'
}  // namespace

SyntheticTask::SyntheticTask(const DataConfig& data, const ModelConfig& model, uint64_t seed)
    : kind_(data.task == "copy"      ? Kind::kCopy
            : data.task == "reverse" ? Kind::kReverse
                                     : Kind::kSpanCorruption),
      inputs_length_(data.inputs_length), targets_length_(data.targets_length), vocab_lo_(3),
      vocab_hi_(data.synthetic_vocab > 0 ? std::min(data.synthetic_vocab, model.vocab_size)
                                         : model.vocab_size),
      eos_(model.eos_token_id), start_(model.decoder_start_token_id), pad_(model.pad_token_id),
      seed_(seed) {
  SWT_CHECK(data.task == "copy" || data.task == "reverse" || data.task == "span_corruption",
            "unknown synthetic task \"{}\"", data.task);
  // Ids 0..2 are pad, EOS and unk in the T5 vocabulary: content tokens avoid them.
  SWT_USER_CHECK(vocab_hi_ > vocab_lo_ + 1,
                 "data.synthetic_vocab: got {}, expected at least {} (ids 0-2 are reserved)",
                 data.synthetic_vocab, vocab_lo_ + 2);
  if (kind_ == Kind::kSpanCorruption) {
    // The top extra_ids ids below V are the sentinels; content tokens stay below them.
    span_.noise_density = data.noise_density;
    span_.mean_noise_span_length = data.mean_noise_span_length;
    span_.first_sentinel = vocab_hi_ - 1;
    span_.eos_id = eos_;
    SWT_USER_CHECK(vocab_hi_ - data.extra_ids > vocab_lo_ + 1,
                   "data.extra_ids: got {}, expected fewer than {} (the synthetic vocabulary's {} "
                   "ids less ids 0-2 and at least 2 content tokens)",
                   data.extra_ids, vocab_hi_ - vocab_lo_ - 1, vocab_hi_);
    vocab_hi_ -= data.extra_ids;
    raw_length_ = span_corruption_piece_length(inputs_length_, targets_length_, span_);
  }
}

void SyntheticTask::fill(Batch& out, Stream stream, int64_t first, int count) {
  out.resize(count, inputs_length_, targets_length_);
  const int L = std::max(1, std::min(inputs_length_, targets_length_) - 1);
  std::vector<int32_t>& w = words_;
  for (int b = 0; b < count; ++b) {
    const uint64_t example_seed =
        derive_seed(derive_seed(seed_, uint64_t(stream)), uint64_t(first + b));
    CounterRng rng(example_seed);
    const int len = kind_ == Kind::kSpanCorruption
                        ? raw_length_
                        : std::max(1, L / 2) +
                              int(rng.next_below(uint64_t(L - std::max(1, L / 2) + 1)));
    w.resize(size_t(len));
    for (int32_t& t : w) t = vocab_lo_ + int32_t(rng.next_below(uint64_t(vocab_hi_ - vocab_lo_)));
    if (kind_ == Kind::kSpanCorruption) {
      span_corrupt(w.data(), len, span_, derive_seed(example_seed, kSpanTag), inputs_, targets_);
      SWT_CHECK(int(inputs_.size()) <= inputs_length_ && int(targets_.size()) <= targets_length_,
                "span corruption gave {} inputs / {} targets for lengths {} / {}", inputs_.size(),
                targets_.size(), inputs_length_, targets_length_);
    } else {
      inputs_.assign(w.begin(), w.end());
      inputs_.push_back(eos_);
      if (kind_ == Kind::kReverse) std::reverse(w.begin(), w.end());
      targets_.assign(w.begin(), w.end());
      targets_.push_back(eos_);
    }
    out.set_row(b, inputs_, targets_, pad_, start_);
  }
}

}  // namespace switcht5
