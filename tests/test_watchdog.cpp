// The watchdog (comm/watchdog.h) without MPI: a collective past its deadline ends the job once,
// from poll() on the waiting thread or else from the watchdog's thread, with one message naming
// the step, collective, group, size and the last completed step's per-expert tokens, after the
// log writers and abort hooks; a collective within its deadline, or time the process spent
// stopped, does not; the trace's hash tells sequences apart. The end of the job is a stand-in
// that records the call and returns. The MPI side (a stopped or killed rank of a real run) is
// tests/mpi/test_watchdog.sh.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "comm/watchdog.h"
#include "train/metrics.h"

namespace switcht5 {
namespace {

using namespace std::chrono_literals;
using Entry = CollectiveTrace::Entry;

// Records how the watchdog ended "the job".
struct Ending {
  std::atomic<int> calls{0}, code{0};
  std::atomic<bool> on_caller_thread{false};
  std::thread::id caller = std::this_thread::get_id();
  Watchdog::EndJob fn() {
    return [this](int c) {
      code = c;
      on_caller_thread = std::this_thread::get_id() == caller;
      ++calls;
    };
  }
  bool wait(std::chrono::milliseconds limit) {
    const auto until = std::chrono::steady_clock::now() + limit;
    while (calls == 0 && std::chrono::steady_clock::now() < until) std::this_thread::sleep_for(5ms);
    return calls > 0;
  }
};

TEST(Watchdog, PollPastTheDeadlineEndsTheJobOnceWithOneMessage) {
  Ending ending;
  Watchdog w(0.2, 1, ending.fn());
  std::vector<std::string> order;
  std::string logged;
  auto log = w.log_to([&](const std::string& line) { logged = line; order.push_back("log"); });
  auto hook = w.on_abort([&] { order.push_back("hook"); });
  CollectiveTrace* trace = w.trace("data");
  trace->record({CommCall::kBarrier, ElementType::kNone, 0});
  w.set_step(11);
  StepMetrics m;
  LayerRouting r;
  r.layer = "encoder.block.1";
  r.expert_tokens = {12, 0, 7, 5};
  m.routing.push_back(r);
  w.set_completed_step(11, describe_expert_tokens(m));
  w.set_step(12);
  ::testing::internal::CaptureStderr();
  {
    Watchdog::Watch watch(&w, trace, "data", 2,
                          {CommCall::kAllReduceSum, ElementType::kFloat, 4096});
    const auto until = std::chrono::steady_clock::now() + 5s;
    while (ending.calls == 0 && std::chrono::steady_clock::now() < until) w.poll();
    for (int i = 0; i < 1000; ++i) w.poll();  // fired: acts no more
  }
  const std::string err = ::testing::internal::GetCapturedStderr();
  ASSERT_EQ(ending.calls, 1);
  EXPECT_EQ(ending.code, Watchdog::kExitCode);
  EXPECT_TRUE(ending.on_caller_thread) << "poll() should act on the polling thread";
  const std::string expected =
      "watchdog: step 12: all_reduce_sum over the data group (2 ranks, 4096 floats; call 2 on "
      "this group) did not complete in 0.2 s; ending the job (exit code 3). Per-expert tokens "
      "(top-1 choices) of the last completed step, 11: encoder.block.1 [12 0 7 5]";
  EXPECT_EQ(err, "[rank 1] switcht5: " + expected + "\n");
  EXPECT_EQ(logged, expected);
  EXPECT_EQ(order, (std::vector<std::string>{"log", "hook"}));
}

TEST(Watchdog, TheThreadActsWhenNobodyPolls) {
  Ending ending;
  Watchdog w(0.2, 0, ending.fn());
  ::testing::internal::CaptureStderr();
  {
    // A wait that never comes back to us (MPI_Comm_split): no poll().
    Watchdog::Watch watch(&w, w.trace("world"), "world", 4,
                          {CommCall::kSplit, ElementType::kNone, 0});
    EXPECT_TRUE(ending.wait(10s));
  }
  const std::string err = ::testing::internal::GetCapturedStderr();
  EXPECT_EQ(ending.calls, 1);
  EXPECT_FALSE(ending.on_caller_thread);
  EXPECT_NE(err.find("watchdog: before the first step: split over the world group (4 ranks; "
                     "call 1 on this group) did not complete in 0.2 s"),
            std::string::npos)
      << err;
  EXPECT_NE(err.find("No step has completed yet"), std::string::npos) << err;
}

TEST(Watchdog, CollectivesWithinTheDeadlineAndRemovedHooksAreLeftAlone) {
  Ending ending;
  Watchdog w(1.0, 0, ending.fn());
  bool hook_ran = false;
  {
    auto hook = w.on_abort([&] { hook_ran = true; });
  }
  CollectiveTrace* trace = w.trace("expert");
  for (int i = 0; i < 20; ++i) {
    Watchdog::Watch watch(&w, trace, "expert", 2, {CommCall::kAllToAll, ElementType::kFloat, 8});
    std::this_thread::sleep_for(20ms);  // 0.4 s in all: longer than a deadline, but in pieces
    w.poll();
  }
  EXPECT_EQ(w.describe_in_flight(), "");
  std::this_thread::sleep_for(1500ms);  // nothing in flight: nothing to expire
  EXPECT_EQ(ending.calls, 0);
  EXPECT_EQ(trace->calls(), 20);
  // The hook was removed with its registration: a later expiry does not run it.
  ::testing::internal::CaptureStderr();
  {
    Watchdog::Watch watch(&w, trace, "expert", 2, {CommCall::kAllToAll, ElementType::kFloat, 8});
    EXPECT_TRUE(ending.wait(10s));
  }
  ::testing::internal::GetCapturedStderr();
  EXPECT_FALSE(hook_ran);
}

// The process is stopped (SIGSTOP) for longer than the deadline in the middle of a collective:
// that time is not the collective's. A child continues us.
TEST(Watchdog, TimeTheProcessWasStoppedDoesNotCount) {
  Ending ending;
  Watchdog w(1.0, 0, ending.fn());
  CollectiveTrace* trace = w.trace("data");
  ::testing::internal::CaptureStderr();
  {
    Watchdog::Watch watch(&w, trace, "data", 2,
                          {CommCall::kAllReduceSum, ElementType::kFloat, 1});
    w.poll();
    const pid_t self = getpid();
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      usleep(2'500'000);
      kill(self, SIGCONT);
      _exit(0);
    }
    raise(SIGSTOP);
    int status = 0;
    waitpid(child, &status, 0);
    w.poll();
    EXPECT_EQ(ending.calls, 0) << "fired for time the process was stopped";
    // Its own deadline still holds: 1 s of waiting from now.
    const auto until = std::chrono::steady_clock::now() + 10s;
    while (ending.calls == 0 && std::chrono::steady_clock::now() < until) w.poll();
    EXPECT_EQ(ending.calls, 1);
  }
  ::testing::internal::GetCapturedStderr();
}

TEST(CollectiveTrace, HashTellsSequencesApartAndTheLastEntriesAreKept) {
  const Entry a{CommCall::kAllReduceSum, ElementType::kFloat, 4096};
  const Entry b{CommCall::kAllReduceSum, ElementType::kDouble, 4096};
  const Entry c{CommCall::kAllToAll, ElementType::kFloat, 4096};
  auto hash_of = [](const std::vector<Entry>& es) {
    CollectiveTrace t;
    for (const Entry& e : es) t.record(e);
    return t.hash();
  };
  EXPECT_EQ(hash_of({a, b, c}), hash_of({a, b, c}));
  EXPECT_NE(hash_of({a, b, c}), hash_of({a, c, b}));
  EXPECT_NE(hash_of({a}), hash_of({b}));
  EXPECT_NE(hash_of({a}), hash_of({Entry{a.collective, a.type, 4095}}));
  EXPECT_NE(hash_of({a}), hash_of({a, a}));

  CollectiveTrace t;
  for (int i = 1; i <= 20; ++i) t.record({CommCall::kBroadcast, ElementType::kFloat, i});
  EXPECT_EQ(t.calls(), 20);
  const std::vector<Entry> last = t.last();
  ASSERT_EQ(last.size(), size_t(CollectiveTrace::kKept));
  EXPECT_EQ(last.front().count, 5);
  EXPECT_EQ(last.back().count, 20);
  const std::string text = t.describe_last();
  EXPECT_EQ(text.rfind("#5 broadcast(5 floats), #6 broadcast(6 floats)", 0), 0u) << text;
  EXPECT_NE(text.find("#20 broadcast(20 floats)"), std::string::npos) << text;
}

TEST(Watchdog, ManyExpertsAreSummarised) {
  StepMetrics m;
  LayerRouting r;
  r.layer = "decoder.block.1";
  r.expert_tokens.assign(128, 3);
  r.expert_tokens[5] = 0;
  r.expert_tokens[9] = 0;
  r.expert_tokens[17] = 40;
  m.routing.push_back(r);
  EXPECT_EQ(describe_expert_tokens(m),
            "decoder.block.1 [128 experts: min 0 (expert 5), max 40 (expert 17), 2 with none]");
}

}  // namespace
}  // namespace switcht5
