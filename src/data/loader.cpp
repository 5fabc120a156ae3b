#include "data/loader.h"

#include <algorithm>
#include <filesystem>
#include <list>
#include <map>
#include <sstream>

#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {

namespace {

// Tags that keep the loader's random streams apart.
constexpr uint64_t kShardOrderTag = 0x5A4D0001, kDocOrderTag = 0x5A4D0002,
                   kWindowTag = 0x5A4D0003, kSpanTag = 0x5A4D0004;

// Fisher-Yates permutation of [0, n) from a counter-based RNG.
std::vector<uint32_t> permutation(uint64_t n, uint64_t seed) {
  std::vector<uint32_t> p(n);
  for (uint64_t i = 0; i < n; ++i) p[i] = uint32_t(i);
  CounterRng rng(seed);
  for (uint64_t i = n; i > 1; --i) std::swap(p[i - 1], p[rng.next_below(i)]);
  return p;
}

uint64_t hash_combine(uint64_t h, uint64_t v) { return mix64(h ^ mix64(v)); }

uint64_t hash_string(uint64_t h, const std::string& s) {
  for (unsigned char c : s) h = hash_combine(h, c);
  return hash_combine(h, s.size());
}

}  // namespace

// ---- state ------------------------------------------------------------------------------------

std::string LoaderState::to_string() const {
  return fmt::format("next_example={} fingerprint={:016x}", next_example, fingerprint);
}

LoaderState LoaderState::from_string(const std::string& text) {
  LoaderState s;
  unsigned long long ex = 0, fp = 0;
  char extra = 0;
  SWT_USER_CHECK(std::sscanf(text.c_str(), "next_example=%llu fingerprint=%llx %c", &ex, &fp,
                             &extra) == 2,
                 "data loader state \"{}\": expected \"next_example=N fingerprint=HEX\"", text);
  s.next_example = ex;
  s.fingerprint = fp;
  return s;
}

// ---- the epoch's layout -------------------------------------------------------------------------

// Layout of one epoch: shard order, where each shard starts in the epoch's token stream, and
// (lazily, a few shards at a time) each shard's document order with its prefix sums.
struct DataLoader::EpochCache {
  uint64_t epoch = ~uint64_t(0);
  std::vector<int> shard_order;          // epoch position -> shard index
  std::vector<uint64_t> shard_start;     // epoch position -> first token in the epoch stream
  struct DocOrder {
    std::vector<uint32_t> docs;          // order position -> document
    std::vector<uint64_t> start;         // order position -> first token within the shard order
    std::vector<uint64_t> offsets;       // document -> first token in the shard (its offsets table)
  };
  std::map<int, DocOrder> doc_orders;    // shard index -> order (at most kMaxShards kept)
  std::list<int> doc_lru;
  std::map<uint64_t, std::vector<uint32_t>> windows;  // window index -> permutation
  static constexpr size_t kMaxShards = 4, kMaxWindows = 4;
};

DataLoader::DataLoader(LoaderOptions options) : options_(std::move(options)) {
  const LoaderOptions& o = options_;
  SWT_USER_CHECK(!o.shards.empty(), "{}: no token shards", o.what);
  SWT_USER_CHECK(o.ranks >= 1 && o.rank >= 0 && o.rank < o.ranks && o.global_batch % o.ranks == 0,
                 "data loader: global batch {} cannot be split over {} data-parallel ranks",
                 o.global_batch, o.ranks);
  std::sort(options_.shards.begin(), options_.shards.end());
  uint64_t vocab = 0;
  fingerprint_ = hash_combine(0x10ADE5, o.seed);
  for (const std::string& path : options_.shards) {
    shards_.push_back(std::make_unique<ShardReader>(path, o.verify_checksums));
    const ShardHeader& h = shards_.back()->header();
    SWT_USER_CHECK(vocab == 0 || h.vocab_size == vocab,
                   "{}: vocabulary size {} differs from {} in {} (shards from different "
                   "SentencePiece models)",
                   path, h.vocab_size, vocab, options_.shards.front());
    vocab = h.vocab_size;
    total_tokens_ += h.num_tokens;
    fingerprint_ = hash_string(fingerprint_, std::filesystem::path(path).filename().string());
    fingerprint_ = hash_combine(hash_combine(fingerprint_, h.num_tokens), h.checksum);
  }
  // Sentinels: <extra_id_0> = vocab + extra_ids - 1 (32099 for T5's 32,000 pieces + 100).
  options_.span.first_sentinel = int32_t(vocab + o.extra_ids - 1);
  SWT_USER_CHECK(options_.span.first_sentinel < o.model_vocab_size,
                 "model.vocab_size: got {}, expected more than {} (the shards' {} SentencePiece "
                 "ids + data.extra_ids = {} sentinels)",
                 o.model_vocab_size, options_.span.first_sentinel, vocab, o.extra_ids);
  piece_length_ = span_corruption_piece_length(o.inputs_length, o.targets_length, options_.span);
  pieces_per_epoch_ = total_tokens_ / uint64_t(piece_length_);
  SWT_USER_CHECK(pieces_per_epoch_ >= 1,
                 "{}: {} tokens in {} shards, fewer than one piece of {} tokens", o.what,
                 total_tokens_, shards_.size(), piece_length_);
  for (uint64_t v : {uint64_t(piece_length_), uint64_t(o.inputs_length),
                     uint64_t(o.targets_length), uint64_t(o.shuffle), uint64_t(o.shuffle_window),
                     uint64_t(o.extra_ids)})
    fingerprint_ = hash_combine(fingerprint_, v);
  fingerprint_ = hash_combine(hash_combine(fingerprint_, uint64_t(o.span.noise_density * 1e9)),
                              uint64_t(o.span.mean_noise_span_length * 1e9));
  local_rows_ = o.global_batch / o.ranks;
  cache_ = std::make_unique<EpochCache>();
  start_thread();
}

DataLoader::~DataLoader() { stop_thread(); }

uint64_t DataLoader::piece_of(uint64_t epoch, uint64_t position) const {
  if (!options_.shuffle) return position;
  // Called with cache_mutex_ held and the cache on `epoch`.
  const uint64_t W = uint64_t(options_.shuffle_window);
  const uint64_t w = position / W;
  const uint64_t size = std::min(W, pieces_per_epoch_ - w * W);
  EpochCache& c = *cache_;
  auto it = c.windows.find(w);
  if (it == c.windows.end()) {
    if (c.windows.size() >= EpochCache::kMaxWindows) c.windows.erase(c.windows.begin());
    const uint64_t seed = derive_seed(derive_seed(derive_seed(options_.seed, kWindowTag), epoch), w);
    it = c.windows.emplace(w, permutation(size, seed)).first;
  }
  return w * W + it->second[position - w * W];
}

std::vector<DataLoader::Segment> DataLoader::piece_segments(uint64_t example) const {
  std::vector<Segment> out;
  locate(example, out);
  return out;
}

uint64_t DataLoader::locate(uint64_t example, std::vector<Segment>& out) const {
  std::lock_guard<std::mutex> lock(cache_mutex_);
  const uint64_t epoch = example / pieces_per_epoch_;
  EpochCache& c = *cache_;
  if (c.epoch != epoch) {
    c.epoch = epoch;
    c.doc_orders.clear();
    c.doc_lru.clear();
    c.windows.clear();
    const int S = int(shards_.size());
    c.shard_order.resize(S);
    if (options_.shuffle) {
      auto p = permutation(S, derive_seed(derive_seed(options_.seed, kShardOrderTag), epoch));
      for (int i = 0; i < S; ++i) c.shard_order[i] = int(p[i]);
    } else {
      for (int i = 0; i < S; ++i) c.shard_order[i] = i;
    }
    c.shard_start.assign(S + 1, 0);
    for (int i = 0; i < S; ++i)
      c.shard_start[i + 1] = c.shard_start[i] + shards_[c.shard_order[i]]->num_tokens();
  }
  const uint64_t piece = piece_of(epoch, example % pieces_per_epoch_);
  auto doc_order = [&](int shard) -> const EpochCache::DocOrder& {
    auto it = c.doc_orders.find(shard);
    if (it != c.doc_orders.end()) return it->second;
    if (c.doc_orders.size() >= EpochCache::kMaxShards) {
      c.doc_orders.erase(c.doc_lru.front());
      c.doc_lru.pop_front();
    }
    const ShardReader& r = *shards_[shard];
    EpochCache::DocOrder o;
    const uint64_t D = r.num_documents();
    if (options_.shuffle) {
      o.docs = permutation(D, derive_seed(derive_seed(derive_seed(options_.seed, kDocOrderTag),
                                                      epoch), uint64_t(shard)));
    } else {
      o.docs.resize(D);
      for (uint64_t d = 0; d < D; ++d) o.docs[d] = uint32_t(d);
    }
    o.offsets = r.read_offsets();  // one read of the table; the reader keeps none in memory
    o.start.assign(D + 1, 0);
    for (uint64_t q = 0; q < D; ++q)
      o.start[q + 1] = o.start[q] + o.offsets[o.docs[q] + 1] - o.offsets[o.docs[q]];
    c.doc_lru.push_back(shard);
    return c.doc_orders.emplace(shard, std::move(o)).first->second;
  };

  // Walk the epoch stream from token piece * L for L tokens.
  out.clear();
  uint64_t pos = piece * uint64_t(piece_length_), left = uint64_t(piece_length_);
  int si = int(std::upper_bound(c.shard_start.begin(), c.shard_start.end(), pos) -
               c.shard_start.begin()) - 1;
  while (left > 0) {
    SWT_CHECK(si < int(shards_.size()), "piece {} runs past the epoch's tokens", piece);
    const int shard = c.shard_order[si];
    const EpochCache::DocOrder& o = doc_order(shard);
    uint64_t local = pos - c.shard_start[si];
    size_t q = size_t(std::upper_bound(o.start.begin(), o.start.end(), local) - o.start.begin()) - 1;
    while (left > 0 && q < o.docs.size()) {
      const uint32_t d = o.docs[q];
      const uint64_t off = local - o.start[q];
      const uint64_t n = std::min(left, o.offsets[d + 1] - o.offsets[d] - off);
      if (n > 0) out.push_back({shard, o.offsets[d] + off, n});
      left -= n;
      pos += n;
      local += n;
      ++q;
    }
    ++si;
  }
  return piece;
}

void DataLoader::make_example(uint64_t example, Batch& out, int row, std::vector<int32_t>& raw,
                              std::vector<int32_t>& inputs, std::vector<int32_t>& targets,
                              std::vector<bool>& shards_read) const {
  raw.resize(piece_length_);
  std::vector<Segment>& segments = segments_scratch_;
  const uint64_t piece = locate(example, segments);
  size_t filled = 0;
  for (const Segment& s : segments) {
    shards_[s.shard]->copy_tokens(s.begin, s.length, raw.data() + filled);
    shards_read[size_t(s.shard)] = true;
    filled += s.length;
  }
  const uint64_t epoch = example / pieces_per_epoch_;
  const uint64_t seed = derive_seed(derive_seed(derive_seed(options_.seed, kSpanTag), epoch), piece);
  span_corrupt(raw.data(), piece_length_, options_.span, seed, inputs, targets);
  const int Ti = options_.inputs_length, Tt = options_.targets_length;
  SWT_CHECK(int(inputs.size()) <= Ti && int(targets.size()) <= Tt,
            "span corruption gave {} inputs / {} targets for lengths {} / {}", inputs.size(),
            targets.size(), Ti, Tt);
  out.set_row(row, inputs, targets, options_.pad_id, options_.decoder_start_id);
}

void DataLoader::produce(uint64_t first_example, Batch& out) const {
  out.resize(local_rows_, options_.inputs_length, options_.targets_length);
  std::vector<int32_t> raw, inputs, targets;
  const uint64_t row0 = first_example + uint64_t(options_.rank) * local_rows_;
  std::vector<bool>& read = shards_read_scratch_;
  read.assign(shards_.size(), false);
  for (int r = 0; r < local_rows_; ++r) make_example(row0 + r, out, r, raw, inputs, targets, read);
  // After the batch's reads: had a shard changed under them (truncated, rewritten), its tokens
  // might be wrong; the batch is not handed out then, the run ends naming the shard.
  for (size_t s = 0; s < shards_.size(); ++s)
    if (read[s]) shards_[s]->check_unchanged();
}

// ---- consumer and prefetch thread -----------------------------------------------------------------

void DataLoader::next(Batch& out) {
  if (options_.prefetch == 0) {
    produce(next_example_, out);
  } else {
    std::unique_lock<std::mutex> lock(mutex_);
    cv_.wait(lock, [&] { return !ready_.empty() || error_; });
    if (ready_.empty() && error_) std::rethrow_exception(error_);
    std::swap(out, ready_.front());
    ready_.pop_front();
    cv_.notify_all();
  }
  next_example_ += uint64_t(options_.global_batch);
}

LoaderState DataLoader::state() const { return LoaderState{next_example_, fingerprint_}; }

void DataLoader::restore(const LoaderState& state) {
  SWT_USER_CHECK(state.fingerprint == fingerprint_,
                 "data loader state {} was saved for other data or options (this loader's "
                 "fingerprint is {:016x}): same shards, lengths, shuffle and seed are needed",
                 state.to_string(), fingerprint_);
  stop_thread();
  next_example_ = state.next_example;
  start_thread();
}

void DataLoader::start_thread() {
  ready_.clear();
  error_ = nullptr;
  stop_ = false;
  produce_next_ = next_example_;
  if (options_.prefetch == 0) return;
  thread_ = std::thread([this] {
    try {
      for (;;) {
        uint64_t first;
        {
          std::unique_lock<std::mutex> lock(mutex_);
          cv_.wait(lock, [&] { return stop_ || int(ready_.size()) < options_.prefetch; });
          if (stop_) return;
          first = produce_next_;
          produce_next_ += uint64_t(options_.global_batch);
        }
        Batch b;
        produce(first, b);
        std::lock_guard<std::mutex> lock(mutex_);
        if (stop_) return;
        ready_.push_back(std::move(b));
        cv_.notify_all();
      }
    } catch (...) {
      std::lock_guard<std::mutex> lock(mutex_);
      error_ = std::current_exception();
      cv_.notify_all();
    }
  });
}

void DataLoader::stop_thread() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stop_ = true;
    cv_.notify_all();
  }
  if (thread_.joinable()) thread_.join();
  ready_.clear();
}

}  // namespace switcht5
