// TensorBoard event files (train/tensorboard.h): CRC-32C against published vectors, the TFRecord
// framing and the hand-encoded Event messages byte for byte against what tensorboard's own
// protobuf classes and record code produce, the tag list, and the writer's file: framed records
// whose CRCs check, non-finite values left out, an existing file never touched, nothing written
// on ranks other than 0, and a failed write reported with the file and the OS reason.
// tests/py/test_tensorboard_events.py reads a trained run's files back with tensorboard itself.
#include <sys/resource.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>

#include <gtest/gtest.h>
#include <unistd.h>

#include "core/check.h"
#include "train/tensorboard.h"

namespace switcht5 {
namespace {

namespace fs = std::filesystem;

// The writer's clock (system_clock, CLOCK_REALTIME). Not ::time(): glibc reads it from
// CLOCK_REALTIME_COARSE, which lags by up to a scheduler tick, so a bound taken with time() just
// after a write could be earlier than the write's own timestamp (CI saw it, once).
double unix_seconds() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string to_hex(const std::string& bytes) {
  std::string out;
  for (unsigned char c : bytes) out += fmt::format("{:02x}", c);
  return out;
}

std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

uint64_t le(const std::string& b, size_t at, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | uint8_t(b[at + i]);
  return v;
}

// The data of each record of an event file, checking both CRCs of every record and that the
// file ends at a record boundary.
std::vector<std::string> read_records(const std::string& file) {
  std::vector<std::string> records;
  size_t at = 0;
  while (at < file.size()) {
    EXPECT_LE(at + 12, file.size()) << "truncated header at byte " << at;
    if (at + 12 > file.size()) break;
    const uint64_t n = le(file, at, 8);
    EXPECT_EQ(le(file, at + 8, 4), masked_crc32c(file.substr(at, 8))) << "length CRC at " << at;
    EXPECT_LE(at + 12 + n + 4, file.size()) << "truncated record at byte " << at;
    if (at + 12 + n + 4 > file.size()) break;
    const std::string data = file.substr(at + 12, n);
    EXPECT_EQ(le(file, at + 12 + n, 4), masked_crc32c(data)) << "data CRC at " << at;
    records.push_back(data);
    at += 12 + n + 4;
  }
  return records;
}

// An event's wall_time: every event the writer makes starts with field 1 (key 0x09), a double.
double wall_time_of(const std::string& event) {
  EXPECT_EQ(uint8_t(event.at(0)), 0x09);
  const uint64_t bits = le(event, 1, 8);
  double t;
  std::memcpy(&t, &bits, sizeof t);
  return t;
}

fs::path fresh_dir(const std::string& name) {
  const fs::path dir = fs::temp_directory_path() / ("switcht5_tensorboard_" + name);
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir;
}

std::vector<fs::path> event_files(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("events.out.tfevents.", 0) == 0) files.push_back(e.path());
  std::sort(files.begin(), files.end());
  return files;
}

StepMetrics sample_metrics() {
  StepMetrics m;
  m.step = 7;
  m.loss = 2.5;
  m.aux_loss = 1.0625;
  m.z_loss = 0.75;
  m.lr = 0.003;
  m.grad_norm = 1.5;
  m.tokens_per_s = 123456.0;
  m.dropped_fraction = 0.125;
  m.step_ms = 3.5;
  for (const char* name : {"encoder.block.1", "decoder.block.1"}) {
    LayerRouting r;
    r.layer = name;
    r.aux_loss = 1.25;
    r.z_loss = 0.5;
    r.dropped_fraction = 0.0625;
    r.expert_fraction = {0.25, 0.5, 0.125, 0.125};
    m.routing.push_back(r);
  }
  return m;
}

TEST(Crc32c, KnownVectors) {
  EXPECT_EQ(crc32c(""), 0x00000000u);
  EXPECT_EQ(crc32c("123456789"), 0xe3069283u);  // the CRC catalogue's check value
  // RFC 3720 (iSCSI) appendix B.4.
  EXPECT_EQ(crc32c(std::string(32, '\x00')), 0x8a9136aau);
  EXPECT_EQ(crc32c(std::string(32, '\xff')), 0x62a8ab43u);
  std::string up, down;
  for (int i = 0; i < 32; ++i) {
    up += char(i);
    down += char(31 - i);
  }
  EXPECT_EQ(crc32c(up), 0x46dd794eu);
  EXPECT_EQ(crc32c(down), 0x113fdb5cu);
}

TEST(Crc32c, Masked) {
  // ((crc >> 15) | (crc << 17)) + 0xa282ead8, as tensorboard's record reader computes it.
  const uint32_t crc = 0xe3069283u;
  EXPECT_EQ(masked_crc32c("123456789"), uint32_t(((crc >> 15) | (crc << 17)) + 0xa282ead8u));
  EXPECT_EQ(masked_crc32c("123456789"), 0xc78ab0e5u);
}

// The golden bytes below were made with tensorboard 2.21's record code
// (tensorflow_stub.pywrap_tensorflow.masked_crc32c) and protobuf classes
// (compat.proto.event_pb2, summary_pb2: Event(...).SerializeToString()).
TEST(TfRecord, Framing) {
  EXPECT_EQ(to_hex(tfrecord("abc")), "0300000000000000" "b099490e" "616263" "6e57f121");
  const std::string data(300, 'x');
  const std::string r = tfrecord(data);
  ASSERT_EQ(r.size(), 8 + 4 + 300 + 4u);
  EXPECT_EQ(le(r, 0, 8), 300u);
  EXPECT_EQ(r.substr(12, 300), data);
  EXPECT_EQ(read_records(r), std::vector<std::string>{data});
}

TEST(EventEncoding, MatchesProtobuf) {
  // Event(wall_time=1700000000.5, file_version="brain.Event:2")
  EXPECT_EQ(to_hex(file_version_event(1700000000.5)),
            "0900002040fc54d9411a0d627261696e2e4576656e743a32");
  // Event(wall_time=1700000001.25, step=301, session_log=SessionLog(status=START))
  EXPECT_EQ(to_hex(session_start_event(1700000001.25, 301)), "0900005040fc54d94110ad023a020801");
  // Event(wall_time=1700000002.125, step=300000, summary=Summary(value=[
  //   Value(tag="train/loss", simple_value=2.5),
  //   Value(tag="routing/encoder.block.1/expert_3_fraction", simple_value=0.1)]))
  EXPECT_EQ(to_hex(summary_event(1700000002.125, 300000,
                                 {{"train/loss", 2.5},
                                  {"routing/encoder.block.1/expert_3_fraction", 0.1}})),
            "0900008840fc54d94110e0a7122a450a110a0a747261696e2f6c6f737315000020400a300a29726f75"
            "74696e672f656e636f6465722e626c6f636b2e312f6578706572745f335f6672616374696f6e15cdcc"
            "cc3d");
}

TEST(StepScalars, OneTagPerField) {
  StepMetrics m = sample_metrics();
  m.routing.pop_back();
  std::vector<std::string> tags;
  for (const Scalar& s : step_scalars(m)) tags.push_back(s.tag);
  const std::vector<std::string> expected = {
      "train/loss", "train/aux_loss", "train/z_loss", "train/lr", "train/grad_norm",
      "train/tokens_per_s", "train/dropped_fraction", "train/step_ms", "train/skipped",
      "routing/encoder.block.1/aux_loss", "routing/encoder.block.1/z_loss",
      "routing/encoder.block.1/dropped_fraction", "routing/encoder.block.1/entropy",
      "routing/encoder.block.1/top1_prob", "routing/encoder.block.1/top1_margin",
      "routing/encoder.block.1/load_cv", "routing/encoder.block.1/expert_0_fraction",
      "routing/encoder.block.1/expert_1_fraction", "routing/encoder.block.1/expert_2_fraction",
      "routing/encoder.block.1/expert_3_fraction"};
  EXPECT_EQ(tags, expected);
  const std::vector<Scalar> s = step_scalars(m);
  EXPECT_EQ(s[0].value, 2.5);
  EXPECT_EQ(s[8].value, 0.0);  // not skipped
  EXPECT_EQ(s[10].value, 0.5);
  EXPECT_EQ(s[17].value, 0.5);
  // Telemetry of a logged step: dead experts and each expert's gradient norm, when set.
  m.routing[0].dead_experts = 1;
  m.routing[0].expert_grad_norm = {0.25, 0.5, 0.75, 1.0};
  const std::vector<Scalar> t = step_scalars(m);
  ASSERT_EQ(t.size(), s.size() + 5);
  EXPECT_EQ(t[16].tag, "routing/encoder.block.1/dead_experts");
  EXPECT_EQ(t[16].value, 1.0);
  EXPECT_EQ(t.back().tag, "routing/encoder.block.1/expert_3_grad_norm");
  EXPECT_EQ(t.back().value, 1.0);

  m.has_val = true;
  m.val_loss = 3.25;
  m.skipped = true;
  const std::vector<Scalar> v = step_scalars(m);
  EXPECT_EQ(v[8].tag, "train/skipped");
  EXPECT_EQ(v[8].value, 1.0);
  EXPECT_EQ(v[9].tag, "val/loss");
  EXPECT_EQ(v[9].value, 3.25);
}

TEST(StepScalars, ExpertIndexPaddedToSortInOrder) {
  StepMetrics m = sample_metrics();
  m.routing.resize(1);
  m.routing[0].expert_fraction.assign(12, 1.0 / 12);
  const std::vector<Scalar> s = step_scalars(m);
  EXPECT_EQ(s[16].tag, "routing/encoder.block.1/expert_00_fraction");
  EXPECT_EQ(s.back().tag, "routing/encoder.block.1/expert_11_fraction");
}

TEST(TensorBoardWriter, WritesFramedEventsAndLeavesOutNonFinite) {
  const fs::path dir = fresh_dir("write");
  ProcessGrid grid;
  const double before = unix_seconds();
  StepMetrics m = sample_metrics();
  StepMetrics bad = sample_metrics();
  bad.step = 8;
  bad.skipped = true;
  bad.grad_norm = std::numeric_limits<double>::quiet_NaN();
  bad.routing[1].z_loss = std::numeric_limits<double>::infinity();
  bad.tokens_per_s = 1e300;  // finite as a double, infinite as the float TensorBoard stores
  std::string path;
  {
    TensorBoardWriter w(grid, dir.string(), /*first_step=*/5);
    path = w.path();
    w.write(m);
    w.write(bad);
  }
  const double after = unix_seconds();
  ASSERT_EQ(event_files(dir), std::vector<fs::path>{fs::path(path)});
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  const std::string name = fs::path(path).filename().string();
  EXPECT_EQ(name.substr(name.rfind('.') + 1), std::string(host)) << name;
  const long long secs = std::stoll(name.substr(std::strlen("events.out.tfevents.")));
  EXPECT_GE(secs, (long long)std::floor(before));
  EXPECT_LE(secs, (long long)std::floor(after));

  const std::vector<std::string> records = read_records(read_file(path));
  ASSERT_EQ(records.size(), 4u);
  for (const std::string& r : records) {
    EXPECT_GE(wall_time_of(r), before);
    EXPECT_LE(wall_time_of(r), after);
  }
  EXPECT_EQ(records[0], file_version_event(wall_time_of(records[0])));
  EXPECT_EQ(records[1], session_start_event(wall_time_of(records[1]), 5));
  EXPECT_EQ(records[2], summary_event(wall_time_of(records[2]), 7, step_scalars(m)));
  std::vector<Scalar> finite = step_scalars(bad);
  const size_t all = finite.size();
  std::erase_if(finite, [](const Scalar& s) {
    return s.tag == "train/grad_norm" || s.tag == "train/tokens_per_s" ||
           s.tag == "routing/decoder.block.1/z_loss";
  });
  ASSERT_EQ(finite.size(), all - 3);
  EXPECT_EQ(records[3], summary_event(wall_time_of(records[3]), 8, finite));
}

TEST(TensorBoardWriter, NeverTouchesAnExistingFile) {
  const fs::path dir = fresh_dir("existing");
  char host[256] = {};
  ::gethostname(host, sizeof host - 1);
  // Every name the writer could choose in the next few seconds is taken, by an earlier session.
  const long long now = (long long)std::floor(unix_seconds());
  std::vector<fs::path> taken;
  for (long long t = now - 1; t <= now + 5; ++t) {
    taken.push_back(dir / fmt::format("events.out.tfevents.{}.{}", t, host));
    std::ofstream(taken.back(), std::ios::binary) << "earlier session " << t;
  }
  ProcessGrid grid;
  std::string path;
  {
    TensorBoardWriter w(grid, dir.string(), 1);
    path = w.path();
    w.write(sample_metrics());
  }
  EXPECT_EQ(path.substr(path.size() - 2), ".1") << path;
  EXPECT_EQ(read_records(read_file(path)).size(), 3u);
  for (size_t i = 0; i < taken.size(); ++i)
    EXPECT_EQ(read_file(taken[i]), fmt::format("earlier session {}", now - 1 + long(i)));
  // Name order is TensorBoard's reading order: the suffixed file comes after the one it avoids.
  const fs::path avoided = path.substr(0, path.size() - 2);
  EXPECT_LT(avoided.filename().string(), fs::path(path).filename().string());
}

TEST(TensorBoardWriter, OtherRanksWriteNothing) {
  const fs::path dir = fresh_dir("rank1");
  ProcessGrid grid;
  grid.world_rank = 1;
  grid.world_size = 2;
  TensorBoardWriter w(grid, dir.string(), 1);
  w.write(sample_metrics());
  EXPECT_EQ(w.path(), "");
  EXPECT_TRUE(fs::is_empty(dir));
}

TEST(TensorBoardWriter, CannotCreateNamesFileAndReason) {
  const fs::path dir = fresh_dir("create");
  const fs::path not_a_dir = dir / "file";
  std::ofstream(not_a_dir) << "x";
  ProcessGrid grid;
  try {
    TensorBoardWriter w(grid, not_a_dir.string(), 1);
    FAIL() << "expected a UserError";
  } catch (const UserError& e) {
    const std::string msg = e.what();
    EXPECT_NE(msg.find((not_a_dir / "events.out.tfevents.").string()), std::string::npos) << msg;
    EXPECT_NE(msg.find("cannot create the TensorBoard event file: Not a directory"),
              std::string::npos)
        << msg;
  }
}

// A write the OS refuses (here the file size limit, RLIMIT_FSIZE: EFBIG, as ENOSPC would be on
// a full disk) is a UserError naming the file and the reason, never a silent loss.
TEST(TensorBoardWriter, FailedWriteNamesFileAndReason) {
  const fs::path dir = fresh_dir("efbig");
  ProcessGrid grid;
  TensorBoardWriter w(grid, dir.string(), 1);
  w.write(sample_metrics());
  const uintmax_t size = fs::file_size(w.path());

  struct rlimit saved {};
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto* old_handler = std::signal(SIGXFSZ, SIG_IGN);  // else the signal ends the process
  struct rlimit small = saved;
  small.rlim_cur = rlim_t(size + 10);  // a few bytes more fit: a partial write, then EFBIG
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  std::string msg;
  try {
    w.write(sample_metrics());
  } catch (const UserError& e) {
    msg = e.what();
  }
  ::setrlimit(RLIMIT_FSIZE, &saved);
  std::signal(SIGXFSZ, old_handler);
  EXPECT_EQ(msg, fmt::format("{}: cannot write the TensorBoard event file: {}", w.path(),
                             std::strerror(EFBIG)));
  EXPECT_EQ(fs::file_size(w.path()), size + 10);
}

}  // namespace
}  // namespace switcht5
