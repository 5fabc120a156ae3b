// The training data loader over token shards written here with ShardWriter: ranks read disjoint
// pieces that together cover each epoch, the global batch does not depend on the number of
// ranks, restoring a state continues exactly, prefetching changes nothing, and bad setups give
// clear errors.
#include <algorithm>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "core/check.h"
#include "core/rng.h"
#include "data/loader.h"
#include "data/shard.h"

namespace switcht5 {
namespace {

namespace fs = std::filesystem;

constexpr int kVocab = 1000;  // SentencePiece-like ids; sentinels from 1000 + 100 - 1 down

// Writes `num_shards` shards of random documents (lengths 1..200, each ending with EOS = 1) and
// returns their paths.
std::vector<std::string> make_corpus(const std::string& name, int num_shards, int docs_per_shard,
                                     uint64_t vocab = kVocab) {
  const fs::path dir = fs::temp_directory_path() / ("switcht5_loader_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  std::vector<std::string> paths;
  CounterRng rng(std::hash<std::string>{}(name));
  for (int s = 0; s < num_shards; ++s) {
    const std::string path = (dir / fmt::format("part-{:03d}.shard", s)).string();
    ShardWriter w(path, vocab);
    for (int d = 0; d < docs_per_shard; ++d) {
      std::vector<int32_t> doc(1 + rng.next_below(200));
      for (auto& t : doc) t = 3 + int32_t(rng.next_below(vocab - 3));
      doc.back() = 1;
      w.add_document(doc);
    }
    w.finish();
    paths.push_back(path);
  }
  return paths;
}

LoaderOptions options(const std::vector<std::string>& shards, int batch, int rank = 0,
                      int ranks = 1) {
  LoaderOptions o;
  o.shards = shards;
  o.inputs_length = 64;
  o.targets_length = 20;
  o.model_vocab_size = 1128;
  o.shuffle_window = 16;
  o.seed = 7;
  o.global_batch = batch;
  o.rank = rank;
  o.ranks = ranks;
  o.prefetch = 2;
  return o;
}

bool same(const Batch& a, const Batch& b) {
  return a.encoder_input_tokens == b.encoder_input_tokens && a.encoder_mask == b.encoder_mask &&
         a.decoder_input_tokens == b.decoder_input_tokens && a.decoder_mask == b.decoder_mask &&
         a.labels == b.labels;
}

TEST(Loader, BatchesAreSpanCorruptedPieces) {
  DataLoader loader(options(make_corpus("shape", 2, 50), 4));
  // random_spans_helper(64): 70 raw tokens -> 64 inputs, 10 noise tokens in 4 spans... the
  // exact numbers come from span_corruption; here the batch must respect the lengths.
  EXPECT_GT(loader.piece_length(), 64);
  EXPECT_EQ(loader.first_sentinel(), kVocab + 100 - 1);
  Batch b;
  loader.next(b);
  ASSERT_EQ(b.batch, 4);
  for (int r = 0; r < 4; ++r) {
    // A full piece fills the encoder exactly and ends with EOS.
    EXPECT_EQ(b.encoder_input_tokens[r * 64 + 63], 1);
    EXPECT_EQ(b.encoder_mask[r * 64 + 63], 1.0f);
    // The first target is the first sentinel, decoder inputs are labels shifted right.
    EXPECT_EQ(b.labels[r * 20], loader.first_sentinel());
    EXPECT_EQ(b.decoder_input_tokens[r * 20], 0);
    for (int i = 1; i < 20; ++i) {
      if (b.labels[r * 20 + i] != kIgnoreLabel) {
        EXPECT_EQ(b.decoder_input_tokens[r * 20 + i], b.labels[r * 20 + i - 1]);
      }
    }
  }
}

// Every example of an epoch is read by exactly one rank, and the pieces tile the epoch's tokens.
TEST(Loader, RanksAreDisjointAndCoverEachEpoch) {
  const auto shards = make_corpus("cover", 3, 40);
  uint64_t shard_tokens = 0;
  for (const auto& p : shards) shard_tokens += ShardReader(p).num_tokens();
  for (int ranks : {1, 2, 4}) {
    const int batch = 8;
    std::vector<std::unique_ptr<DataLoader>> loaders;
    for (int r = 0; r < ranks; ++r)
      loaders.push_back(std::make_unique<DataLoader>(options(shards, batch, r, ranks)));
    const uint64_t P = loaders[0]->pieces_per_epoch();
    const int L = loaders[0]->piece_length();
    EXPECT_EQ(P, shard_tokens / L);
    // Token coverage of epoch 0 by all ranks' pieces: each (shard, token) at most once.
    std::map<std::pair<int, uint64_t>, int> seen;
    uint64_t covered = 0;
    for (uint64_t first = 0; first + batch <= P; first += batch)
      for (int r = 0; r < ranks; ++r)
        for (int row = 0; row < batch / ranks; ++row) {
          const uint64_t example = first + uint64_t(r) * (batch / ranks) + row;
          for (const auto& s : loaders[r]->piece_segments(example))
            for (uint64_t t = s.begin; t < s.begin + s.length; ++t) {
              const int times = ++seen[std::make_pair(s.shard, t)];
              EXPECT_EQ(times, 1) << "token read twice, ranks=" << ranks;
              ++covered;
            }
        }
    // Full batches cover all but the last partial batch and the tail shorter than a piece.
    EXPECT_EQ(covered, (P / batch) * batch * uint64_t(L));
    EXPECT_GE(covered + uint64_t(batch) * L + L, shard_tokens);
  }
}

// The global batch is the same sequences whatever the number of ranks.
TEST(Loader, GlobalBatchIndependentOfRanks) {
  const auto shards = make_corpus("layout", 2, 60);
  DataLoader one(options(shards, 8));
  std::vector<std::unique_ptr<DataLoader>> four;
  for (int r = 0; r < 4; ++r) four.push_back(std::make_unique<DataLoader>(options(shards, 8, r, 4)));
  for (int step = 0; step < 5; ++step) {
    Batch whole, part, expect;
    one.next(whole);
    for (int r = 0; r < 4; ++r) {
      four[r]->next(part);
      whole.slice_rows(r * 2, 2, expect);
      EXPECT_TRUE(same(part, expect)) << "step " << step << " rank " << r;
    }
  }
}

TEST(Loader, RestoreContinuesExactlyAndPrefetchChangesNothing) {
  const auto shards = make_corpus("resume", 2, 30);
  auto o = options(shards, 4);
  DataLoader a(o);
  Batch b;
  // Run past an epoch boundary so the state crosses epochs too.
  const uint64_t steps_per_epoch = a.pieces_per_epoch() / 4 + 1;
  for (uint64_t i = 0; i < steps_per_epoch; ++i) a.next(b);
  const LoaderState state = a.state();
  EXPECT_EQ(state.next_example, steps_per_epoch * 4);
  std::vector<Batch> expected(6);
  for (auto& e : expected) a.next(e);

  for (int prefetch : {0, 3}) {
    o.prefetch = prefetch;
    DataLoader fresh(o);
    fresh.restore(LoaderState::from_string(state.to_string()));
    for (size_t i = 0; i < expected.size(); ++i) {
      fresh.next(b);
      EXPECT_TRUE(same(b, expected[i])) << "batch " << i << " prefetch " << prefetch;
    }
  }
}

TEST(Loader, EpochsAndSeedsShuffleDifferently) {
  const auto shards = make_corpus("shuffle", 2, 40);
  auto o = options(shards, 4);
  DataLoader a(o);
  const uint64_t P = a.pieces_per_epoch();
  // Position 0 of epoch 0 and of epoch 1 come from different pieces (the orders differ).
  std::vector<uint64_t> e0, e1;
  for (uint64_t j = 0; j < std::min<uint64_t>(P, 16); ++j) {
    e0.push_back(a.piece_segments(j).front().begin * 1000 + a.piece_segments(j).front().shard);
    e1.push_back(a.piece_segments(P + j).front().begin * 1000 + a.piece_segments(P + j).front().shard);
  }
  EXPECT_NE(e0, e1);
  o.seed = 8;
  DataLoader c(o);
  Batch ba, bc;
  DataLoader a2(options(shards, 4));
  a2.next(ba);
  c.next(bc);
  EXPECT_FALSE(same(ba, bc));
  // Without shuffling, example k is piece k: consecutive tokens of the first shard.
  o.shuffle = false;
  DataLoader plain(o);
  const int L = plain.piece_length();
  auto s0 = plain.piece_segments(0), s1 = plain.piece_segments(1);
  EXPECT_EQ(s0.front().shard, 0);
  EXPECT_EQ(s0.front().begin, 0u);
  EXPECT_EQ(s1.front().begin, uint64_t(L));
}

TEST(Loader, RestoreRejectsAStateOfOtherData) {
  DataLoader a(options(make_corpus("fp_a", 1, 40), 4));
  DataLoader b(options(make_corpus("fp_b", 1, 41), 4));
  try {
    b.restore(a.state());
    FAIL() << "restore accepted another dataset's state";
  } catch (const UserError& e) {
    EXPECT_NE(std::string(e.what()).find("other data"), std::string::npos) << e.what();
  }
  EXPECT_THROW(LoaderState::from_string("garbage"), UserError);
}

TEST(Loader, BadSetupsGiveClearErrors) {
  auto expect_error = [](const LoaderOptions& o, const std::string& part) {
    try {
      DataLoader l(o);
      ADD_FAILURE() << "no error, expected one containing: " << part;
    } catch (const UserError& e) {
      EXPECT_NE(std::string(e.what()).find(part), std::string::npos) << e.what();
    }
  };
  const auto shards = make_corpus("bad", 1, 30);
  auto o = options(shards, 4);
  o.targets_length = 5;
  expect_error(o, "data.targets_length");
  o = options(shards, 4);
  o.model_vocab_size = 1050;  // sentinels need ids up to 1099
  expect_error(o, "model.vocab_size");
  o = options(make_corpus("tiny", 1, 0), 4);
  expect_error(o, "fewer than one piece");
  auto mixed = shards;
  mixed.push_back(make_corpus("othervocab", 1, 5, 2000).front());
  expect_error(options(mixed, 4), "vocabulary size");
  o = options(shards, 6, 0, 4);
  expect_error(o, "cannot be split");
}

// A shard truncated under a running loader: the prefetch thread's error reaches next() on the
// consuming thread as the UserError naming the shard, and the loader shuts down cleanly.
TEST(Loader, ShardTruncatedWhileLoadingIsAnErrorNamingIt) {
  for (int prefetch : {0, 2}) {
    const auto shards = make_corpus("truncated_" + std::to_string(prefetch), 2, 50);
    auto o = options(shards, 4);
    o.prefetch = prefetch;
    DataLoader loader(o);
    Batch b;
    loader.next(b);
    fs::resize_file(shards[1], fs::file_size(shards[1]) / 2);
    fs::resize_file(shards[0], fs::file_size(shards[0]) / 2);
    try {
      // Batches made before the cut may still come; within an epoch every shard is read.
      for (uint64_t i = 0; i <= loader.pieces_per_epoch(); ++i) loader.next(b);
      ADD_FAILURE() << "prefetch " << prefetch << ": no error after the shards were cut";
    } catch (const UserError& e) {
      const std::string m = e.what();
      EXPECT_NE(m.find("the token shard changed while in use (truncated to"), std::string::npos) << m;
      EXPECT_TRUE(m.find(shards[0]) == 0 || m.find(shards[1]) == 0) << m;
    }
  }
}

}  // namespace
}  // namespace switcht5
