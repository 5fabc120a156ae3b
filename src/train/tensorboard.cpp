#include "train/tensorboard.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstring>

#include <fmt/format.h>

#include "core/check.h"

namespace switcht5 {
namespace {

// Byte-at-a-time table of the reflected CRC-32C polynomial.
constexpr std::array<uint32_t, 256> make_crc32c_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t i = 0; i < 256; ++i) {
    uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : c >> 1;
    table[i] = c;
  }
  return table;
}
constexpr std::array<uint32_t, 256> kCrc32cTable = make_crc32c_table();

// Little-endian fixed-width integers, whatever the host's byte order.
void put_fixed32(std::string& out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out += char((v >> (8 * i)) & 0xff);
}
void put_fixed64(std::string& out, uint64_t v) {
  for (int i = 0; i < 8; ++i) out += char((v >> (8 * i)) & 0xff);
}

// Protobuf wire format: a field's key is (number << 3) | wire type.
enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kLengthDelimited = 2, kFixed32 = 5 };

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out += char((v & 0x7f) | 0x80);
    v >>= 7;
  }
  out += char(v);
}
void put_key(std::string& out, uint32_t field, WireType type) { put_varint(out, (field << 3) | type); }
void put_bytes(std::string& out, uint32_t field, std::string_view bytes) {
  put_key(out, field, kLengthDelimited);
  put_varint(out, bytes.size());
  out += bytes;
}

// Event fields 1 (wall_time) and 2 (step), which every event carries; the oneof follows.
std::string event_header(double wall_time, int64_t step) {
  std::string e;
  uint64_t bits;
  std::memcpy(&bits, &wall_time, sizeof bits);
  put_key(e, 1, kFixed64);
  put_fixed64(e, bits);
  // proto3 leaves a field at its default (step 0) out: the bytes are protobuf's own.
  if (step != 0) {
    put_key(e, 2, kVarint);
    put_varint(e, uint64_t(step));  // int64: a negative step is 10 bytes, two's complement
  }
  return e;
}

double unix_seconds_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch())
      .count();
}

std::string host_name() {
  char name[HOST_NAME_MAX + 1] = {};
  if (::gethostname(name, sizeof name - 1) != 0 || name[0] == '\0') return "localhost";
  return name;
}

}  // namespace

uint32_t crc32c(std::string_view data) {
  uint32_t c = 0xffffffffu;
  for (unsigned char b : data) c = kCrc32cTable[(c ^ b) & 0xff] ^ (c >> 8);
  return c ^ 0xffffffffu;
}

uint32_t masked_crc32c(std::string_view data) {
  const uint32_t crc = crc32c(data);
  return ((crc >> 15) | (crc << 17)) + 0xa282ead8u;
}

std::string tfrecord(std::string_view data) {
  std::string length;
  put_fixed64(length, data.size());
  std::string r = length;
  put_fixed32(r, masked_crc32c(length));
  r += data;
  put_fixed32(r, masked_crc32c(data));
  return r;
}

std::string file_version_event(double wall_time) {
  std::string e = event_header(wall_time, 0);
  put_bytes(e, 3, "brain.Event:2");
  return e;
}

std::string session_start_event(double wall_time, int64_t step) {
  std::string session_log;
  put_key(session_log, 1, kVarint);  // status
  put_varint(session_log, 1);        // SessionLog.START
  std::string e = event_header(wall_time, step);
  put_bytes(e, 7, session_log);
  return e;
}

std::string summary_event(double wall_time, int64_t step, const std::vector<Scalar>& scalars) {
  std::string summary;
  for (const Scalar& s : scalars) {
    std::string value;
    put_bytes(value, 1, s.tag);
    const float f = float(s.value);
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    put_key(value, 2, kFixed32);  // simple_value
    put_fixed32(value, bits);
    put_bytes(summary, 1, value);
  }
  std::string e = event_header(wall_time, step);
  put_bytes(e, 5, summary);
  return e;
}

std::vector<Scalar> step_scalars(const StepMetrics& m) {
  std::vector<Scalar> s = {
      {"train/loss", m.loss},
      {"train/aux_loss", m.aux_loss},
      {"train/z_loss", m.z_loss},
      {"train/lr", m.lr},
      {"train/grad_norm", m.grad_norm},
      {"train/tokens_per_s", m.tokens_per_s},
      {"train/dropped_fraction", m.dropped_fraction},
      {"train/step_ms", m.step_ms},
      {"train/skipped", m.skipped ? 1.0 : 0.0},
  };
  if (m.has_val) s.push_back({"val/loss", m.val_loss});
  for (const LayerRouting& r : m.routing) {
    const std::string prefix = "routing/" + r.layer + "/";
    s.push_back({prefix + "aux_loss", r.aux_loss});
    s.push_back({prefix + "z_loss", r.z_loss});
    s.push_back({prefix + "dropped_fraction", r.dropped_fraction});
    s.push_back({prefix + "entropy", r.entropy});
    s.push_back({prefix + "top1_prob", r.top1_prob});
    s.push_back({prefix + "top1_margin", r.top1_margin});
    s.push_back({prefix + "load_cv", r.load_cv});
    if (r.dead_experts >= 0) s.push_back({prefix + "dead_experts", double(r.dead_experts)});
    const size_t digits = fmt::formatted_size("{}", std::max<size_t>(r.expert_fraction.size(), 1) - 1);
    for (size_t e = 0; e < r.expert_fraction.size(); ++e)
      s.push_back({fmt::format("{}expert_{:0{}}_fraction", prefix, e, digits), r.expert_fraction[e]});
    for (size_t e = 0; e < r.expert_grad_norm.size(); ++e)
      s.push_back({fmt::format("{}expert_{:0{}}_grad_norm", prefix, e, digits), r.expert_grad_norm[e]});
  }
  return s;
}

TensorBoardWriter::TensorBoardWriter(const ProcessGrid& grid, const std::string& run_dir,
                                     int64_t first_step) {
  if (!grid.is_root()) return;
  const double now = unix_seconds_now();
  const std::string base = fmt::format("{}/events.out.tfevents.{}.{}", run_dir,
                                       int64_t(std::floor(now)), host_name());
  // O_EXCL: a file that exists (an earlier session's, in the same second) is never touched.
  for (int n = 0; fd_ < 0; ++n) {
    path_ = n == 0 ? base : fmt::format("{}.{}", base, n);
    fd_ = ::open(path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    SWT_USER_CHECK(fd_ >= 0 || errno == EEXIST,
                   "{}: cannot create the TensorBoard event file: {}", path_, std::strerror(errno));
  }
  try {
    append(tfrecord(file_version_event(now)) + tfrecord(session_start_event(now, first_step)));
  } catch (...) {
    ::close(fd_);  // no destructor runs for a constructor that throws
    throw;
  }
}

TensorBoardWriter::~TensorBoardWriter() {
  if (fd_ >= 0) ::close(fd_);
}

void TensorBoardWriter::write(const StepMetrics& m) {
  if (fd_ < 0) return;
  std::vector<Scalar> finite;
  for (Scalar& s : step_scalars(m))
    if (std::isfinite(float(s.value))) finite.push_back(std::move(s));  // as stored: float
  append(tfrecord(summary_event(unix_seconds_now(), m.step, finite)));
}

void TensorBoardWriter::append(const std::string& records) {
  size_t done = 0;
  while (done < records.size()) {
    const ssize_t n = ::write(fd_, records.data() + done, records.size() - done);
    if (n < 0 && errno == EINTR) continue;
    SWT_USER_CHECK(n > 0, "{}: cannot write the TensorBoard event file: {}", path_,
                   n < 0 ? std::strerror(errno) : "write returned 0");
    done += size_t(n);
  }
}

}  // namespace switcht5
