// Training checkpoints: a run's training state (TrainingState below, the view a Trainer builds)
// as one HDF5 file (checkpoint/h5_file.h), and the directory protocol that makes saving atomic.
//
// File contents (format "switcht5-checkpoint", version 1):
//   /params/<name>               every parameter, float32, its full logical shape; names are the
//                                HF state_dict keys except stacked experts [E, ...] (model/params.h)
//   /optimizer/<name>.<state>    optimizer state, HF names (exp_avg, exp_avg_sq, exp_avg_sq_row,
//                                exp_avg_sq_col), full logical shapes (train/optimizer.h)
//   each dataset: attribute "checksum" (see h5_file.h), verified on every load
//   root attributes: format, format_version, step (training steps done), optimizer_steps
//   (updates applied: skipped steps do not count), consecutive_skips, optimizer, config (the
//   resolved YAML), layout + layout_data/model/expert/zero1 + world_size, data_loader_states
//   (one per data rank), seed + rng and schedule (how they derive from the step),
//   checksum_algorithm.
// The learning-rate schedule and every random draw (dropout, jitter, data order, span
// corruption) are pure functions of (train.seed, step, index), so step + loader state +
// parameters + optimizer state is the whole training state: resuming on the same layout is
// bitwise identical to not stopping, and on another layout it differs only by the reduction
// order of the sums.
//
// Directory protocol (DIR = checkpoint.dir, default <run dir>/checkpoints):
//   0. every rank counts the non-finite values of the tensors it owns; any, and the save is
//      refused (nothing written: a diverged run never replaces a good checkpoint);
//   1. every rank writes DIR/ckpt-<step, 8 digits>.h5.tmp collectively; HDF5 flushes and closes;
//   2. rank 0 fsyncs it, renames it to DIR/ckpt-<step>.h5 and fsyncs DIR;
//   3. rank 0 writes DIR/latest.tmp (the file name), fsyncs, renames it to DIR/latest;
//   4. rank 0 deletes all but the newest checkpoint.keep checkpoints and stale *.tmp files,
//      but never the newest checkpoint that verifies: DIR/verified (written as `latest` is)
//      names the newest one read back and found good, and one is read back only when pruning
//      would otherwise remove that one.
// A crash at any point leaves every earlier complete checkpoint and a `latest` naming one. A
// failure (a full disk, an I/O error) at any point does too, and removes what it left
// unfinished (the .tmp files); every rank then throws the same AgreedUserError (rank 0 reports
// it, every rank exits 2: core/check.h), naming the file and the OS's reason.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "model/params.h"
#include "train/optimizer.h"

namespace switcht5 {

// What a checkpoint saves and restores: a plain view of a training run's state, built by
// Trainer::checkpoint_state() (train/trainer.h), so that this code needs no Trainer.
//
// Ownership: the view owns only its scalars and strings. The tensors stay with their owners
// (parameters in the ParamStore, optimizer state in the Optimizer, both in `backend` memory)
// and the view points at them, so it is valid while those live and keep their layout. Saving
// reads the tensors through the backend (host staging unless backend.host_accessible()); loading
// writes them in place and sets the scalars here, which Trainer::restore() then applies.
// The learning-rate schedule and every random draw are pure functions of (config.train.seed,
// step, index): config and step stand for both (the file records how, as text).
struct TrainingState {
  const RunConfig& config;  // the resolved run config (model dims, optimizer, seed, schedule)
  ProcessGrid& grid;        // the layout; saving and loading are collective over grid.world
  Backend& backend;         // where the tensors below live
  // Parameters: ParamStore::values() [total_numel()], each ParamInfo a block (offset, shape,
  // slice_start) of its logical tensor.
  ParamStore& params;
  // Optimizer state tensors in parameter order, the same list on every rank (data null where
  // this rank keeps none, ZeRO-1); empty without an optimizer (evaluation).
  std::vector<Optimizer::StateTensor> optimizer_state{};
  // ZeRO-1: per parameter (index into params.infos()), the data rank that keeps its optimizer
  // state and writes it, or -1 when every data rank holding it does. Empty: all -1.
  std::vector<int> param_owner{};

  // Scalars, copied into the file on save and out of it on load.
  int64_t step = 0;             // training steps done
  int64_t optimizer_steps = 0;  // updates applied (skipped non-finite steps do not count)
  int consecutive_skips = 0;    // skipped steps in a row at `step`
  std::string loader_state{};   // this data rank's training data position (BatchSource::state)
};

// "ckpt-00000120.h5"
std::string checkpoint_file_name(int64_t step);
// checkpoint.dir, or <run_dir>/checkpoints when it is empty.
std::string checkpoint_dir(const RunConfig& cfg, const std::string& run_dir);

struct SaveResult {
  std::string path;
  double seconds = 0.0;
  int64_t bytes = 0;
  // Rank 0: what pruning met that the log should say (a checkpoint that does not verify, one
  // kept beyond checkpoint.keep because it is the newest that does, one it could not remove).
  std::vector<std::string> notes;
};

// Saves `state` (after training step state.step) into `dir` (protocol above). Collective over
// state.grid.world. The environment variable SWITCHT5_CRASH_IN_SAVE=POINT:STEP kills
// with SIGKILL, at POINT of the save of step STEP, every rank (datasets: half the datasets
// written; written: file closed, not renamed) or rank 0, which alone runs the rest (renamed:
// renamed, `latest` not updated; latest: `latest` updated, not pruned); mpirun then ends the
// others. The crash tests use it. POINT `damaged` kills nothing: it flips a byte in the middle
// of the file just written, before pruning, as a failing disk would (the pruning test).
// AgreedUserError, the same on every rank and with nothing earlier lost (protocol above), when a
// parameter or optimizer tensor holds a non-finite value ("refusing to save checkpoint step 5:
// parameter <name> holds 12 non-finite values ...; the previous checkpoint DIR/ckpt-... is
// kept") or when the storage fails ("DIR/ckpt-<step>.h5.tmp: cannot write the checkpoint: No
// space left on device").
SaveResult save_checkpoint(const TrainingState& state, const std::string& dir);

// What --resume (and eval --checkpoint, inspect) names: "auto" -> the checkpoint DIR/latest
// names (else the newest complete ckpt-*.h5 in `dir`), or "" when there is none; a directory ->
// its latest checkpoint (an error when it has none); a `latest` pointer file -> the checkpoint
// it names; any other file -> itself.
std::string resolve_resume(const std::string& arg, const std::string& dir);

struct LoadResult {
  int64_t step = 0;              // training steps the checkpoint had done
  bool training_state = false;   // optimizer state, counters and data position were restored
  std::string layout;            // the layout it was saved with
};

// Loads `path` into `state`: the parameters always; with `training_state`, also the optimizer
// state and the scalars (state.step, optimizer_steps, consecutive_skips, loader_state) when the
// file has them (LoadResult::training_state; a params-only file, e.g. from
// scripts/import_hf.py, leaves a fresh optimizer). Any layout loads into any layout. Collective
// over state.grid.world. UserError (naming the file and what is wrong) for a file that is not
// a checkpoint, is truncated or corrupt, fails a checksum, lacks a dataset or an attribute,
// holds a dataset of another shape or one the model does not have, holds a non-finite value,
// or holds a model of other dimensions than the config's. `switcht5 inspect` applies the same
// checks (one function), so it fails exactly the files that fail to load.
LoadResult load_checkpoint(TrainingState& state, const std::string& path, bool training_state);

// The run config stored in a checkpoint, with `overrides` applied (--set). One process.
RunConfig checkpoint_config(const std::string& path, const std::vector<std::string>& overrides);

// `switcht5 inspect`: prints attributes, layout, config and every dataset (shape, dtype,
// checksum verified, non-finite values) to stdout, then checks the file as strictly as a
// resume does (against the config it stores): returns 0 when it would load, else throws the
// UserError loading would throw (one line: exit code 2).
int inspect_checkpoint(const std::string& path);

}  // namespace switcht5
