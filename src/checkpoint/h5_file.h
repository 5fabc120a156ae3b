// A checkpoint file: one HDF5 file holding named float32 tensors (one dataset each, with its full
// logical shape) and attributes, written and read collectively by the ranks of a job through
// parallel HDF5 (MPI-IO), or by one process without MPI.
//
// Each rank describes the tensors as TensorSlots: the dataset, the block of it this rank holds
// (a hyperslab: start + count per dimension) and whether it is the block's owner. Every element
// has exactly one owner in the job: the owner writes it, and owners alone count it in the
// dataset's checksum, so each byte is written once and each checksum covers each element once,
// whatever the layout. On read every rank that holds a block reads it.
//
// Checksum of a dataset (attribute "checksum", uint64), layout-independent and additive over
// blocks, so ranks compute it on their own blocks and sum:
//   checksum = sum over elements i (row-major index in the logical tensor) of
//              mix64(mix64(i) + bits_i)    (mod 2^64)
// with bits_i the element's float32 bit pattern and mix64 the splitmix64 finalizer (core/rng.h).
// A reader recomputes it on load (h5py users can too: scripts/export_hf.py does).
//
// This header does not include <hdf5.h> (which pulls in <mpi.h>): only h5_file.cpp does.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

namespace switcht5 {

class Backend;
class Communicator;

struct TensorSlot {
  std::string path;                 // dataset, e.g. "params/shared.weight"
  std::vector<int64_t> full_shape;  // the dataset's (logical) shape
  std::vector<int64_t> start;       // this rank's block: first index per dimension
  std::vector<int64_t> count;       //   and extent per dimension (row-major in `data`)
  float* data = nullptr;            // the block; null: this rank holds no part of the tensor
  // Where `data` lives: null = host memory; else that backend's memory, which, unless
  // backend->host_accessible(), is moved through a bounded host buffer piece by piece with
  // copy_to_host / copy_to_device (HDF5 and the checksum only ever see the host copy).
  Backend* backend = nullptr;
  bool owner = false;               // writes the block and counts it in the checksum
};

// The whole tensor, held by one process that owns it, in host memory.
TensorSlot whole_tensor(std::string path, std::vector<int64_t> shape, float* data);

// File attributes (on the root group). Integers are int64, strings UTF-8, string lists 1-D.
struct H5Attributes {
  std::map<std::string, int64_t> ints;
  std::map<std::string, std::string> strings;
  std::map<std::string, std::vector<std::string>> string_lists;
};

// The most one H5Dwrite / H5Dread moves: a block is moved in pieces, each a hyperslab that is
// contiguous in the block's memory (cut along the first dimension when a row fits, as for every
// tensor of our models). Checkpoints use the defaults; tests make them small.
struct PieceLimits {
  // From host memory: MPI-IO counts are ints.
  int64_t host_bytes = int64_t{256} << 20;
  // Through the host staging buffer, for backend memory the host cannot read (copy_to_host on
  // save, copy_to_device on load): 64 MB, large enough that the copies and writes are few and
  // sequential, small enough to sit beside a training job's host memory on every rank. It is
  // the most host memory a save or load adds.
  int64_t staging_bytes = int64_t{64} << 20;
};

// Sum of mix64(mix64(i) + bits_i) over the block's elements (see the file comment); the block
// must be in host memory.
uint64_t block_checksum(const TensorSlot& slot);

// Creates `path` (truncating it), writes the attributes and every slot, stores each dataset's
// checksum (computed on the host copy written), flushes and closes the file. Collective over
// `comm`: every rank passes the same attributes and the same slot paths and shapes in the same
// order. `after_dataset(k, total)`, when given, is called on every rank after the k-th dataset
// is written (tests inject crashes).
//
// A failed write (a full disk, an I/O error, a file too large; on any rank) ends the write on
// every rank at the same point: the ranks agree after each collective HDF5 call, the partial
// file is closed (every HDF5 id released, so that HDF5's exit handler finds nothing broken)
// and removed, and every rank throws the same error, "<path>: cannot write the checkpoint:
// <the OS reason>" (AgreedUserError: rank 0 reports it and every rank exits 2; an Error when
// HDF5 names no OS reason). `comm` must therefore span every rank of the job.
void write_h5_checkpoint(const std::string& path, Communicator& comm, const H5Attributes& attrs,
                         const std::vector<TensorSlot>& slots,
                         const std::function<void(size_t k, size_t total)>& after_dataset = {},
                         const PieceLimits& limits = {});

// An open checkpoint file. Opening and read() are collective over `comm`; the metadata getters
// are local. Every failure names the file: a truncated or non-HDF5 file, a missing attribute or
// dataset, a shape mismatch and a checksum mismatch are UserErrors (exit code 2).
class H5CheckpointReader {
 public:
  H5CheckpointReader(const std::string& path, Communicator& comm);
  ~H5CheckpointReader();
  H5CheckpointReader(const H5CheckpointReader&) = delete;
  H5CheckpointReader& operator=(const H5CheckpointReader&) = delete;

  const std::string& path() const { return path_; }
  bool has_attribute(const std::string& name) const;
  int64_t int_attribute(const std::string& name) const;
  std::string string_attribute(const std::string& name) const;
  std::vector<std::string> string_list_attribute(const std::string& name) const;
  std::vector<std::string> attribute_names() const;
  // Any integer or string attribute as text (a list as "[a, b]"), for `switcht5 inspect`.
  std::string attribute_text(const std::string& name) const;

  bool has_group(const std::string& name) const;
  // Checks that `dataset` exists as float32 of shape `full_shape` with a checksum attribute;
  // UserError naming the file and the dataset otherwise (read() checks every slot so).
  void check_dataset(const std::string& dataset, const std::vector<int64_t>& full_shape) const;
  // Datasets under the root, depth-first in name order ("params/shared.weight", ...).
  std::vector<std::string> datasets() const;
  std::vector<int64_t> shape(const std::string& dataset) const;
  std::string dtype(const std::string& dataset) const;  // "float32", "int32", ...
  uint64_t stored_checksum(const std::string& dataset) const;

  // Reads every slot's block (check_dataset first, for every slot), then verifies every
  // dataset's checksum and finiteness over the owners' blocks (dataset_data_problem): each
  // element of each dataset read must have exactly one owner among the ranks (an Error
  // otherwise). Throws UserError naming the first bad dataset, the same on every rank.
  void read(const std::vector<TensorSlot>& slots, const PieceLimits& limits = {});

  // One process: the whole dataset read piece by piece, its checksum recomputed and its
  // non-finite values counted (for `switcht5 inspect`).
  struct DatasetScan {
    uint64_t checksum = 0;
    int64_t nonfinite = 0;
  };
  DatasetScan scan_dataset(const std::string& dataset);
  uint64_t compute_checksum(const std::string& dataset) { return scan_dataset(dataset).checksum; }

 private:
  struct Impl;
  std::string path_;
  Communicator& comm_;
  std::unique_ptr<Impl> impl_;
};

// The verdict on a dataset's data, one rule for every reader (loading and `switcht5 inspect`):
// "" when the checksum recomputed over its elements is the stored one and every element is
// finite, else the one-line reason, naming the file and the dataset. A checksum mismatch is
// reported first: a corrupt file may hold anything.
std::string dataset_data_problem(const std::string& file, const std::string& dataset,
                                 uint64_t stored, uint64_t computed, int64_t nonfinite);

// Writes a plain (single-process) HDF5 file of named arrays and double attributes, for test and
// parity dumps (`switcht5 eval --dump-batch`).
struct H5Array {
  std::string name;
  std::vector<int64_t> shape;
  const void* data;
  bool is_int32;  // int32 when true, float32 otherwise
};
void write_h5_arrays(const std::string& path, const std::vector<H5Array>& arrays,
                     const std::map<std::string, double>& attributes);

}  // namespace switcht5
