#include "comm/watchdog.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include <fmt/format.h>

#include "core/check.h"

namespace switcht5 {

const char* comm_call_name(CommCall c) {
  switch (c) {
    case CommCall::kAllReduceSum: return "all_reduce_sum";
    case CommCall::kAllReduceMax: return "all_reduce_max";
    case CommCall::kReduceScatterSum: return "reduce_scatter_sum";
    case CommCall::kAllGather: return "all_gather";
    case CommCall::kAllToAll: return "all_to_all";
    case CommCall::kBroadcast: return "broadcast";
    case CommCall::kBarrier: return "barrier";
    case CommCall::kSplit: return "split";
    case CommCall::kDeviceWait: return "wait for the GPU's queued kernels and NCCL collectives";
    case CommCall::kCheckpointSave: return "checkpoint save";
    case CommCall::kCheckpointLoad: return "checkpoint load";
    case CommCall::kDataWait: return "wait for the data loader";
  }
  return "?";
}

const char* element_type_name(ElementType t) {
  switch (t) {
    case ElementType::kNone: return "";
    case ElementType::kFloat: return "floats";
    case ElementType::kDouble: return "doubles";
    case ElementType::kInt64: return "int64s";
  }
  return "?";
}

namespace {

std::string describe_entry(const CollectiveTrace::Entry& e) {
  if (e.type == ElementType::kNone) return comm_call_name(e.collective);
  return fmt::format("{}({} {})", comm_call_name(e.collective), e.count,
                     element_type_name(e.type));
}

}  // namespace

void CollectiveTrace::record(const Entry& e) {
  unsigned char bytes[2 + sizeof(int64_t)];
  bytes[0] = static_cast<unsigned char>(e.collective);
  bytes[1] = static_cast<unsigned char>(e.type);
  std::memcpy(bytes + 2, &e.count, sizeof e.count);
  for (unsigned char b : bytes) hash_ = (hash_ ^ b) * 1099511628211ull;  // FNV-1a prime
  ring_[size_t(calls_ % kKept)] = e;
  ++calls_;
}

std::vector<CollectiveTrace::Entry> CollectiveTrace::last() const {
  std::vector<Entry> out;
  for (int64_t i = std::max<int64_t>(0, calls_ - kKept); i < calls_; ++i)
    out.push_back(ring_[size_t(i % kKept)]);
  return out;
}

std::string CollectiveTrace::describe_last() const {
  std::string out;
  int64_t index = std::max<int64_t>(0, calls_ - kKept) + 1;
  for (const Entry& e : last())
    out += fmt::format("{}#{} {}", out.empty() ? "" : ", ", index++, describe_entry(e));
  return out;
}

Watchdog::Watchdog(double timeout_s, int world_rank, EndJob end_job)
    : timeout_s_(timeout_s), timeout_ns_(int64_t(timeout_s * 1e9)),
      period_ns_(std::clamp<int64_t>(timeout_ns_ / 10, 10'000'000, 1'000'000'000)),
      suspended_ns_(period_ns_ + 1'000'000'000), world_rank_(world_rank),
      end_job_(std::move(end_job)), last_tick_ns_(now_ns()) {
  SWT_CHECK(timeout_s > 0, "watchdog timeout must be positive, got {} s", timeout_s);
  SWT_CHECK(end_job_ != nullptr, "a watchdog needs a way to end the job");
  thread_ = std::thread([this] { thread_main(); });
}

Watchdog::~Watchdog() {
  {
    std::lock_guard lock(mutex_);
    stop_ = true;
  }
  wake_.notify_all();
  thread_.join();
}

int64_t Watchdog::now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch())
      .count();
}

Watchdog::Watch::Watch(Watchdog* w, CollectiveTrace* trace, const char* group, int group_size,
                       CollectiveTrace::Entry e)
    : w_(w) {
  if (trace) trace->record(e);
  if (w_ && w_->operations_ > 0) w_ = nullptr;  // inside an operation: its deadline applies
  if (!w_) return;
  constexpr auto relaxed = std::memory_order_relaxed;
  w_->collective_.store(int(e.collective), relaxed);
  w_->type_.store(int(e.type), relaxed);
  w_->count_.store(e.count, relaxed);
  w_->call_.store(trace ? trace->calls() : 0, relaxed);
  w_->group_.store(group, relaxed);
  w_->group_size_.store(group_size, relaxed);
  w_->deadline_ns_.store(w_->timeout_ns_, relaxed);
  w_->generation_.fetch_add(1, std::memory_order_release);
  w_->start_ns_.store(now_ns(), std::memory_order_release);
}

Watchdog::Watch::Watch(Watchdog* w, CommCall op, const std::string& detail, double deadline_s)
    : w_(w), operation_(true) {
  if (w_ && w_->operations_ > 0) w_ = nullptr;  // inside another: the outer one is watched
  if (!w_) return;
  ++w_->operations_;
  {
    std::lock_guard lock(w_->mutex_);
    w_->detail_ = detail;
  }
  constexpr auto relaxed = std::memory_order_relaxed;
  w_->collective_.store(int(op), relaxed);
  w_->type_.store(int(ElementType::kNone), relaxed);
  w_->count_.store(0, relaxed);
  w_->call_.store(0, relaxed);
  w_->group_.store(nullptr, relaxed);
  w_->group_size_.store(0, relaxed);  // 0: an operation of this rank, not a collective
  w_->deadline_ns_.store(deadline_s > 0 ? int64_t(deadline_s * 1e9) : w_->timeout_ns_, relaxed);
  w_->generation_.fetch_add(1, std::memory_order_release);
  w_->start_ns_.store(now_ns(), std::memory_order_release);
}

Watchdog::Watch::~Watch() {
  if (!w_) return;
  w_->start_ns_.store(0, std::memory_order_release);
  if (operation_) --w_->operations_;
}

CollectiveTrace* Watchdog::trace(const std::string& group) { return &traces_[group]; }

void Watchdog::poll() { check(0); }

void Watchdog::set_completed_step(int64_t step, std::string expert_tokens) {
  std::lock_guard lock(mutex_);
  completed_step_ = step;
  expert_tokens_ = std::move(expert_tokens);
}

Watchdog::Registration& Watchdog::Registration::operator=(Registration&& o) noexcept {
  if (this != &o) {
    if (w_) w_->unregister(id_);
    w_ = o.w_;
    id_ = o.id_;
    o.w_ = nullptr;
  }
  return *this;
}

Watchdog::Registration::~Registration() {
  if (w_) w_->unregister(id_);
}

Watchdog::Registration Watchdog::log_to(std::function<void(const std::string&)> write) {
  std::lock_guard lock(mutex_);
  const int id = next_id_++;
  log_writers_[id] = std::move(write);
  return Registration(this, id);
}

Watchdog::Registration Watchdog::on_abort(std::function<void()> hook) {
  std::lock_guard lock(mutex_);
  const int id = next_id_++;
  abort_hooks_[id] = std::move(hook);
  return Registration(this, id);
}

void Watchdog::unregister(int id) {
  std::lock_guard lock(mutex_);
  log_writers_.erase(id);
  abort_hooks_.erase(id);
}

std::string Watchdog::describe_in_flight() const {
  if (start_ns_.load(std::memory_order_acquire) == 0) return "";
  constexpr auto relaxed = std::memory_order_relaxed;
  const auto collective = CommCall(collective_.load(relaxed));
  const auto type = ElementType(type_.load(relaxed));
  const int64_t count = count_.load(relaxed), call = call_.load(relaxed);
  const int group_size = group_size_.load(relaxed);
  const char* group = group_.load(relaxed);
  const int64_t step = step_.load(relaxed);
  const double deadline_s = double(deadline_ns_.load(relaxed)) * 1e-9;
  const std::string when =
      step > 0 ? fmt::format("step {}", step) : std::string("before the first step");
  std::lock_guard lock(mutex_);
  std::string m;
  if (group_size == 0) {
    m = fmt::format("watchdog: {}: {} ({}) did not complete in {:g} s; ending the job (exit code "
                    "{}). ",
                    when, comm_call_name(collective), detail_, deadline_s, kExitCode);
  } else {
    const std::string elements =
        type == ElementType::kNone ? "" : fmt::format(", {} {}", count, element_type_name(type));
    m = fmt::format(
        "watchdog: {}: {} over the {} group ({} ranks{}; call {} on this group) did not complete "
        "in {:g} s; ending the job (exit code {}). ",
        when, comm_call_name(collective), group ? group : "?", group_size, elements, call,
        deadline_s, kExitCode);
  }
  if (completed_step_ > 0)
    m += fmt::format("Per-expert tokens (top-1 choices) of the last completed step, {}: {}",
                     completed_step_, expert_tokens_.empty() ? "no Switch layers" : expert_tokens_);
  else
    m += "No step has completed yet: no per-expert token counts";
  return m;
}

void Watchdog::tick(int64_t now) {
  const int64_t gap = now - last_tick_ns_.exchange(now, std::memory_order_relaxed);
  if (gap <= suspended_ns_) return;
  int64_t start = start_ns_.load(std::memory_order_relaxed);
  // Fails only if the collective ended or another began meanwhile: nothing to move then.
  if (start != 0) start_ns_.compare_exchange_strong(start, start + gap, std::memory_order_relaxed);
}

void Watchdog::check(int64_t extra_ns) {
  if (fired_.load(std::memory_order_relaxed)) return;
  const int64_t now = now_ns();
  tick(now);
  const int64_t start = start_ns_.load(std::memory_order_acquire);
  if (start == 0 || now - start <= deadline_ns_.load(std::memory_order_relaxed) + extra_ns) return;
  const uint64_t generation = generation_.load(std::memory_order_acquire);
  std::string message = describe_in_flight();
  // Read it again: the collective may have completed (and another begun) meanwhile; then it was
  // not stuck and the fields read may mix two collectives.
  std::atomic_thread_fence(std::memory_order_acquire);
  if (generation_.load(std::memory_order_relaxed) != generation ||
      start_ns_.load(std::memory_order_relaxed) != start)
    return;
  fire(message);
}

void Watchdog::fire(const std::string& message) {
  if (fired_.exchange(true)) return;
  std::fprintf(stderr, "[rank %d] switcht5: %s\n", world_rank_, message.c_str());
  std::fflush(stderr);
  std::vector<std::function<void(const std::string&)>> writers;
  std::vector<std::function<void()>> hooks;
  {
    std::lock_guard lock(mutex_);
    for (auto& [id, w] : log_writers_) writers.push_back(w);
    for (auto& [id, h] : abort_hooks_) hooks.push_back(h);
  }
  // Nothing may stop the job from ending: a failing writer or hook is skipped.
  for (auto& w : writers) try { w(message); } catch (...) {}
  for (auto& h : hooks) try { h(); } catch (...) {}
  end_job_(kExitCode);
}

void Watchdog::thread_main() {
  std::unique_lock lock(mutex_);
  while (!stop_) {
    wake_.wait_for(lock, std::chrono::nanoseconds(period_ns_), [this] { return stop_; });
    if (stop_) break;
    lock.unlock();
    check(period_ns_);  // poll() on the main thread has had one period to act
    lock.lock();
  }
}

}  // namespace switcht5
