// The training data loader: token shards -> fixed-length pieces -> T5 span corruption ->
// encoder/decoder batches, deterministic, layout-independent and exactly resumable.
//
// The example stream (one per epoch e = 0, 1, ...):
//   1. shard order: the shards sorted by path, then a seeded permutation per epoch;
//   2. document order: within each shard, a seeded permutation per (epoch, shard);
//   3. the documents' tokens (each ends with EOS) are concatenated in that order and cut into
//      pieces of L raw tokens (L from random_spans_helper: 568 for inputs of 512); the last
//      partial piece of an epoch is dropped. P = floor(total tokens / L) pieces per epoch;
//   4. piece order: the pieces are shuffled within consecutive windows of `shuffle_window`
//      pieces (a seeded permutation per (epoch, window)): a shuffle buffer whose order is a pure
//      function of the position, so nothing but the position needs saving;
//   5. each piece is span-corrupted with a seed derived from (seed, epoch, piece).
// Global example g is position g % P of epoch g / P. Global batch n is examples
// [n*B, (n+1)*B); data-parallel rank r of D takes rows [r*B/D, (r+1)*B/D) of it and reads only
// the tokens of those pieces. So the ranks read disjoint parts that together cover each epoch
// once, and the global batch is the same set of sequences for any number of ranks.
//
// State: the index of the next global example (plus a fingerprint of the data and options so a
// state cannot be restored into a different stream). Restoring it yields exactly the batches
// that would have come next.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "data/shard.h"
#include "data/span_corruption.h"
#include "model/batch.h"

namespace switcht5 {

struct LoaderOptions {
  std::vector<std::string> shards;   // paths; sorted by the loader
  int inputs_length = 512;
  int targets_length = 114;
  SpanCorruptionOptions span;        // first_sentinel is set by the loader from the shards
  int extra_ids = 100;               // sentinel ids: vocab + extra_ids - 1 counting down
  int model_vocab_size = 32128;      // every id (sentinels included) must be below this
  bool shuffle = true;               // false: file order, document order, piece order
  int shuffle_window = 1024;
  uint64_t seed = 0;
  int global_batch = 8;              // sequences per global batch
  int rank = 0, ranks = 1;           // data-parallel position
  int prefetch = 2;                  // batches prepared ahead on a thread; 0 = inline
  bool verify_checksums = true;
  int32_t pad_id = 0;
  int32_t decoder_start_id = 0;
  std::string what = "data.train_glob";  // config key named in errors
};

struct LoaderState {
  uint64_t next_example = 0;  // global example index of the next batch's first row
  uint64_t fingerprint = 0;   // hash of shards, lengths, options and seed
  std::string to_string() const;
  // Throws UserError on malformed text.
  static LoaderState from_string(const std::string& text);
};

class DataLoader {
 public:
  explicit DataLoader(LoaderOptions options);
  ~DataLoader();
  DataLoader(const DataLoader&) = delete;
  DataLoader& operator=(const DataLoader&) = delete;

  // This rank's rows of the next global batch: out has global_batch / ranks rows.
  void next(Batch& out);
  // State after the last batch returned by next().
  LoaderState state() const;
  // Continues from `state` (made by a loader over the same data and options).
  void restore(const LoaderState& state);

  int piece_length() const { return piece_length_; }
  uint64_t pieces_per_epoch() const { return pieces_per_epoch_; }
  uint64_t total_tokens() const { return total_tokens_; }
  int first_sentinel() const { return options_.span.first_sentinel; }

  // Where the raw tokens of a piece come from, for tests: (shard, first token) runs.
  struct Segment {
    int shard;
    uint64_t begin, length;  // token range within the shard
  };
  std::vector<Segment> piece_segments(uint64_t example) const;

 private:
  struct EpochCache;
  // Fills row `row` of `out` with global example `example`, marking the shards it read.
  void make_example(uint64_t example, Batch& out, int row, std::vector<int32_t>& raw,
                    std::vector<int32_t>& inputs, std::vector<int32_t>& targets,
                    std::vector<bool>& shards_read) const;
  void produce(uint64_t first_example, Batch& out) const;
  uint64_t piece_of(uint64_t epoch, uint64_t position) const;
  // The piece behind global example `example` and its token runs (thread-safe).
  uint64_t locate(uint64_t example, std::vector<Segment>& segments) const;
  void start_thread();
  void stop_thread();

  LoaderOptions options_;
  std::vector<std::unique_ptr<ShardReader>> shards_;
  int piece_length_ = 0;
  uint64_t total_tokens_ = 0;
  uint64_t pieces_per_epoch_ = 0;
  uint64_t fingerprint_ = 0;
  int local_rows_ = 0;
  mutable std::unique_ptr<EpochCache> cache_;
  mutable std::mutex cache_mutex_;
  mutable std::vector<Segment> segments_scratch_;  // used by the producing thread only
  mutable std::vector<bool> shards_read_scratch_;  // likewise: shards read by the batch in production

  // Consumer side.
  uint64_t next_example_ = 0;  // first example of the next batch handed out
  // Prefetch thread: produces batches starting at produce_next_.
  std::thread thread_;
  std::mutex mutex_;
  std::condition_variable cv_;
  std::deque<Batch> ready_;
  uint64_t produce_next_ = 0;
  bool stop_ = false;
  std::exception_ptr error_;
};

}  // namespace switcht5
