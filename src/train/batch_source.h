// Where the trainer's batches come from: this rank's rows of consecutive global batches, from
// token shards (DataLoader, T5 span corruption) or from the synthetic task. A source's position
// is a small string that restore() takes back, for exact resume.
#pragma once
#include <memory>
#include <string>

#include "config/config.h"
#include "model/batch.h"

namespace switcht5 {

class BatchSource {
 public:
  virtual ~BatchSource() = default;
  // This rank's rows of the next global batch (train.batch_size / ranks sequences).
  virtual void next(Batch& local) = 0;
  // Position after the last batch returned by next().
  virtual std::string state() const = 0;
  virtual void restore(const std::string& state) = 0;
  // Back to the first batch (validation sources are read from the start at every evaluation).
  virtual void rewind() = 0;
};

// Training batches per cfg.data (source: shards or synthetic).
std::unique_ptr<BatchSource> make_train_source(const RunConfig& cfg, int rank, int ranks);
// Validation batches, or null when the config has no validation data.
std::unique_ptr<BatchSource> make_validation_source(const RunConfig& cfg, int rank, int ranks);

}  // namespace switcht5
