// MpiCommunicator: collectives from point-to-point messages in a fixed order (see the header).
#include "comm/mpi_communicator.h"
#include "comm/mpi_native.h"

#include <mpi.h>

#include <algorithm>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "core/check.h"

namespace switcht5 {

namespace detail {
struct MpiState {
  MPI_Comm comm = MPI_COMM_NULL;
  std::vector<MPI_Request> requests;  // one round's receives and sends, reused
  // Reduce-scatter receive buffers, grown on demand and kept, so a steady-state training step
  // does not allocate.
  std::tuple<std::vector<float>, std::vector<double>, std::vector<int64_t>> scratch;
  std::vector<int64_t> block_starts;  // of the variable-block collectives
  // attach_watchdog: the deadline and the trace of this communicator's group (label `group`).
  Watchdog* watchdog = nullptr;
  CollectiveTrace* trace = nullptr;
  std::string group;
};
}  // namespace detail

namespace {

using detail::MpiState;

// Point-to-point tag of every message; MPI's non-overtaking rule keeps messages between two
// ranks in order, and collectives called in the same order on every rank match up round by round.
constexpr int kTag = 17;

void check_mpi(int rc, const char* call, const char* file, int line) {
  if (rc == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING];
  int len = 0;
  MPI_Error_string(rc, text, &len);
  throw Error(fmt::format("{}:{}: {} failed: {}", file, line, call, std::string(text, len)));
}
#define SWT_MPI(call) check_mpi((call), #call, __FILE__, __LINE__)

template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>) return MPI_FLOAT;
  if constexpr (std::is_same_v<T, double>) return MPI_DOUBLE;
  if constexpr (std::is_same_v<T, int64_t>) return MPI_INT64_T;
  static_assert(std::is_same_v<T, char> || std::is_same_v<T, float> || std::is_same_v<T, double> ||
                std::is_same_v<T, int64_t>);
  return MPI_CHAR;
}

bool mpi_is_running() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized;
}

// Waits for st.requests, polling so that the watchdog can act on this thread (see the header).
void wait_all(MpiState& st) {
  int done = 0;
  for (;;) {
    SWT_MPI(MPI_Testall(static_cast<int>(st.requests.size()), st.requests.data(), &done,
                        MPI_STATUSES_IGNORE));
    if (done) return;
    if (st.watchdog) st.watchdog->poll();
  }
}

// A blocking collective, started non-blocking and waited for as above.
template <class Start>
void run_polled(MpiState& st, Start start) {
  st.requests.clear();
  MPI_Request req;
  start(&req);
  st.requests.push_back(req);
  wait_all(st);
}

template <class T>
T* scratch(MpiState& st, int64_t n) {
  auto& v = std::get<std::vector<T>>(st.scratch);
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
  return v.data();
}

template <class T>
int64_t chunk_elems(int64_t max_chunk_bytes) {
  return std::max<int64_t>(1, max_chunk_bytes / static_cast<int64_t>(sizeof(T)));
}

void check_count(int64_t n) { SWT_CHECK(n >= 0, "negative element count {}", n); }

// One round of a personalised exchange over all ranks: rank q receives block q of every rank's
// send side, and block q of the receive side comes from rank q. send_block(q) and
// recv_block(q) return {pointer, count}; counts fit an int (callers cut rounds to the chunk
// size) and agree pairwise because both sides derive them from the same arguments. The rank's
// own block is copied locally. Returns when every message of the round has completed.
template <class T, class SendBlock, class RecvBlock>
void exchange(MpiState& st, int rank, int size, SendBlock send_block, RecvBlock recv_block) {
  st.requests.clear();
  for (int i = 1; i < size; ++i) {
    const int q = (rank + size - i) % size;
    auto [ptr, count] = recv_block(q);
    if (count == 0) continue;
    MPI_Request req;
    SWT_MPI(MPI_Irecv(ptr, static_cast<int>(count), mpi_type<T>(), q, kTag, st.comm, &req));
    st.requests.push_back(req);
  }
  for (int i = 1; i < size; ++i) {
    const int q = (rank + i) % size;
    auto [ptr, count] = send_block(q);
    if (count == 0) continue;
    MPI_Request req;
    SWT_MPI(MPI_Isend(ptr, static_cast<int>(count), mpi_type<T>(), q, kTag, st.comm, &req));
    st.requests.push_back(req);
  }
  auto [own_in, own_count] = send_block(rank);
  auto [own_out, own_out_count] = recv_block(rank);
  SWT_CHECK(own_count == own_out_count, "exchange: own block of {} elements into {}", own_count,
            own_out_count);
  if (own_count > 0 && own_in != own_out) std::memcpy(own_out, own_in, sizeof(T) * own_count);
  wait_all(st);
}

template <class T>
std::pair<const T*, int64_t> block(const T* p, int64_t count) {
  return {p, count};
}
template <class T>
std::pair<T*, int64_t> block(T* p, int64_t count) {
  return {p, count};
}

// out[0, len) = ((v_0 op v_1) op v_2) ... op v_{size-1}, v_q = src + q * len: rank order.
template <class T, class Op>
void reduce_in_rank_order(T* out, const T* src, int64_t len, int size, Op op) {
  std::copy_n(src, len, out);
  for (int q = 1; q < size; ++q) {
    const T* v = src + q * len;
    for (int64_t i = 0; i < len; ++i) out[i] = op(out[i], v[i]);
  }
}

// Reduce-scatter of fixed blocks, then all-gather, one round of L elements at a time. Within a
// round, block q = [L*q/size, L*(q+1)/size) is reduced by rank q in rank order.
template <class T, class Op>
void all_reduce(MpiState& st, int rank, int size, T* data, int64_t n, int64_t max_chunk_bytes,
                Op op) {
  check_count(n);
  if (size == 1 || n == 0) return;
  const int64_t round = std::max<int64_t>(chunk_elems<T>(max_chunk_bytes), size);
  // `size` blocks of at most ceil(round_len / size) elements, round_len <= min(round, n).
  T* recv = scratch<T>(st, std::min(round, n) + size);
  for (int64_t off = 0; off < n; off += round) {
    const int64_t round_len = std::min(round, n - off);
    T* x = data + off;
    auto begin = [&](int q) { return round_len * q / size; };
    auto extent = [&](int q) { return begin(q + 1) - begin(q); };
    const int64_t len = extent(rank);
    T* mine = x + begin(rank);
    // Reduce-scatter: rank q's copy of my block lands in recv block q.
    exchange<T>(
        st, rank, size, [&](int q) { return block<T>(x + begin(q), extent(q)); },
        [&](int q) { return block<T>(recv + q * len, len); });
    reduce_in_rank_order(mine, recv, len, size, op);
    // All-gather: block q comes from rank q.
    exchange<T>(
        st, rank, size, [&](int) { return block<T>(mine, len); },
        [&](int q) { return block<T>(x + begin(q), extent(q)); });
  }
}

struct Sum {
  template <class T>
  T operator()(T a, T b) const {
    return a + b;
  }
};
struct Max {
  template <class T>
  T operator()(T a, T b) const {
    return std::max(a, b);
  }
};

template <class T>
void bcast(MpiState& st, int size, T* data, int64_t n, int root, int64_t max_chunk_bytes) {
  check_count(n);
  SWT_CHECK(root >= 0 && root < size, "broadcast root {} is not a rank of a {}-rank communicator",
            root, size);
  const int64_t piece = chunk_elems<T>(max_chunk_bytes);
  for (int64_t off = 0; off < n; off += piece) {
    const int count = static_cast<int>(std::min(piece, n - off));
    run_polled(st, [&](MPI_Request* req) {
      SWT_MPI(MPI_Ibcast(data + off, count, mpi_type<T>(), root, st.comm, req));
    });
  }
}

void finalize_mpi_at_exit() {
  if (mpi_is_running()) MPI_Finalize();
}

}  // namespace

MpiCommunicator::MpiCommunicator(std::unique_ptr<detail::MpiState> state)
    : state_(std::move(state)) {
  SWT_CHECK(state_ && state_->comm != MPI_COMM_NULL, "MpiCommunicator needs a communicator");
  // Errors come back as return codes and become exceptions (one error path, STYLE habit 6).
  SWT_MPI(MPI_Comm_set_errhandler(state_->comm, MPI_ERRORS_RETURN));
  SWT_MPI(MPI_Comm_rank(state_->comm, &rank_));
  SWT_MPI(MPI_Comm_size(state_->comm, &size_));
  state_->requests.reserve(2 * static_cast<size_t>(size_));
}

MpiCommunicator::~MpiCommunicator() {
  // After MPI_Finalize (a communicator outliving main) there is nothing left to free.
  if (state_ && state_->comm != MPI_COMM_NULL && mpi_is_running()) MPI_Comm_free(&state_->comm);
}

void MpiCommunicator::set_max_chunk_bytes(int64_t bytes) {
  max_chunk_bytes_ = std::clamp<int64_t>(bytes, 1, INT_MAX);
}

void MpiCommunicator::all_reduce_sum(float* data, int64_t n) {
  const auto w = watch(CommCall::kAllReduceSum, ElementType::kFloat, n);
  all_reduce(*state_, rank_, size_, data, n, max_chunk_bytes_, Sum{});
}
void MpiCommunicator::all_reduce_sum(double* data, int64_t n) {
  const auto w = watch(CommCall::kAllReduceSum, ElementType::kDouble, n);
  all_reduce(*state_, rank_, size_, data, n, max_chunk_bytes_, Sum{});
}
void MpiCommunicator::all_reduce_sum(int64_t* data, int64_t n) {
  const auto w = watch(CommCall::kAllReduceSum, ElementType::kInt64, n);
  all_reduce(*state_, rank_, size_, data, n, max_chunk_bytes_, Sum{});
}
void MpiCommunicator::all_reduce_max(int64_t* data, int64_t n) {
  const auto w = watch(CommCall::kAllReduceMax, ElementType::kInt64, n);
  all_reduce(*state_, rank_, size_, data, n, max_chunk_bytes_, Max{});
}

void MpiCommunicator::reduce_scatter_sum(float* out, const float* in, int64_t n) {
  check_count(n);
  const auto w = watch(CommCall::kReduceScatterSum, ElementType::kFloat, n);
  // Pieces [k, k + c) of every block per round: recv holds the `size` contributions to mine.
  const int64_t piece = std::max<int64_t>(1, chunk_elems<float>(max_chunk_bytes_) / size_);
  float* recv = scratch<float>(*state_, std::min(piece, n) * size_);
  for (int64_t k = 0; k < n; k += piece) {
    const int64_t c = std::min(piece, n - k);
    exchange<float>(
        *state_, rank_, size_, [&](int q) { return block<float>(in + q * n + k, c); },
        [&](int q) { return block<float>(recv + q * c, c); });
    reduce_in_rank_order(out + k, recv, c, size_, Sum{});
  }
}

namespace {

// Block starts of an in-place variable-block collective: starts[r] = counts[0] + ... +
// counts[r-1]; returns the largest block.
int64_t block_starts(std::span<const int64_t> counts, int size, std::vector<int64_t>& starts) {
  SWT_CHECK(static_cast<int>(counts.size()) == size, "{} block counts for a {}-rank communicator",
            counts.size(), size);
  starts.resize(counts.size());
  int64_t at = 0, largest = 0;
  for (size_t r = 0; r < counts.size(); ++r) {
    check_count(counts[r]);
    starts[r] = at;
    at += counts[r];
    largest = std::max(largest, counts[r]);
  }
  return largest;
}

}  // namespace

void MpiCommunicator::reduce_scatter_sum_v(float* data, std::span<const int64_t> counts) {
  std::vector<int64_t>& starts = state_->block_starts;
  const int64_t largest = block_starts(counts, size_, starts);
  const auto w =
      watch(CommCall::kReduceScatterSum, ElementType::kFloat, starts.back() + counts.back());
  const int64_t piece = std::max<int64_t>(1, chunk_elems<float>(max_chunk_bytes_) / size_);
  float* recv = scratch<float>(*state_, std::min(piece, largest) * size_);
  // Every rank runs the same rounds (the largest block decides); piece k of a shorter block is
  // empty once k passes its end.
  for (int64_t k = 0; k < largest; k += piece) {
    auto part = [&](int q) { return std::clamp<int64_t>(counts[size_t(q)] - k, 0, piece); };
    const int64_t c = part(rank_);
    exchange<float>(
        *state_, rank_, size_, [&](int q) { return block<float>(data + starts[q] + k, part(q)); },
        [&](int q) { return block<float>(recv + q * c, c); });
    if (c > 0) reduce_in_rank_order(data + starts[rank_] + k, recv, c, size_, Sum{});
  }
}

void MpiCommunicator::all_gather_v(float* data, std::span<const int64_t> counts) {
  std::vector<int64_t>& starts = state_->block_starts;
  const int64_t largest = block_starts(counts, size_, starts);
  const auto w =
      watch(CommCall::kAllGather, ElementType::kFloat, starts.back() + counts.back());
  const int64_t piece = chunk_elems<float>(max_chunk_bytes_);
  for (int64_t k = 0; k < largest; k += piece) {
    auto part = [&](int q) { return std::clamp<int64_t>(counts[size_t(q)] - k, 0, piece); };
    float* mine = data + starts[rank_] + k;
    exchange<float>(
        *state_, rank_, size_, [&](int) { return block<float>(mine, part(rank_)); },
        [&](int q) { return block<float>(data + starts[q] + k, part(q)); });
  }
}

void MpiCommunicator::all_gather(float* out, const float* in, int64_t n) {
  check_count(n);
  const auto w = watch(CommCall::kAllGather, ElementType::kFloat, n);
  const int64_t piece = chunk_elems<float>(max_chunk_bytes_);
  for (int64_t k = 0; k < n; k += piece) {
    const int64_t c = std::min(piece, n - k);
    exchange<float>(
        *state_, rank_, size_, [&](int) { return block<float>(in + k, c); },
        [&](int q) { return block<float>(out + q * n + k, c); });
  }
}

void MpiCommunicator::all_to_all(float* out, const float* in, int64_t n) {
  check_count(n);
  const auto w = watch(CommCall::kAllToAll, ElementType::kFloat, n);
  const int64_t piece = chunk_elems<float>(max_chunk_bytes_);
  for (int64_t k = 0; k < n; k += piece) {
    const int64_t c = std::min(piece, n - k);
    exchange<float>(
        *state_, rank_, size_, [&](int q) { return block<float>(in + q * n + k, c); },
        [&](int q) { return block<float>(out + q * n + k, c); });
  }
}

void MpiCommunicator::broadcast(float* data, int64_t n, int root) {
  const auto w = watch(CommCall::kBroadcast, ElementType::kFloat, n);
  bcast(*state_, size_, data, n, root, max_chunk_bytes_);
}

void MpiCommunicator::broadcast(std::string& data, int root) {
  const auto w = watch(CommCall::kBroadcast, ElementType::kNone, 0);  // lengths differ
  int64_t length = static_cast<int64_t>(data.size());
  bcast(*state_, size_, &length, 1, root, max_chunk_bytes_);
  data.resize(static_cast<size_t>(length));
  bcast(*state_, size_, data.data(), length, root, max_chunk_bytes_);
}

void MpiCommunicator::barrier() {
  const auto w = watch(CommCall::kBarrier, ElementType::kNone, 0);
  run_polled(*state_, [&](MPI_Request* req) { SWT_MPI(MPI_Ibarrier(state_->comm, req)); });
}

void MpiCommunicator::attach_watchdog(Watchdog& watchdog, const std::string& group) {
  state_->watchdog = &watchdog;
  state_->trace = watchdog.trace(group);
  state_->group = group;
}

Watchdog::Watch MpiCommunicator::watch(CommCall c, ElementType t, int64_t count) const {
  return Watchdog::Watch(state_->watchdog, state_->trace, state_->group.c_str(), size_,
                         {c, t, count});
}

std::unique_ptr<MpiCommunicator> MpiCommunicator::derived(std::unique_ptr<detail::MpiState> st,
                                                          const std::string& group) const {
  auto sub = std::make_unique<MpiCommunicator>(std::move(st));
  sub->max_chunk_bytes_ = max_chunk_bytes_;
  if (state_->watchdog) sub->attach_watchdog(*state_->watchdog, group);
  return sub;
}

std::unique_ptr<Communicator> MpiCommunicator::split(int color, int key) const {
  SWT_CHECK(color >= 0, "split: color must be >= 0, got {}", color);
  auto st = std::make_unique<detail::MpiState>();
  {
    // Blocking inside MPI: only the watchdog's thread can act on its deadline.
    const auto w = watch(CommCall::kSplit, ElementType::kNone, 0);
    SWT_MPI(MPI_Comm_split(state_->comm, color, key, &st->comm));
  }
  return derived(std::move(st), state_->group);
}

std::unique_ptr<Communicator> MpiCommunicator::split_by_node() const {
  auto st = std::make_unique<detail::MpiState>();
  {
    const auto w = watch(CommCall::kSplit, ElementType::kNone, 0);
    SWT_MPI(MPI_Comm_split_type(state_->comm, MPI_COMM_TYPE_SHARED, rank_, MPI_INFO_NULL,
                                &st->comm));
  }
  return derived(std::move(st), "node");
}

MPI_Comm native_mpi_comm(const Communicator& comm) {
  const auto* mpi = dynamic_cast<const MpiCommunicator*>(&comm);
  return mpi ? mpi->mpi_state().comm : MPI_COMM_NULL;
}

std::unique_ptr<Communicator> mpi_world() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  SWT_CHECK(!finalized, "mpi_world() called after MPI was finalized");
  if (!initialized) {
    int provided = 0;
    if (MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
      std::fprintf(stderr,
                   "switcht5: warning: MPI could not be initialised; running as one process\n");
      return make_self_communicator();
    }
    std::atexit(finalize_mpi_at_exit);
    SWT_CHECK(provided >= MPI_THREAD_FUNNELED,
              "this MPI library provides thread level {}, below MPI_THREAD_FUNNELED", provided);
  }
  auto st = std::make_unique<detail::MpiState>();
  SWT_MPI(MPI_Comm_dup(MPI_COMM_WORLD, &st->comm));
  return std::make_unique<MpiCommunicator>(std::move(st));
}

void abort_all_ranks(int code) {
  std::fflush(stdout);
  std::fflush(stderr);
  int world_size = 1;
  if (mpi_is_running()) MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  // One rank: a normal exit (finalizes MPI) without Open MPI's multi-line MPI_ABORT banner.
  if (world_size == 1) std::exit(code);
  MPI_Abort(MPI_COMM_WORLD, code);
  std::_Exit(code);  // MPI_Abort does not return; this keeps [[noreturn]] honest if it did
}

}  // namespace switcht5
