#include "train/batch_source.h"

#include "core/check.h"
#include "data/loader.h"
#include "train/synthetic_data.h"

namespace switcht5 {

namespace {

class SyntheticSource final : public BatchSource {
 public:
  SyntheticSource(const RunConfig& cfg, SyntheticTask::Stream stream, int rank, int ranks)
      : task_(cfg.data, cfg.model, cfg.train.seed), stream_(stream),
        batch_(cfg.train.batch_size), rows_(cfg.train.batch_size / ranks), rank_(rank) {}
  void next(Batch& local) override {
    task_.fill(local, stream_, int64_t(next_) * batch_ + int64_t(rank_) * rows_, rows_);
    ++next_;
  }
  std::string state() const override { return fmt::format("synthetic_batch={}", next_); }
  void restore(const std::string& s) override {
    unsigned long long n = 0;
    SWT_USER_CHECK(std::sscanf(s.c_str(), "synthetic_batch=%llu", &n) == 1,
                   "synthetic data state \"{}\": expected \"synthetic_batch=N\"", s);
    next_ = n;
  }
  void rewind() override { next_ = 0; }

 private:
  SyntheticTask task_;
  SyntheticTask::Stream stream_;
  int batch_, rows_, rank_;
  uint64_t next_ = 0;
};

class ShardSource final : public BatchSource {
 public:
  explicit ShardSource(LoaderOptions o) : loader_(std::move(o)) {}
  void next(Batch& local) override { loader_.next(local); }
  std::string state() const override { return loader_.state().to_string(); }
  void restore(const std::string& s) override { loader_.restore(LoaderState::from_string(s)); }
  void rewind() override {
    LoaderState s = loader_.state();
    s.next_example = 0;
    loader_.restore(s);
  }

 private:
  DataLoader loader_;
};

LoaderOptions loader_options(const RunConfig& cfg, const std::string& glob, const char* what,
                             bool shuffle, int rank, int ranks) {
  LoaderOptions o;
  o.shards = expand_glob(glob, what);
  o.inputs_length = cfg.data.inputs_length;
  o.targets_length = cfg.data.targets_length;
  o.span.noise_density = cfg.data.noise_density;
  o.span.mean_noise_span_length = cfg.data.mean_noise_span_length;
  o.span.eos_id = cfg.model.eos_token_id;
  o.extra_ids = cfg.data.extra_ids;
  o.model_vocab_size = cfg.model.vocab_size;
  o.shuffle = shuffle;
  o.shuffle_window = cfg.data.shuffle_window;
  o.seed = cfg.train.seed;
  o.global_batch = cfg.train.batch_size;
  o.rank = rank;
  o.ranks = ranks;
  o.prefetch = cfg.data.prefetch;
  // Verifying reads every shard whole: data rank 0 does it (its failure ends the job), the
  // other ranks trust the headers instead of all reading the whole corpus at startup.
  o.verify_checksums = cfg.data.verify_checksums && rank == 0;
  o.pad_id = cfg.model.pad_token_id;
  o.decoder_start_id = cfg.model.decoder_start_token_id;
  o.what = what;
  return o;
}

}  // namespace

std::unique_ptr<BatchSource> make_train_source(const RunConfig& cfg, int rank, int ranks) {
  if (cfg.data.source == "synthetic")
    return std::make_unique<SyntheticSource>(cfg, SyntheticTask::Stream::kTrain, rank, ranks);
  return std::make_unique<ShardSource>(
      loader_options(cfg, cfg.data.train_glob, "data.train_glob", true, rank, ranks));
}

std::unique_ptr<BatchSource> make_validation_source(const RunConfig& cfg, int rank, int ranks) {
  if (cfg.data.source == "synthetic")
    return std::make_unique<SyntheticSource>(cfg, SyntheticTask::Stream::kValidation, rank, ranks);
  if (cfg.data.val_glob.empty()) return nullptr;
  LoaderOptions o = loader_options(cfg, cfg.data.val_glob, "data.val_glob", false, rank, ranks);
  o.prefetch = 0;  // read at evaluation time only
  return std::make_unique<ShardSource>(std::move(o));
}

}  // namespace switcht5
