// Checkpoint files over parallel HDF5 (see h5_file.h).
//
// Collective rules of parallel HDF5 that shape this file: every rank creates the same groups,
// datasets and attributes in the same order with the same arguments (metadata is collective),
// and, with collective transfers, every rank calls H5Dwrite / H5Dread the same number of times
// per dataset, a rank with nothing to move selecting none. Blocks are moved in pieces (of at most
// PieceLimits::host_bytes from host memory, or staging_bytes through the host staging buffer),
// and the number of pieces per dataset is agreed by an all-reduce. Checksums are computed piece
// by piece on the host copy that is written or was read, so a checksum always covers the bytes
// that went to or came from the file.
#include "checkpoint/h5_file.h"

#include <hdf5.h>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <functional>
#include <unordered_map>

#include "backend/backend.h"
#include "comm/communicator.h"
#include "comm/mpi_native.h"
#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {

namespace {

// The innermost messages of HDF5's error stack (e.g. "truncated file: eof = ..."), for errors.
std::string h5_error_text() {
  std::vector<std::string> descs;
  H5Ewalk2(
      H5E_DEFAULT, H5E_WALK_DOWNWARD,
      [](unsigned, const H5E_error2_t* e, void* out) -> herr_t {
        if (e->desc && *e->desc) static_cast<std::vector<std::string>*>(out)->push_back(e->desc);
        return 0;
      },
      &descs);
  H5Eclear2(H5E_DEFAULT);
  return descs.empty() ? std::string("HDF5 error") : descs.back();
}

// Owns an hid_t and closes it with the matching H5?close.
class Handle {
 public:
  Handle() = default;
  Handle(hid_t id, herr_t (*close)(hid_t)) : id_(id), close_(close) {}
  Handle(Handle&& o) noexcept : id_(o.id_), close_(o.close_) { o.id_ = H5I_INVALID_HID; }
  Handle& operator=(Handle&& o) noexcept {
    std::swap(id_, o.id_);
    std::swap(close_, o.close_);
    return *this;
  }
  ~Handle() {
    if (id_ >= 0 && close_) close_(id_);
  }
  hid_t get() const { return id_; }
  // Closes now and reports the result (a file's close is collective and flushes).
  herr_t close() {
    const herr_t rc = id_ >= 0 && close_ ? close_(id_) : 0;
    id_ = H5I_INVALID_HID;
    return rc;
  }
  // Forgets the id without closing it (see write_h5_checkpoint: a file HDF5 cannot flush).
  void release() { id_ = H5I_INVALID_HID; }

 private:
  hid_t id_ = H5I_INVALID_HID;
  herr_t (*close_)(hid_t) = nullptr;
};

// Internal failures (a write or close that should not fail) throw Error; reading what a user
// gave us throws UserError from the callers.
hid_t check_id(hid_t id, const std::string& file, const char* what) {
  if (id < 0) throw Error(fmt::format("{}: {} failed: {}", file, what, h5_error_text()));
  return id;
}
void check_status(herr_t rc, const std::string& file, const char* what) {
  if (rc < 0) throw Error(fmt::format("{}: {} failed: {}", file, what, h5_error_text()));
}

void quiet_hdf5() { H5Eset_auto2(H5E_DEFAULT, nullptr, nullptr); }

// The OS reason of a failed write in HDF5's error text (h5_error_text), or "" when it names
// none. The POSIX driver reports the errno ("... errno = 28, error message = 'No space left on
// device' ..."); the MPI-IO driver the MPI error string, whose error class Open MPI and MPICH
// put first ("MPI_ERR_NO_SPACE: ...").
std::string storage_reason(const std::string& text) {
  const size_t at = text.find("errno = ");
  if (at != std::string::npos) {
    const int err = std::atoi(text.c_str() + at + 8);
    if (err > 0) return std::strerror(err);
  }
  static const struct {
    const char* mpi_class;
    int err;
  } kClasses[] = {{"MPI_ERR_NO_SPACE", ENOSPC}, {"MPI_ERR_QUOTA", EDQUOT},
                  {"MPI_ERR_READ_ONLY", EROFS}, {"MPI_ERR_ACCESS", EACCES},
                  {"MPI_ERR_NO_SUCH_FILE", ENOENT}, {"MPI_ERR_IO", EIO}};
  for (const auto& c : kClasses)
    if (text.find(c.mpi_class) != std::string::npos) return std::strerror(c.err);
  return "";
}

// Asks the OS why writes to `path` fail, for a failure HDF5 reports without a reason (the
// MPI-IO driver sees a short write, which carries no errno): one byte written a block past the
// end of the file needs a new block, which a full disk (ENOSPC), a quota (EDQUOT), a size limit
// (EFBIG) or a failing device (EIO) refuses, saying why. "" when it is written (the file is
// then cut back to its size).
std::string probe_write(const std::string& path) {
  const int fd = ::open(path.c_str(), O_WRONLY);
  if (fd < 0) return std::strerror(errno);
  std::string reason;
  struct stat st {};
  if (::fstat(fd, &st) == 0) {
    const off_t block = st.st_blksize > 0 ? st.st_blksize : 4096;
    const off_t at = (st.st_size + block - 1) / block * block + block;
    const char zero = 0;
    if (::pwrite(fd, &zero, 1, at) != 1)
      reason = std::strerror(errno);
    else
      (void)::ftruncate(fd, st.st_size);
  }
  ::close(fd);
  return reason;
}

// One process (HDF5's POSIX driver): points the open file's descriptor at an anonymous memory
// file, so that whatever HDF5 writes from then on (closing a file whose write failed) lands in
// memory that is dropped with it. False when it cannot.
bool redirect_to_memory(hid_t file) {
  void* handle = nullptr;
  if (H5Fget_vfd_handle(file, H5P_DEFAULT, &handle) < 0 || handle == nullptr) return false;
  const int fd = *static_cast<int*>(handle);
  const int memory = ::memfd_create("switcht5-discarded-checkpoint", MFD_CLOEXEC);
  if (memory < 0) return false;
  const bool ok = ::dup2(memory, fd) == fd;
  ::close(memory);
  return ok;
}

// The steps of a collective write of `path`, each agreed by every rank: a step is a function
// that makes the same collective HDF5 calls on every rank, and after it the ranks learn whether
// it threw on any of them. Parallel HDF5 reports a failed write only to the ranks whose MPI-IO
// call saw it (the aggregators of a collective write, rank 0 alone for a metadata flush), so
// without agreeing the others would go on to the next collective call and wait there forever.
// The first failing step's error, from the lowest failing rank, is kept on every rank.
class AgreedSteps {
 public:
  // `what`: the file's contents, for the message ("the checkpoint").
  AgreedSteps(Communicator& comm, std::string path, std::string what)
      : comm_(comm), path_(std::move(path)), what_(std::move(what)) {}
  // Runs `step`; true when it threw on any rank.
  bool failed(const std::function<void()>& step) {
    std::string mine;  // "<OS reason or empty>\n<error text>" where this rank failed
    try {
      step();
    } catch (const std::exception& e) {
      std::string reason = storage_reason(e.what());
      if (reason.empty()) reason = probe_write(path_);
      mine = reason + "\n" + e.what();
    }
    int64_t first = mine.empty() ? 0 : comm_.size() - comm_.rank();  // max: the lowest rank
    comm_.all_reduce_max(&first, 1);
    if (first == 0) return false;
    comm_.broadcast(mine, comm_.size() - int(first));
    if (error_.empty()) error_ = mine;
    return true;
  }
  // The agreed error as one line: an AgreedUserError with the OS reason (every rank of the job
  // throws it -- the writers' `comm` is the whole job -- so rank 0 alone reports it and no rank
  // aborts the others before they are done), an Error with HDF5's text when the OS gave none.
  [[noreturn]] void throw_error() const {
    const size_t cut = error_.find('\n');
    const std::string reason = error_.substr(0, cut);
    if (!reason.empty())
      throw AgreedUserError(fmt::format("{}: cannot write {}: {}", path_, what_, reason));
    std::string text = error_.substr(cut + 1);
    std::replace(text.begin(), text.end(), '\n', ' ');
    throw Error(fmt::format("{}: cannot write {}: {}", path_, what_, text));
  }

 private:
  Communicator& comm_;
  std::string path_, what_;
  std::string error_;
};

// After a failed write of `path` (agreed by `steps`): closes `file` (its datasets closed
// before) and removes the file, on every rank of `comm`, then throws the agreed error.
//
// HDF5 1.10 keeps the file's unwritten metadata and writes it again when the file is closed,
// and a close whose flush fails frees the file but keeps its id: HDF5's exit handler (atexit,
// or MPI_Finalize) then closes that id again and crashes, a segmentation fault after the error
// was printed. That holds for a file left open too, so the flush must succeed. The file is
// discarded anyway: with one process HDF5's remaining writes are sent to memory
// (redirect_to_memory), which takes them whatever the disk refused; with several (MPI-IO, no
// descriptor to redirect) the file is emptied, which frees its space, so that the flush, which
// writes only metadata, succeeds on a disk that the data filled. Should it fail still (an I/O
// error that persists), the file is left open: the job then ends through MPI_Abort, which runs
// no exit handler.
[[noreturn]] void discard_failed_file(Handle& file, Communicator& comm, AgreedSteps& steps,
                                      const std::string& path) {
  if (file.get() >= 0) {
    if (comm.size() > 1 || !redirect_to_memory(file.get())) {
      if (comm.rank() == 0) (void)::truncate(path.c_str(), 0);
      comm.barrier();  // emptied before any rank writes again
    }
    if (steps.failed([&] {
          check_status(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), path, "H5Fflush");
        }))
      file.release();
    else
      (void)file.close();
  }
  if (comm.rank() == 0) ::unlink(path.c_str());
  steps.throw_error();
}

std::vector<hsize_t> dims_of(const std::vector<int64_t>& v) {
  return std::vector<hsize_t>(v.begin(), v.end());
}

int64_t product(const std::vector<int64_t>& v) {
  int64_t n = 1;
  for (int64_t d : v) n *= d;
  return n;
}

std::string shape_text(const std::vector<int64_t>& s) { return fmt::format("[{}]", fmt::join(s, ", ")); }

// A file access list: MPI-IO over `comm` when it is an MPI communicator of several ranks,
// otherwise the default (POSIX) driver. Superblock format 1.8+ so attributes may exceed 64 KiB
// (dense attribute storage; h5py and HDF5 >= 1.8 read it).
Handle file_access(Communicator& comm) {
  Handle fapl(H5Pcreate(H5P_FILE_ACCESS), H5Pclose);
  H5Pset_libver_bounds(fapl.get(), H5F_LIBVER_V18, H5F_LIBVER_LATEST);
  if (comm.size() > 1) {
    MPI_Comm mc = native_mpi_comm(comm);
    SWT_CHECK(mc != MPI_COMM_NULL, "parallel HDF5 needs an MPI communicator ({} ranks)",
              comm.size());
    check_status(H5Pset_fapl_mpio(fapl.get(), mc, MPI_INFO_NULL), "", "H5Pset_fapl_mpio");
    H5Pset_all_coll_metadata_ops(fapl.get(), true);
    H5Pset_coll_metadata_write(fapl.get(), true);
  }
  return fapl;
}

Handle transfer_list(Communicator& comm) {
  Handle dxpl(H5Pcreate(H5P_DATASET_XFER), H5Pclose);
  if (comm.size() > 1) H5Pset_dxpl_mpio(dxpl.get(), H5FD_MPIO_COLLECTIVE);
  return dxpl;
}

Handle string_type() {
  Handle t(H5Tcopy(H5T_C_S1), H5Tclose);
  H5Tset_size(t.get(), H5T_VARIABLE);
  H5Tset_cset(t.get(), H5T_CSET_UTF8);
  return t;
}

// The block of a slot: its first index and extent per dimension (empty = the whole tensor).
std::vector<int64_t> block_start(const TensorSlot& s) {
  return s.start.empty() ? std::vector<int64_t>(s.full_shape.size(), 0) : s.start;
}
std::vector<int64_t> block_count(const TensorSlot& s) {
  return s.count.empty() ? s.full_shape : s.count;
}

// Whether a slot's memory must be staged through the host (see h5_file.h).
bool staged(const TensorSlot& s) { return s.backend && !s.backend->host_accessible(); }

// A block moves in pieces of at most PieceLimits bytes, each a hyperslab that is contiguous
// in the block's row-major memory: with the block's extents c[0..n-1], the cut is along the
// outermost dimension d whose inner extent c[d+1] x ... x c[n-1] fits the limit, and a piece is
// `per_piece` consecutive indices along d at fixed indices of the dimensions before d. For
// every tensor of our models d = 0 (one row of the largest is a few MB), pieces of rows.
struct PiecePlan {
  size_t dim = 0;
  int64_t per_piece = 1;    // indices along `dim` per piece
  int64_t along = 0;        // pieces along `dim`
  int64_t outer = 1;        // c[0] x ... x c[dim-1]
  int64_t inner = 1;        // elements per index along `dim`
  int64_t pieces() const { return outer * along; }
};
PiecePlan plan_pieces(const TensorSlot& s, const PieceLimits& limits) {
  const std::vector<int64_t> c = block_count(s);
  PiecePlan p;
  if (c.empty() || product(c) == 0) return p;  // nothing to move
  const int64_t limit = std::max<int64_t>(
      1, (staged(s) ? limits.staging_bytes : limits.host_bytes) / int64_t(sizeof(float)));
  p.dim = c.size() - 1;
  p.inner = 1;
  while (p.dim > 0 && p.inner * c[p.dim] <= limit) p.inner *= c[p.dim--];
  p.per_piece = std::clamp<int64_t>(limit / p.inner, 1, c[p.dim]);
  p.along = (c[p.dim] + p.per_piece - 1) / p.per_piece;
  for (size_t k = 0; k < p.dim; ++k) p.outer *= c[k];
  return p;
}

// Piece k of a slot: its hyperslab in the dataset and its place in the block's memory.
struct Piece {
  std::vector<int64_t> start, count;  // in the dataset
  int64_t offset = 0;                 // first element, into the block's row-major memory
  int64_t size = 0;                   // elements
};
Piece piece_of(const TensorSlot& s, const PiecePlan& plan, int64_t k) {
  Piece p;
  p.start = block_start(s);
  p.count = block_count(s);
  const int64_t o = k / plan.along;
  const int64_t first = (k % plan.along) * plan.per_piece;
  const int64_t n = std::min(plan.per_piece, p.count[plan.dim] - first);
  p.offset = (o * p.count[plan.dim] + first) * plan.inner;
  // Unravel the outer index over dimensions 0..dim-1.
  int64_t rem = o;
  for (size_t d = plan.dim; d-- > 0;) {
    p.start[d] += rem % p.count[d];
    rem /= p.count[d];
    p.count[d] = 1;
  }
  p.start[plan.dim] += first;
  p.count[plan.dim] = n;
  p.size = n * plan.inner;
  return p;
}

// The checksum of one piece held in host memory at `host`.
uint64_t piece_checksum(const TensorSlot& s, const Piece& p, const float* host) {
  TensorSlot view;
  view.path = s.path;
  view.full_shape = s.full_shape;
  view.start = p.start;
  view.count = p.count;
  view.data = const_cast<float*>(host);
  return block_checksum(view);
}

// A bounded host buffer for staged pieces (at most PieceLimits::staging_bytes), grown on use.
class StagingBuffer {
 public:
  float* get(int64_t elements) {
    if (buf_.size() < size_t(elements)) buf_.resize(size_t(elements));
    return buf_.data();
  }

 private:
  std::vector<float> buf_;
};

// H5Dwrite or H5Dread of one piece between the dataset and host memory; `p` null: this rank
// moves nothing in this (collective) call and selects none.
void transfer(hid_t dset, hid_t dxpl, const Piece* p, float* host, bool write,
              const std::string& file) {
  Handle fspace(check_id(H5Dget_space(dset), file, "H5Dget_space"), H5Sclose);
  Handle mspace;
  float dummy = 0.0f;
  if (!p) {
    H5Sselect_none(fspace.get());
    hsize_t one = 1;
    mspace = Handle(H5Screate_simple(1, &one, nullptr), H5Sclose);
    H5Sselect_none(mspace.get());
    host = &dummy;
  } else {
    std::vector<hsize_t> hstart = dims_of(p->start), hcount = dims_of(p->count);
    check_status(H5Sselect_hyperslab(fspace.get(), H5S_SELECT_SET, hstart.data(), nullptr,
                                     hcount.data(), nullptr),
                 file, "H5Sselect_hyperslab");
    mspace = Handle(H5Screate_simple(int(hcount.size()), hcount.data(), nullptr), H5Sclose);
  }
  check_status(write ? H5Dwrite(dset, H5T_NATIVE_FLOAT, mspace.get(), fspace.get(), dxpl, host)
                     : H5Dread(dset, H5T_NATIVE_FLOAT, mspace.get(), fspace.get(), dxpl, host),
               file, write ? "H5Dwrite" : "H5Dread");
}

// Writes piece k of slot s (when this rank owns the block and has that piece; otherwise takes
// part in the collective call with nothing) and returns the piece's checksum, computed on the
// host copy that is written.
uint64_t write_piece(hid_t dset, hid_t dxpl, const TensorSlot& s, const PiecePlan& plan,
                     int64_t k, StagingBuffer& staging, const std::string& file) {
  if (!s.owner || k >= plan.pieces()) {
    transfer(dset, dxpl, nullptr, nullptr, /*write=*/true, file);
    return 0;
  }
  const Piece p = piece_of(s, plan, k);
  float* host = s.data + p.offset;
  if (staged(s)) {
    host = staging.get(p.size);
    s.backend->copy_to_host(host, s.data + p.offset, sizeof(float) * size_t(p.size));
  }
  const uint64_t sum = piece_checksum(s, p, host);
  transfer(dset, dxpl, &p, host, /*write=*/true, file);
  return sum;
}

int64_t count_nonfinite(const float* x, int64_t n) {
  int64_t bad = 0;
#pragma omp parallel for reduction(+ : bad) schedule(static)
  for (int64_t i = 0; i < n; ++i) bad += !std::isfinite(x[i]);
  return bad;
}

// Reads piece k of slot s into its memory (when this rank holds the block and has that piece)
// and, when the rank owns the block, adds the piece's checksum and non-finite values, counted
// on the host copy that was read, to `out`.
void read_piece(hid_t dset, hid_t dxpl, const TensorSlot& s, const PiecePlan& plan, int64_t k,
                StagingBuffer& staging, const std::string& file,
                H5CheckpointReader::DatasetScan& out) {
  if (!s.data || k >= plan.pieces()) {
    transfer(dset, dxpl, nullptr, nullptr, /*write=*/false, file);
    return;
  }
  const Piece p = piece_of(s, plan, k);
  float* host = staged(s) ? staging.get(p.size) : s.data + p.offset;
  transfer(dset, dxpl, &p, host, /*write=*/false, file);
  if (s.owner) {
    out.checksum += piece_checksum(s, p, host);
    out.nonfinite += count_nonfinite(host, p.size);
  }
  if (staged(s)) s.backend->copy_to_device(s.data + p.offset, host, sizeof(float) * size_t(p.size));
}

// Pieces every rank moves for each slot: the maximum over ranks (collective). A rank that does
// not move a slot (`moves` false) counts 0.
std::vector<int64_t> agreed_pieces(Communicator& comm, const std::vector<TensorSlot>& slots,
                                   const std::vector<PiecePlan>& plans,
                                   const std::function<bool(const TensorSlot&)>& moves) {
  std::vector<int64_t> n(slots.size());
  for (size_t i = 0; i < slots.size(); ++i) n[i] = moves(slots[i]) ? plans[i].pieces() : 0;
  if (!n.empty()) comm.all_reduce_max(n.data(), int64_t(n.size()));
  return n;
}

// Sums per-rank uint64 checksums (mod 2^64) over the ranks. Doubles carry the halves exactly:
// each half is < 2^32 and a sum over < 2^21 ranks stays below 2^53.
void sum_checksums(Communicator& comm, std::vector<uint64_t>& sums) {
  const size_t n = sums.size();
  std::vector<double> parts(2 * n);
  for (size_t i = 0; i < n; ++i) {
    parts[2 * i] = double(sums[i] >> 32);
    parts[2 * i + 1] = double(sums[i] & 0xFFFFFFFFull);
  }
  if (n) comm.all_reduce_sum(parts.data(), int64_t(parts.size()));
  for (size_t i = 0; i < n; ++i)
    sums[i] = (uint64_t(parts[2 * i]) << 32) + uint64_t(parts[2 * i + 1]);
}

// Every element of a dataset has exactly one owner among the ranks (the owner rules of the
// caller hold): `owned` is the sum over ranks of the owned block sizes.
void check_one_owner(const TensorSlot& s, int64_t owned) {
  SWT_CHECK(owned == product(s.full_shape),
            "{}: the ranks own {} of its {} elements (each must have exactly one owner)", s.path,
            owned, product(s.full_shape));
}

void write_scalar_attr(hid_t obj, const std::string& name, hid_t file_type, hid_t mem_type,
                    const void* value, const std::string& file) {
  Handle space(H5Screate(H5S_SCALAR), H5Sclose);
  Handle a(check_id(H5Acreate2(obj, name.c_str(), file_type, space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    file, "H5Acreate2"),
           H5Aclose);
  check_status(H5Awrite(a.get(), mem_type, value), file, "H5Awrite");
}

void write_string_attr(hid_t obj, const std::string& name, const std::vector<std::string>& values,
                       bool scalar, const std::string& file) {
  Handle t = string_type();
  hsize_t n = values.size();
  Handle space(scalar ? H5Screate(H5S_SCALAR) : H5Screate_simple(1, &n, nullptr), H5Sclose);
  Handle a(check_id(H5Acreate2(obj, name.c_str(), t.get(), space.get(), H5P_DEFAULT, H5P_DEFAULT),
                    file, "H5Acreate2"),
           H5Aclose);
  std::vector<const char*> ptrs;
  for (const std::string& v : values) ptrs.push_back(v.c_str());
  const char* none = "";
  check_status(H5Awrite(a.get(), t.get(), ptrs.empty() ? &none : ptrs.data()), file, "H5Awrite");
}

// Creates the groups on the way to `path` ("a/b/name" -> a, a/b) that do not exist yet.
void make_parent_groups(hid_t file, const std::string& path, const std::string& fname) {
  for (size_t pos = path.find('/'); pos != std::string::npos; pos = path.find('/', pos + 1)) {
    const std::string group = path.substr(0, pos);
    if (H5Lexists(file, group.c_str(), H5P_DEFAULT) > 0) continue;
    Handle g(check_id(H5Gcreate2(file, group.c_str(), H5P_DEFAULT, H5P_DEFAULT, H5P_DEFAULT),
                      fname, "H5Gcreate2"),
             H5Gclose);
  }
}

}  // namespace

TensorSlot whole_tensor(std::string path, std::vector<int64_t> shape, float* data) {
  TensorSlot s;
  s.path = std::move(path);
  s.start.assign(shape.size(), 0);
  s.count = shape;
  s.full_shape = std::move(shape);
  s.data = data;
  s.owner = true;
  return s;
}

uint64_t block_checksum(const TensorSlot& s) {
  const size_t nd = s.full_shape.size();
  if (nd == 0) return 0;
  std::vector<int64_t> start = s.start, count = s.count;
  if (start.empty()) start.assign(nd, 0);
  if (count.empty()) count = s.full_shape;
  SWT_CHECK(start.size() == nd && count.size() == nd, "{}: block rank {} / {} for a rank-{} tensor",
            s.path, start.size(), count.size(), nd);
  // Row-major strides of the logical tensor; the block is walked as rows of its last dimension.
  std::vector<uint64_t> stride(nd, 1);
  for (size_t k = nd - 1; k > 0; --k) stride[k - 1] = stride[k] * uint64_t(s.full_shape[k]);
  const int64_t inner = count[nd - 1];
  const int64_t rows = product(count) / std::max<int64_t>(1, inner);
  uint64_t sum = 0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    // Logical index of the row's first element: unravel r over count[0..nd-2].
    uint64_t base = uint64_t(start[nd - 1]) * stride[nd - 1];
    int64_t rem = r;
    for (size_t k = nd - 1; k-- > 0;) {
      const int64_t idx = rem % count[k];
      rem /= count[k];
      base += uint64_t(start[k] + idx) * stride[k];
    }
    const float* row = s.data + r * inner;
    uint64_t part = 0;
    for (int64_t j = 0; j < inner; ++j) {
      uint32_t bits;
      std::memcpy(&bits, row + j, 4);
      part += mix64(mix64(base + uint64_t(j)) + bits);
    }
    sum += part;
  }
  return sum;
}

void write_h5_checkpoint(const std::string& path, Communicator& comm, const H5Attributes& attrs,
                         const std::vector<TensorSlot>& slots,
                         const std::function<void(size_t k, size_t total)>& after_dataset,
                         const PieceLimits& limits) {
  quiet_hdf5();
  // Ownership first, before anything is created: every element has exactly one owner.
  std::vector<int64_t> owned(slots.size(), 0);
  std::vector<PiecePlan> plans;
  for (size_t i = 0; i < slots.size(); ++i) {
    if (slots[i].owner) {
      SWT_CHECK(slots[i].data, "{}: owner without data", slots[i].path);
      owned[i] = product(block_count(slots[i]));
    }
    plans.push_back(plan_pieces(slots[i], limits));
  }
  if (!owned.empty()) comm.all_reduce_sum(owned.data(), int64_t(owned.size()));
  for (size_t i = 0; i < slots.size(); ++i) check_one_owner(slots[i], owned[i]);
  const std::vector<int64_t> pieces =
      agreed_pieces(comm, slots, plans, [](const TensorSlot& s) { return s.owner; });

  // Every step that calls HDF5 is agreed (AgreedSteps); the first failure skips the rest.
  AgreedSteps steps(comm, path, "the checkpoint");
  Handle fapl = file_access(comm);
  Handle file;
  bool failed = steps.failed([&] {
    file = Handle(check_id(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, fapl.get()), path,
                           "H5Fcreate"),
                  H5Fclose);
  });
  for (const auto& [k, v] : attrs.ints)
    failed = failed || steps.failed([&] {
      write_scalar_attr(file.get(), k, H5T_STD_I64LE, H5T_NATIVE_INT64, &v, path);
    });
  for (const auto& [k, v] : attrs.strings)
    failed = failed || steps.failed([&] { write_string_attr(file.get(), k, {v}, true, path); });
  for (const auto& [k, v] : attrs.string_lists)
    failed = failed || steps.failed([&] { write_string_attr(file.get(), k, v, false, path); });

  // Data, with each owner's checksum computed on the host copy it writes; the checksum
  // attributes follow once the sums over the ranks are known (attributes are collective).
  Handle dxpl = transfer_list(comm);
  std::vector<uint64_t> sums(slots.size(), 0);
  std::vector<Handle> dsets;
  StagingBuffer staging;
  for (size_t i = 0; i < slots.size() && !failed; ++i) {
    const TensorSlot& s = slots[i];
    failed = steps.failed([&] {
      make_parent_groups(file.get(), s.path, path);
      std::vector<hsize_t> dims = dims_of(s.full_shape);
      Handle space(H5Screate_simple(int(dims.size()), dims.data(), nullptr), H5Sclose);
      Handle dcpl(H5Pcreate(H5P_DATASET_CREATE), H5Pclose);
      H5Pset_alloc_time(dcpl.get(), H5D_ALLOC_TIME_EARLY);
      H5Pset_fill_time(dcpl.get(), H5D_FILL_TIME_NEVER);  // every element is written below
      dsets.emplace_back(check_id(H5Dcreate2(file.get(), s.path.c_str(), H5T_IEEE_F32LE,
                                             space.get(), H5P_DEFAULT, dcpl.get(), H5P_DEFAULT),
                                  path, "H5Dcreate2"),
                         H5Dclose);
    });
    for (int64_t k = 0; k < pieces[i] && !failed; ++k)
      failed = steps.failed([&] {
        sums[i] += write_piece(dsets.back().get(), dxpl.get(), s, plans[i], k, staging, path);
      });
    if (!failed && after_dataset) after_dataset(i + 1, slots.size());
  }
  if (!failed) {
    sum_checksums(comm, sums);
    for (size_t i = 0; i < slots.size() && !failed; ++i)
      failed = steps.failed([&] {
        write_scalar_attr(dsets[i].get(), "checksum", H5T_STD_U64LE, H5T_NATIVE_UINT64, &sums[i],
                          path);
      });
  }
  dsets.clear();  // H5Dclose: no file I/O of its own; the file's flush writes what they hold
  failed = failed || steps.failed([&] {
    check_status(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), path, "H5Fflush");
  });
  if (!failed) {
    // Flushed: the close has nothing left to write (and a close that fails would leave HDF5
    // holding a file it has half freed: discard_failed_file).
    if (!steps.failed([&] { check_status(file.close(), path, "H5Fclose"); })) return;
    if (comm.rank() == 0) ::unlink(path.c_str());
    steps.throw_error();
  }
  discard_failed_file(file, comm, steps, path);
}

// ---- reading ----------------------------------------------------------------------------------

struct H5CheckpointReader::Impl {
  Handle fapl, file;
};

H5CheckpointReader::H5CheckpointReader(const std::string& path, Communicator& comm)
    : path_(path), comm_(comm), impl_(std::make_unique<Impl>()) {
  quiet_hdf5();
  // Existence is checked first for a clear message; every rank sees the same file system.
  if (FILE* f = std::fopen(path.c_str(), "rb")) {
    std::fclose(f);
  } else {
    throw UserError(fmt::format("{}: cannot open the checkpoint: {}", path, std::strerror(errno)));
  }
  impl_->fapl = file_access(comm);
  const hid_t id = H5Fopen(path.c_str(), H5F_ACC_RDONLY, impl_->fapl.get());
  if (id < 0)
    throw UserError(fmt::format("{}: not a readable HDF5 checkpoint (truncated or corrupt?): {}",
                                path, h5_error_text()));
  impl_->file = Handle(id, H5Fclose);
}

H5CheckpointReader::~H5CheckpointReader() = default;

bool H5CheckpointReader::has_attribute(const std::string& name) const {
  return H5Aexists(impl_->file.get(), name.c_str()) > 0;
}

std::vector<std::string> H5CheckpointReader::attribute_names() const {
  std::vector<std::string> names;
  H5Aiterate2(
      impl_->file.get(), H5_INDEX_NAME, H5_ITER_INC, nullptr,
      [](hid_t, const char* name, const H5A_info_t*, void* out) -> herr_t {
        static_cast<std::vector<std::string>*>(out)->push_back(name);
        return 0;
      },
      &names);
  return names;
}

namespace {
Handle open_attribute(hid_t obj, const std::string& name, const std::string& file,
                      const std::string& where) {
  if (H5Aexists(obj, name.c_str()) <= 0)
    throw UserError(fmt::format("{}: missing attribute \"{}\"{} (not a switcht5 checkpoint?)",
                                file, name, where));
  return Handle(check_id(H5Aopen(obj, name.c_str(), H5P_DEFAULT), file, "H5Aopen"), H5Aclose);
}
}  // namespace

int64_t H5CheckpointReader::int_attribute(const std::string& name) const {
  Handle a = open_attribute(impl_->file.get(), name, path_, "");
  Handle t(H5Aget_type(a.get()), H5Tclose);
  if (H5Tget_class(t.get()) != H5T_INTEGER)
    throw UserError(fmt::format("{}: attribute \"{}\" is not an integer", path_, name));
  int64_t v = 0;
  check_status(H5Aread(a.get(), H5T_NATIVE_INT64, &v), path_, "H5Aread");
  return v;
}

std::vector<std::string> H5CheckpointReader::string_list_attribute(const std::string& name) const {
  Handle a = open_attribute(impl_->file.get(), name, path_, "");
  Handle ft(H5Aget_type(a.get()), H5Tclose);
  if (H5Tget_class(ft.get()) != H5T_STRING || H5Tis_variable_str(ft.get()) <= 0)
    throw UserError(fmt::format("{}: attribute \"{}\" is not a variable-length string", path_, name));
  Handle space(H5Aget_space(a.get()), H5Sclose);
  const hssize_t n = H5Sget_simple_extent_npoints(space.get());
  std::vector<char*> ptrs(size_t(std::max<hssize_t>(n, 1)), nullptr);
  Handle t = string_type();
  check_status(H5Aread(a.get(), t.get(), ptrs.data()), path_, "H5Aread");
  std::vector<std::string> out;
  for (hssize_t i = 0; i < n; ++i) {
    out.emplace_back(ptrs[size_t(i)] ? ptrs[size_t(i)] : "");
    H5free_memory(ptrs[size_t(i)]);
  }
  return out;
}

std::string H5CheckpointReader::string_attribute(const std::string& name) const {
  std::vector<std::string> v = string_list_attribute(name);
  if (v.size() != 1)
    throw UserError(fmt::format("{}: attribute \"{}\" holds {} strings, expected one", path_, name,
                                v.size()));
  return v[0];
}

std::string H5CheckpointReader::attribute_text(const std::string& name) const {
  Handle a = open_attribute(impl_->file.get(), name, path_, "");
  Handle t(H5Aget_type(a.get()), H5Tclose);
  const H5T_class_t cls = H5Tget_class(t.get());
  if (cls == H5T_INTEGER) return fmt::format("{}", int_attribute(name));
  if (cls == H5T_STRING) {
    std::vector<std::string> v = string_list_attribute(name);
    Handle space(H5Aget_space(a.get()), H5Sclose);
    return H5Sget_simple_extent_type(space.get()) == H5S_SCALAR ? v[0]
                                                                 : fmt::format("[{}]", fmt::join(v, ", "));
  }
  return "(unsupported type)";
}

bool H5CheckpointReader::has_group(const std::string& name) const {
  if (H5Lexists(impl_->file.get(), name.c_str(), H5P_DEFAULT) <= 0) return false;
  H5O_info_t info;
  return H5Oget_info_by_name(impl_->file.get(), name.c_str(), &info, H5P_DEFAULT) >= 0 &&
         info.type == H5O_TYPE_GROUP;
}

std::vector<std::string> H5CheckpointReader::datasets() const {
  std::vector<std::string> out;
  H5Ovisit(
      impl_->file.get(), H5_INDEX_NAME, H5_ITER_INC,
      [](hid_t, const char* name, const H5O_info_t* info, void* o) -> herr_t {
        if (info->type == H5O_TYPE_DATASET) static_cast<std::vector<std::string>*>(o)->push_back(name);
        return 0;
      },
      &out);
  return out;
}

namespace {
Handle open_dataset(hid_t file, const std::string& name, const std::string& fname) {
  // H5Lexists needs each parent group to exist.
  bool exists = true;
  for (size_t pos = name.find('/'); exists && pos != std::string::npos; pos = name.find('/', pos + 1))
    exists = H5Lexists(file, name.substr(0, pos).c_str(), H5P_DEFAULT) > 0;
  if (!exists || H5Lexists(file, name.c_str(), H5P_DEFAULT) <= 0)
    throw UserError(fmt::format("{}: missing dataset \"{}\"", fname, name));
  const hid_t id = H5Dopen2(file, name.c_str(), H5P_DEFAULT);
  if (id < 0)
    throw UserError(fmt::format("{}: cannot open dataset \"{}\": {}", fname, name, h5_error_text()));
  return Handle(id, H5Dclose);
}

std::vector<int64_t> dataset_shape(hid_t dset) {
  Handle space(H5Dget_space(dset), H5Sclose);
  const int nd = H5Sget_simple_extent_ndims(space.get());
  std::vector<hsize_t> d(size_t(std::max(nd, 0)));
  if (nd > 0) H5Sget_simple_extent_dims(space.get(), d.data(), nullptr);
  return std::vector<int64_t>(d.begin(), d.end());
}

std::string dtype_name(hid_t dset) {
  Handle t(H5Dget_type(dset), H5Tclose);
  const size_t bytes = H5Tget_size(t.get());
  switch (H5Tget_class(t.get())) {
    case H5T_FLOAT: return fmt::format("float{}", 8 * bytes);
    case H5T_INTEGER:
      return fmt::format("{}int{}", H5Tget_sign(t.get()) == H5T_SGN_NONE ? "u" : "", 8 * bytes);
    case H5T_STRING: return "string";
    default: return "other";
  }
}
}  // namespace

std::vector<int64_t> H5CheckpointReader::shape(const std::string& dataset) const {
  Handle d = open_dataset(impl_->file.get(), dataset, path_);
  return dataset_shape(d.get());
}

std::string H5CheckpointReader::dtype(const std::string& dataset) const {
  Handle d = open_dataset(impl_->file.get(), dataset, path_);
  return dtype_name(d.get());
}

uint64_t H5CheckpointReader::stored_checksum(const std::string& dataset) const {
  Handle d = open_dataset(impl_->file.get(), dataset, path_);
  Handle a = open_attribute(d.get(), "checksum", path_, " on dataset \"" + dataset + "\"");
  uint64_t v = 0;
  check_status(H5Aread(a.get(), H5T_NATIVE_UINT64, &v), path_, "H5Aread");
  return v;
}

void H5CheckpointReader::check_dataset(const std::string& dataset,
                                       const std::vector<int64_t>& full_shape) const {
  Handle d = open_dataset(impl_->file.get(), dataset, path_);
  const std::string type = dtype_name(d.get());
  if (type != "float32")
    throw UserError(fmt::format("{}: dataset \"{}\" is {}, expected float32", path_, dataset, type));
  const std::vector<int64_t> shape = dataset_shape(d.get());
  if (shape != full_shape)
    throw UserError(fmt::format("{}: dataset \"{}\" has shape {}, expected {} (from the config's "
                                "model)",
                                path_, dataset, shape_text(shape), shape_text(full_shape)));
  (void)open_attribute(d.get(), "checksum", path_, " on dataset \"" + dataset + "\"");
}

std::string dataset_data_problem(const std::string& file, const std::string& dataset,
                                 uint64_t stored, uint64_t computed, int64_t nonfinite) {
  if (computed != stored)
    return fmt::format("{}: dataset \"{}\" fails its checksum (stored {:#018x}, computed "
                       "{:#018x}): the file is corrupt",
                       file, dataset, stored, computed);
  if (nonfinite > 0)
    return fmt::format("{}: dataset \"{}\" holds {} non-finite values (NaN or Inf): the run had "
                       "diverged when it was saved; load an earlier checkpoint",
                       file, dataset, nonfinite);
  return "";
}

void H5CheckpointReader::read(const std::vector<TensorSlot>& slots, const PieceLimits& limits) {
  // Metadata checks first, identical on every rank, so that all ranks fail together.
  std::vector<Handle> dsets;
  std::vector<uint64_t> expected(slots.size());
  for (const TensorSlot& s : slots) {
    check_dataset(s.path, s.full_shape);
    expected[dsets.size()] = stored_checksum(s.path);
    dsets.push_back(open_dataset(impl_->file.get(), s.path, path_));
  }
  Handle dxpl = transfer_list(comm_);
  std::vector<PiecePlan> plans;
  for (const TensorSlot& s : slots) plans.push_back(plan_pieces(s, limits));
  const std::vector<int64_t> pieces =
      agreed_pieces(comm_, slots, plans, [](const TensorSlot& s) { return s.data != nullptr; });
  // Checksums per dataset (a dataset may appear in several slots: blocks read separately).
  std::vector<size_t> dataset_of(slots.size());
  std::vector<size_t> first_slot;
  std::unordered_map<std::string, size_t> index;
  for (size_t i = 0; i < slots.size(); ++i) {
    auto [it, added] = index.emplace(slots[i].path, first_slot.size());
    if (added) first_slot.push_back(i);
    dataset_of[i] = it->second;
  }
  std::vector<DatasetScan> scans(first_slot.size());
  StagingBuffer staging;
  for (size_t i = 0; i < slots.size(); ++i) {
    const TensorSlot& s = slots[i];
    for (int64_t k = 0; k < pieces[i]; ++k)
      read_piece(dsets[i].get(), dxpl.get(), s, plans[i], k, staging, path_, scans[dataset_of[i]]);
  }
  // Per dataset over the ranks: checksum, elements owned (each exactly once) and non-finite.
  std::vector<uint64_t> sums;
  std::vector<int64_t> counts(2 * first_slot.size(), 0);
  for (size_t d = 0; d < first_slot.size(); ++d) {
    sums.push_back(scans[d].checksum);
    counts[2 * d + 1] = scans[d].nonfinite;
  }
  for (size_t i = 0; i < slots.size(); ++i)
    if (slots[i].owner) counts[2 * dataset_of[i]] += product(block_count(slots[i]));
  sum_checksums(comm_, sums);
  if (!counts.empty()) comm_.all_reduce_sum(counts.data(), int64_t(counts.size()));
  for (size_t d = 0; d < first_slot.size(); ++d) {
    const TensorSlot& s = slots[first_slot[d]];
    check_one_owner(s, counts[2 * d]);
    const std::string problem =
        dataset_data_problem(path_, s.path, expected[first_slot[d]], sums[d], counts[2 * d + 1]);
    if (!problem.empty()) throw UserError(problem);
  }
}

H5CheckpointReader::DatasetScan H5CheckpointReader::scan_dataset(const std::string& dataset) {
  SWT_CHECK(comm_.size() == 1, "scan_dataset runs on one process");
  Handle d = open_dataset(impl_->file.get(), dataset, path_);
  const std::vector<int64_t> shape = dataset_shape(d.get());
  if (shape.empty()) return {};
  // The whole dataset, piece by piece through one host buffer.
  TensorSlot s = whole_tensor(dataset, shape, nullptr);
  const PiecePlan plan = plan_pieces(s, PieceLimits{});
  StagingBuffer buf;
  Handle dxpl = transfer_list(comm_);
  DatasetScan scan;
  for (int64_t k = 0; k < plan.pieces(); ++k) {
    const Piece p = piece_of(s, plan, k);
    float* host = buf.get(p.size);
    transfer(d.get(), dxpl.get(), &p, host, /*write=*/false, path_);
    scan.checksum += piece_checksum(s, p, host);
    scan.nonfinite += count_nonfinite(host, p.size);
  }
  return scan;
}

void write_h5_arrays(const std::string& path, const std::vector<H5Array>& arrays,
                     const std::map<std::string, double>& attributes) {
  quiet_hdf5();
  // One process; the failure path of write_h5_checkpoint (a full disk: one line, no crash).
  auto self = make_self_communicator();
  AgreedSteps steps(*self, path, "the arrays");
  Handle file;
  const bool failed = steps.failed([&] {
    file = Handle(check_id(H5Fcreate(path.c_str(), H5F_ACC_TRUNC, H5P_DEFAULT, H5P_DEFAULT), path,
                           "H5Fcreate"),
                  H5Fclose);
    for (const auto& [k, v] : attributes)
      write_scalar_attr(file.get(), k, H5T_IEEE_F64LE, H5T_NATIVE_DOUBLE, &v, path);
    for (const H5Array& a : arrays) {
      std::vector<hsize_t> dims = dims_of(a.shape);
      Handle space(H5Screate_simple(int(dims.size()), dims.data(), nullptr), H5Sclose);
      const hid_t ft = a.is_int32 ? H5T_STD_I32LE : H5T_IEEE_F32LE;
      const hid_t mt = a.is_int32 ? H5T_NATIVE_INT32 : H5T_NATIVE_FLOAT;
      Handle d(check_id(H5Dcreate2(file.get(), a.name.c_str(), ft, space.get(), H5P_DEFAULT,
                                   H5P_DEFAULT, H5P_DEFAULT),
                        path, "H5Dcreate2"),
               H5Dclose);
      check_status(H5Dwrite(d.get(), mt, H5S_ALL, H5S_ALL, H5P_DEFAULT, a.data), path, "H5Dwrite");
    }
    check_status(H5Fflush(file.get(), H5F_SCOPE_GLOBAL), path, "H5Fflush");
  });
  if (!failed) {
    if (!steps.failed([&] { check_status(file.close(), path, "H5Fclose"); })) return;
    ::unlink(path.c_str());
    steps.throw_error();
  }
  discard_failed_file(file, *self, steps, path);
}

}  // namespace switcht5
