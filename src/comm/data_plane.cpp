// The data planes behind make_data_plane (comm/data_plane.h):
//   LocalDataPlane  a group of one: sums are the identity, all_to_all a device copy.
//   MpiDataPlane    MpiCommunicator's rank-ordered collectives. Host-accessible memory goes to
//                   MPI as it is; other memory (a device) is staged through host buffers with
//                   Backend::copy_to_host / copy_to_device around the same collective, so both
//                   give bitwise the same results. Every call completes before it returns.
// make_data_plane also hands out NcclDataPlane (comm/nccl/nccl_data_plane.h) in builds with NCCL.
#include "comm/data_plane.h"

#include <algorithm>
#include <numeric>
#include <vector>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "comm/mpi_communicator.h"
#include "core/check.h"
#if defined(SWITCHT5_HAVE_NCCL)
#include "comm/nccl/nccl_data_plane.h"
#endif

namespace switcht5 {
namespace {

void check_counts(std::span<const int64_t> counts, int size) {
  SWT_CHECK(static_cast<int>(counts.size()) == size, "{} block counts for a data plane of {}",
            counts.size(), size);
  for (int64_t c : counts) SWT_CHECK(c >= 0, "negative block count {}", c);
}

class LocalDataPlane final : public DataPlane {
 public:
  explicit LocalDataPlane(Backend& be) : be_(be) {}
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(float*, int64_t n) override { SWT_CHECK(n >= 0, "negative count {}", n); }
  void reduce_scatter_sum(float*, std::span<const int64_t> counts) override {
    check_counts(counts, 1);
  }
  void all_gather(float*, std::span<const int64_t> counts) override { check_counts(counts, 1); }
  void all_to_all(float* out, const float* in, int64_t n) override {
    SWT_CHECK(n >= 0, "negative count {}", n);
    if (out != in && n > 0) be_.copy(out, in, sizeof(float) * static_cast<size_t>(n));
  }
  void broadcast(float*, int64_t, int root) override {
    SWT_CHECK(root == 0, "broadcast root {} is not a rank of a data plane of 1", root);
  }
  void synchronize() override {}

 private:
  Backend& be_;
};

class MpiDataPlane final : public DataPlane {
 public:
  MpiDataPlane(std::unique_ptr<Communicator> comm, Backend& be)
      : owned_(std::move(comm)), comm_(dynamic_cast<MpiCommunicator&>(*owned_)), be_(be),
        staged_(!be.host_accessible()) {}

  int rank() const override { return comm_.rank(); }
  int size() const override { return comm_.size(); }

  void all_reduce_sum(float* data, int64_t n) override {
    count(Collective::kAllReduce, n);
    if (!staged_) {
      be_.synchronize();  // the backend's writes to `data` are done before MPI reads it
      return comm_.all_reduce_sum(data, n);
    }
    // Elementwise: staging in pieces gives the same sums and bounds the host buffer.
    for (int64_t k = 0; k < n; k += kStagingPiece) {
      const int64_t c = std::min(kStagingPiece, n - k);
      float* h = host(0, c);
      to_host(h, data + k, c);
      comm_.all_reduce_sum(h, c);
      to_device(data + k, h, c);
    }
  }

  void reduce_scatter_sum(float* data, std::span<const int64_t> counts) override {
    check_counts(counts, size());
    count(Collective::kReduceScatter, std::accumulate(counts.begin(), counts.end(), int64_t{0}));
    if (!staged_) {
      be_.synchronize();
      return comm_.reduce_scatter_sum_v(data, counts);
    }
    const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    const int64_t start = std::accumulate(counts.begin(), counts.begin() + rank(), int64_t{0});
    float* h = host(0, total);
    to_host(h, data, total);  // every block: each is some rank's input
    comm_.reduce_scatter_sum_v(h, counts);
    to_device(data + start, h + start, counts[size_t(rank())]);  // only this rank's block changed
  }

  void all_gather(float* data, std::span<const int64_t> counts) override {
    check_counts(counts, size());
    count(Collective::kAllGather, std::accumulate(counts.begin(), counts.end(), int64_t{0}));
    if (!staged_) {
      be_.synchronize();
      return comm_.all_gather_v(data, counts);
    }
    const int64_t total = std::accumulate(counts.begin(), counts.end(), int64_t{0});
    const int64_t start = std::accumulate(counts.begin(), counts.begin() + rank(), int64_t{0});
    float* h = host(0, total);
    to_host(h + start, data + start, counts[size_t(rank())]);  // the one block this rank sends
    comm_.all_gather_v(h, counts);
    to_device(data, h, total);
  }

  void all_to_all(float* out, const float* in, int64_t n) override {
    count(Collective::kAllToAll, n * size());
    if (!staged_) {
      be_.synchronize();
      return comm_.all_to_all(out, in, n);
    }
    const int64_t total = n * size();
    float* hin = host(0, total);
    float* hout = host(1, total);
    to_host(hin, in, total);
    comm_.all_to_all(hout, hin, n);
    to_device(out, hout, total);
  }

  void broadcast(float* data, int64_t n, int root) override {
    count(Collective::kBroadcast, n);
    if (!staged_) {
      be_.synchronize();
      return comm_.broadcast(data, n, root);
    }
    for (int64_t k = 0; k < n; k += kStagingPiece) {
      const int64_t c = std::min(kStagingPiece, n - k);
      float* h = host(0, c);
      if (rank() == root) to_host(h, data + k, c);
      comm_.broadcast(h, c, root);
      if (rank() != root) to_device(data + k, h, c);
    }
  }

  void synchronize() override {}  // every call has completed already

 private:
  // Floats per staging copy of the elementwise collectives (16 MB).
  static constexpr int64_t kStagingPiece = int64_t{4} << 20;

  // Host staging buffer `which` (0 or 1) of at least n floats, grown on demand and kept, so a
  // steady-state step allocates nothing.
  float* host(int which, int64_t n) {
    std::vector<float>& b = staging_[which];
    if (static_cast<int64_t>(b.size()) < n) b.resize(static_cast<size_t>(n));
    return b.data();
  }
  void to_host(float* h, const float* d, int64_t n) {
    if (n > 0) be_.copy_to_host(h, d, sizeof(float) * static_cast<size_t>(n));
  }
  void to_device(float* d, const float* h, int64_t n) {
    if (n > 0) be_.copy_to_device(d, h, sizeof(float) * static_cast<size_t>(n));
  }

  std::unique_ptr<Communicator> owned_;
  MpiCommunicator& comm_;
  Backend& be_;
  bool staged_;
  std::vector<float> staging_[2];
};

class BackendCommunicator final : public Communicator {
 public:
  BackendCommunicator(DataPlane& plane, Communicator& control, Backend& be)
      : plane_(plane), control_(control), be_(be) {
    SWT_CHECK(plane.size() == control.size() && plane.rank() == control.rank(),
              "data plane rank {} of {} over a control communicator's rank {} of {}",
              plane.rank(), plane.size(), control.rank(), control.size());
  }
  int rank() const override { return plane_.rank(); }
  int size() const override { return plane_.size(); }

  void all_reduce_sum(float* data, int64_t n) override { plane_.all_reduce_sum(data, n); }
  void all_reduce_sum(double* data, int64_t n) override { control_.all_reduce_sum(data, n); }
  void all_reduce_sum(int64_t* data, int64_t n) override { control_.all_reduce_sum(data, n); }
  void all_reduce_max(int64_t* data, int64_t n) override { control_.all_reduce_max(data, n); }

  void reduce_scatter_sum(float* out, const float* in, int64_t n) override {
    SWT_CHECK(n >= 0, "negative count {}", n);
    const int64_t total = n * size();
    if (scratch_.size() < total) scratch_ = DeviceArray<float>(be_, total);
    copy(scratch_.data(), in, total);
    counts_.assign(size_t(size()), n);
    plane_.reduce_scatter_sum(scratch_.data(), counts_);
    plane_.synchronize();
    copy(out, scratch_.data() + n * rank(), n);
  }
  void all_gather(float* out, const float* in, int64_t n) override {
    SWT_CHECK(n >= 0, "negative count {}", n);
    copy(out + n * rank(), in, n);
    counts_.assign(size_t(size()), n);
    plane_.all_gather(out, counts_);
    plane_.synchronize();
  }
  void all_to_all(float* out, const float* in, int64_t n) override {
    plane_.all_to_all(out, in, n);
    plane_.synchronize();
  }
  void broadcast(float* data, int64_t n, int root) override {
    plane_.broadcast(data, n, root);
    plane_.synchronize();
  }
  void broadcast(std::string& data, int root) override { control_.broadcast(data, root); }
  void barrier() override { control_.barrier(); }
  std::unique_ptr<Communicator> split(int, int) const override {
    throw Error("a backend communicator cannot split: make a data plane over the split group");
  }

 private:
  void copy(float* dst, const float* src, int64_t n) {
    if (n > 0 && dst != src) be_.copy(dst, src, sizeof(float) * static_cast<size_t>(n));
  }

  DataPlane& plane_;
  Communicator& control_;
  Backend& be_;
  DeviceArray<float> scratch_;
  std::vector<int64_t> counts_;
};

}  // namespace

const char* collective_name(Collective c) {
  switch (c) {
    case Collective::kAllReduce: return "all_reduce";
    case Collective::kReduceScatter: return "reduce_scatter";
    case Collective::kAllGather: return "all_gather";
    case Collective::kAllToAll: return "all_to_all";
    case Collective::kBroadcast: return "broadcast";
  }
  return "?";
}

std::unique_ptr<Communicator> make_backend_communicator(DataPlane& plane, Communicator& control,
                                                        Backend& be) {
  return std::make_unique<BackendCommunicator>(plane, control, be);
}

DataPlaneKind data_plane_kind(const std::string& name) {
  if (name == "mpi") return DataPlaneKind::kMpi;
  if (name == "nccl") return DataPlaneKind::kNccl;
  throw Error(fmt::format("parallel.data_plane: got \"{}\", expected mpi or nccl", name));
}

std::unique_ptr<DataPlane> make_data_plane(const Communicator& group, Backend& be,
                                           DataPlaneKind kind) {
  if (kind == DataPlaneKind::kNccl) {
#if defined(SWITCHT5_HAVE_NCCL)
    auto* cuda = dynamic_cast<CudaBackend*>(&be);
    SWT_USER_CHECK(cuda != nullptr,
                   "parallel.data_plane: nccl moves CUDA device memory and needs train.backend: "
                   "cuda (this run's backend is '{}'; use parallel.data_plane: mpi)",
                   be.name());
    if (group.size() == 1) return std::make_unique<LocalDataPlane>(be);
    return std::make_unique<NcclDataPlane>(group, *cuda);
#else
    throw UserError(
        "parallel.data_plane: nccl, but this build has no NCCL (configure with "
        "-DSWITCHT5_CUDA=ON where nccl.h and libnccl are installed, e.g. with the CUDA toolkit "
        "under /usr/local/cuda; or use parallel.data_plane: mpi)");
#endif
  }
  if (group.size() == 1) return std::make_unique<LocalDataPlane>(be);
  SWT_CHECK(dynamic_cast<const MpiCommunicator*>(&group) != nullptr,
            "a data plane over {} ranks needs an MPI communicator", group.size());
  return std::make_unique<MpiDataPlane>(group.split(0, group.rank()), be);
}

}  // namespace switcht5
