// Shared test helpers: random fills, host<->backend copies and closeness checks.
#pragma once
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "backend/backend.h"
#include "core/check.h"
#include "core/rng.h"

namespace switcht5::testing {

// The backends that the parameterised backend tests run on besides the reference: "cpu", and
// "cuda" in a build with the CUDA backend. Test instances are named by backend, so
// --gtest_filter=*cuda* selects the GPU ones (ctest label gpu) and -*cuda* the rest (label cpu).
inline std::vector<std::string> backends_under_test() {
#if defined(SWITCHT5_HAVE_CUDA)
  return {"cpu", "cuda"};
#else
  return {"cpu"};
#endif
}

// make_backend(name); for a GPU backend with no GPU visible, null with `skip_reason` set: the
// caller skips the test with it, so a machine without a GPU neither fails nor silently passes:
//   be_ = backend_or_skip(GetParam(), why);  if (!be_) GTEST_SKIP() << why;
inline std::unique_ptr<Backend> backend_or_skip(const std::string& name, std::string& skip_reason) {
  try {
    return make_backend(name);
  } catch (const UserError& e) {
    const std::string msg = e.what();
    if (name != "cuda" || msg.find("no CUDA GPU is visible") == std::string::npos) throw;
    skip_reason = "no CUDA GPU visible: " + msg;
    return nullptr;
  }
}

inline std::vector<float> random_vector(int64_t n, uint64_t seed, float lo = -1.0f, float hi = 1.0f) {
  CounterRng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = lo + (hi - lo) * static_cast<float>(rng.next_double());
  return v;
}

// n integers uniform in [lo, hi).
inline std::vector<int32_t> random_int_vector(int64_t n, uint64_t seed, int32_t lo, int32_t hi) {
  CounterRng rng(seed);
  std::vector<int32_t> v(n);
  for (auto& x : v) x = lo + static_cast<int32_t>(rng.next_below(static_cast<uint64_t>(hi - lo)));
  return v;
}

template <class T>
DeviceArray<T> upload(Backend& be, const std::vector<T>& host) {
  DeviceArray<T> d(be, static_cast<int64_t>(host.size()));
  if (!host.empty()) be.copy_to_device(d.data(), host.data(), d.bytes());
  return d;
}

template <class T>
std::vector<T> download(Backend& be, const T* ptr, int64_t n) {
  std::vector<T> h(n);
  if (n > 0) be.copy_to_host(h.data(), ptr, sizeof(T) * n);
  return h;
}

// Max over i of |a-b| / (atol + rtol*|b|) must be <= 1.
inline ::testing::AssertionResult all_close(const std::vector<float>& a, const std::vector<float>& b,
                                            double rtol, double atol) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << "size " << a.size() << " vs " << b.size();
  for (size_t i = 0; i < a.size(); ++i) {
    double d = std::fabs(double(a[i]) - double(b[i]));
    if (!(d <= atol + rtol * std::fabs(double(b[i]))))
      return ::testing::AssertionFailure()
             << "index " << i << ": " << a[i] << " vs " << b[i] << " (|diff| " << d << ")";
  }
  return ::testing::AssertionSuccess();
}

// Result of a shell command: exit code (-1 if it did not exit normally) and stdout + stderr.
struct CommandResult {
  int code;
  std::string output;
};

// Runs `command` through the shell with stderr merged into stdout.
inline CommandResult run_command(const std::string& command) {
  FILE* p = popen((command + " 2>&1").c_str(), "r");
  CommandResult r{-1, ""};
  if (!p) return r;
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) r.output.append(buf, n);
  const int status = pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

// Directory holding the shared data (../shared/data beside the checkout), or "" if absent.
inline std::string shared_data_dir() {
  std::string dir = std::string(SWITCHT5_SOURCE_DIR) + "/../shared/data";
  FILE* f = std::fopen((dir + "/spiece.model").c_str(), "rb");
  if (!f) return "";
  std::fclose(f);
  return dir;
}

}  // namespace switcht5::testing
