// Watchdog: a deadline on every collective, so that a rank that stops or dies ends the job with
// one message instead of leaving the others waiting forever; and the record of the order in
// which a rank issued its collectives, group by group, so that tests can prove every rank of a
// group issues the same ones.
//
// Deadline. A communicator given a watchdog (Communicator::attach_watchdog) brackets each
// collective with a Watch: which collective, over which group, how many elements. When one has
// not completed timeout_s after it began, the watchdog, once per process:
//   1. writes one line to stderr (tagged "[rank r] switcht5: ") and to the run's log files
//      (log_to): the step in progress, the collective, its group, its size and call number, and
//      the per-expert token counts of the last completed step (set by the trainer);
//   2. runs the abort hooks (on_abort: communicators that must be torn down first, e.g.
//      ncclCommAbort on an NCCL plane);
//   3. calls end_job(kExitCode): in a real run abort_all_ranks, i.e. MPI_Abort, after which the
//      launcher ends every rank of the job, stopped ones included.
// The rank that arrived last is not reported: the MPI plane is point-to-point messages, and a
// waiting rank does not learn which of its peers it is still waiting for.
//
// Who acts. MPI runs with MPI_THREAD_FUNNELED: only the main thread may call MPI, MPI_Abort
// included, and the main thread is the one waiting. So MpiCommunicator waits by polling
// (MPI_Testall) and calls poll() between tests, which acts on an expired deadline right there.
// The watchdog's thread is the backstop for waits that never come back to us (MPI_Comm_split,
// later a device stream): it acts one check period after the deadline, when poll() has not,
// and then its end_job is the one MPI call made off the main thread. We accept that over a
// hang: Open MPI's MPI_Abort goes to the process manager (PMIx), which works from any thread.
//
// What a stopped or dead rank does to the others: they wait in their next collective with it,
// and their watchdogs end the job within timeout_s of that collective's start (plus one check
// period on the backstop path). A rank killed outright is seen sooner by mpirun, which ends the
// job itself ("exited on signal 9"); under launchers that do not, the deadline still applies.
// Time this process did not run does not count: the thread ticks every period, and a gap of
// more than a period plus one second between ticks (SIGSTOP, a paused VM) moves the deadline
// of the collective in flight by the gap. So the stopped rank, continued by mpirun's
// SIGCONT + SIGTERM when the others abort, does not blame its own collective as well.
//
// Collective order. Every Watch also appends (collective, element type, count) to the
// CollectiveTrace of its group label: a running hash of the whole sequence plus the last
// kKept entries. Communicators with the same label (a group's control-plane communicator and
// its data plane's duplicate) share one trace, so the trace is the group's calls in program
// order across both planes; every rank of a group must produce the same trace
// (tests/mpi/test_collective_order.cpp compares them after training on several layouts).
//
// Threads: Watch, poll, trace and the setters are called from the main thread; the watchdog
// thread reads the collective in flight through atomics and the rest under a mutex.
#pragma once
#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace switcht5 {

enum class CommCall : uint8_t {
  kAllReduceSum, kAllReduceMax, kReduceScatterSum, kAllGather, kAllToAll, kBroadcast, kBarrier,
  kSplit,
  // The host waiting for a device backend's queued work, NCCL collectives included (group
  // "device"): a peer that stopped leaves the GPU waiting in NCCL and the host here.
  kDeviceWait,
  // Operations of one rank that are not collectives of ours but can hang the job all the same
  // (a stalled filesystem, a stuck reader): watched with Watch's second constructor.
  kCheckpointSave,  // writing a checkpoint (collective inside parallel HDF5's MPI-IO)
  kCheckpointLoad,  // reading one (resume, eval)
  kDataWait,        // the main thread waiting for the data loader's next batch
};
// kNone: no element count (a barrier, a split, a string broadcast).
enum class ElementType : uint8_t { kNone, kFloat, kDouble, kInt64 };
const char* comm_call_name(CommCall c);     // "all_reduce_sum", ...
const char* element_type_name(ElementType t);  // "floats", "doubles", "int64s", ""

// The collectives one rank issued over one group, in order.
class CollectiveTrace {
 public:
  static constexpr int kKept = 16;
  struct Entry {
    CommCall collective = CommCall::kBarrier;
    ElementType type = ElementType::kNone;
    int64_t count = 0;
    bool operator==(const Entry&) const = default;
  };

  void record(const Entry& e);
  int64_t calls() const { return calls_; }
  // FNV-1a over every entry's bytes so far: equal sequences give equal hashes.
  uint64_t hash() const { return hash_; }
  // The last min(calls, kKept) entries, oldest first.
  std::vector<Entry> last() const;
  // "#41 all_reduce_sum(2 doubles), #42 barrier, ..." over last().
  std::string describe_last() const;

 private:
  uint64_t hash_ = 14695981039346656037ull;  // FNV offset basis
  int64_t calls_ = 0;
  std::array<Entry, kKept> ring_{};
};

class Watchdog {
 public:
  // Exit code of a job the watchdog ends (main.cpp lists the codes).
  static constexpr int kExitCode = 3;
  // Ends the job; called with kExitCode. The real one does not return; a test's may, after
  // which this watchdog stays fired and acts no more.
  using EndJob = std::function<void(int exit_code)>;

  // timeout_s > 0: how long one collective may take. world_rank tags the stderr line.
  Watchdog(double timeout_s, int world_rank, EndJob end_job);
  ~Watchdog();  // stops the thread
  Watchdog(const Watchdog&) = delete;
  Watchdog& operator=(const Watchdog&) = delete;

  double timeout_s() const { return timeout_s_; }

  // Brackets one collective of the calling (main) thread: recorded in `trace`, and in flight
  // until destroyed. One at a time; `group` (the label) must outlive it.
  class Watch {
   public:
    Watch(Watchdog* w, CollectiveTrace* trace, const char* group, int group_size,
          CollectiveTrace::Entry e);
    // An operation of this rank (kCheckpointSave, kCheckpointLoad, kDataWait): not traced;
    // `detail` (a file name, "training batch") is named in the message; deadline_s > 0 replaces
    // timeout_s for it (a checkpoint's size sets how long writing it may take). w may be null.
    // While it lives, Watches begun inside it (the collectives of a checkpoint save) are only
    // traced: the operation's deadline covers them, and its message names it.
    Watch(Watchdog* w, CommCall op, const std::string& detail, double deadline_s = 0.0);
    ~Watch();
    Watch(const Watch&) = delete;
    Watch& operator=(const Watch&) = delete;

   private:
    Watchdog* w_;
    bool operation_ = false;  // the second constructor's
  };

  // The trace of group label `group`, made on first use; its address is stable.
  CollectiveTrace* trace(const std::string& group);
  const std::map<std::string, CollectiveTrace>& traces() const { return traces_; }

  // Called between tests of a pending wait: acts (see the file comment) if the collective in
  // flight is past its deadline.
  void poll();

  // The step in progress (named in the message; 0: before the first step).
  void set_step(int64_t step) { step_.store(step, std::memory_order_relaxed); }
  // After step `step` completed: its per-expert token counts, as the message shows them.
  void set_completed_step(int64_t step, std::string expert_tokens);

  // Removes what it registered when destroyed.
  class Registration {
   public:
    Registration() = default;
    Registration(Watchdog* w, int id) : w_(w), id_(id) {}
    Registration(Registration&& o) noexcept : w_(o.w_), id_(o.id_) { o.w_ = nullptr; }
    Registration& operator=(Registration&& o) noexcept;
    ~Registration();

   private:
    Watchdog* w_ = nullptr;
    int id_ = 0;
  };
  // `write` also gets the message (without the stderr tag): the run's log files.
  [[nodiscard]] Registration log_to(std::function<void(const std::string&)> write);
  // `hook` runs before end_job, on whichever thread acts.
  [[nodiscard]] Registration on_abort(std::function<void()> hook);

  // The message for the collective in flight as if it expired now (tests; "" when none).
  std::string describe_in_flight() const;

 private:
  using Clock = std::chrono::steady_clock;
  static int64_t now_ns();
  void thread_main();
  // Acts on the collective in flight, if it is past start + timeout + extra_ns. Once.
  void check(int64_t extra_ns);
  // Moves the deadline by the time since the last tick if that is a suspension (file comment).
  void tick(int64_t now);
  void fire(const std::string& message);
  void unregister(int id);

  const double timeout_s_;
  const int64_t timeout_ns_, period_ns_;  // deadline, and the thread's check period
  const int64_t suspended_ns_;            // a longer gap between ticks: the process was not run
  const int world_rank_;
  const EndJob end_job_;

  // The collective in flight: start_ns_ 0 when none. Written by the main thread (start last on
  // begin, first on end); generation_ changes with every begin so that a reader can tell the
  // fields it read belong to one collective.
  std::atomic<int64_t> start_ns_{0};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> collective_{0}, type_{0}, group_size_{0};
  std::atomic<int64_t> count_{0}, call_{0};
  std::atomic<int64_t> deadline_ns_{0};  // of the collective or operation in flight
  std::atomic<const char*> group_{nullptr};
  std::atomic<int64_t> step_{0};
  std::atomic<int64_t> last_tick_ns_;
  std::atomic<bool> fired_{false};
  int operations_ = 0;  // operation Watches alive (main thread only)

  std::map<std::string, CollectiveTrace> traces_;  // main thread only

  mutable std::mutex mutex_;  // guards what follows
  int64_t completed_step_ = 0;
  std::string expert_tokens_;
  std::string detail_;  // of the operation in flight (group_size_ 0), else unused
  int next_id_ = 1;
  std::map<int, std::function<void(const std::string&)>> log_writers_;
  std::map<int, std::function<void()>> abort_hooks_;
  bool stop_ = false;
  std::condition_variable wake_;
  std::thread thread_;
};

}  // namespace switcht5
