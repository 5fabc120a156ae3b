// TensorBoard event files written by the trainer itself: the TFRecord framing and a hand-encoded
// tensorflow.Event protobuf, so neither TensorFlow nor protobuf is a dependency.
//
// An event file is a sequence of records (tensorflow/core/lib/io/record_writer.cc):
//   uint64 length | uint32 masked_crc32c(length's 8 bytes) | data[length] | uint32 masked_crc32c(data)
// all little-endian, with masked(crc) = ((crc >> 15) | (crc << 17)) + 0xa282ead8.
// Each record's data is one tensorflow.Event (tensorflow/core/util/event.proto):
//   double wall_time = 1; int64 step = 2;
//   oneof what { string file_version = 3; Summary summary = 5; SessionLog session_log = 7; ... }
// Summary (tensorflow/core/framework/summary.proto): repeated Value value = 1, where
//   Value { string tag = 1; oneof value { float simple_value = 2; ... } }
// SessionLog { SessionStatus status = 1; } with START = 1.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "comm/process_grid.h"
#include "train/metrics.h"

namespace switcht5 {

// CRC-32C (Castagnoli, reflected polynomial 0x82f63b78): crc32c("123456789") == 0xe3069283.
uint32_t crc32c(std::string_view data);
// The TFRecord form of a CRC, stored so that a CRC over data holding CRCs stays well behaved.
uint32_t masked_crc32c(std::string_view data);
// One framed record holding `data`.
std::string tfrecord(std::string_view data);

// The encoded tensorflow.Event messages the writer emits.
std::string file_version_event(double wall_time);                  // file_version "brain.Event:2"
std::string session_start_event(double wall_time, int64_t step);    // SessionLog START at `step`
struct Scalar {
  std::string tag;
  double value;  // stored as float (simple_value)
};
std::string summary_event(double wall_time, int64_t step, const std::vector<Scalar>& scalars);

// Every scalar of a logged step, in a fixed order; the one list of TensorBoard tags:
//   train/{loss,aux_loss,z_loss,lr,grad_norm,tokens_per_s,dropped_fraction,step_ms,skipped}
//   val/loss                                      (steps with a validation loss)
//   routing/<layer>/{aux_loss,z_loss,dropped_fraction,expert_<e>_fraction}
// train/skipped is 1 on a step whose update was skipped (non-finite loss or gradient), else 0.
// <e> is zero-padded to the width of the largest expert index (expert_007 of 128 experts), so
// TensorBoard's alphabetical tag order is the experts' order. Non-finite values are included
// here; the writer leaves them out.
std::vector<Scalar> step_scalars(const StepMetrics& m);

// run_dir/events.out.tfevents.<unix seconds>.<hostname>: one new file per training session
// (TensorBoard reads every file of a directory as one run, in name order), written by rank 0
// only; other ranks open nothing. An existing file is never overwritten or appended to: a name
// already taken (a resume within the same second) gets a ".1", ".2", ... suffix, which sorts
// after it. The file starts with the file_version event and a SessionLog START at `first_step`:
// TensorBoard then drops the events of steps >= first_step read from earlier files (a resume
// from a checkpoint older than the last logged step redoes those steps), as metrics.jsonl's
// readers keep the later line of a repeated step.
//
// Non-finite values are not written: metrics.jsonl writes them as null, and TensorBoard draws
// a NaN or an infinity as a point off the chart that breaks its y-axis range; train/skipped marks
// such a step instead.
//
// Unbuffered: write() hands a step's whole record to write(2) at once, so TensorBoard (which
// polls the file) sees each step as it is logged. A failed open or write throws UserError
// naming the file and the OS reason (a record cut short by it is skipped by TensorBoard).
class TensorBoardWriter {
 public:
  TensorBoardWriter(const ProcessGrid& grid, const std::string& run_dir, int64_t first_step);
  ~TensorBoardWriter();
  TensorBoardWriter(const TensorBoardWriter&) = delete;
  TensorBoardWriter& operator=(const TensorBoardWriter&) = delete;

  void write(const StepMetrics& m);
  // The event file ("" on ranks other than 0).
  const std::string& path() const { return path_; }

 private:
  void append(const std::string& records);

  int fd_ = -1;
  std::string path_;
};

}  // namespace switcht5
