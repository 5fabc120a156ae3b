#include "checkpoint/checkpoint.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <set>

#include "checkpoint/h5_file.h"
#include "comm/communicator.h"
#include "core/check.h"
#include "core/input_file.h"
#include "model/model.h"
#include "train/schedule.h"

namespace switcht5 {

namespace fs = std::filesystem;

namespace {

constexpr const char* kFormat = "switcht5-checkpoint";
constexpr int64_t kFormatVersion = 1;

// Of the ranks holding the same block of a tensor, the one that writes it and counts it in the
// checksum: model rank 0 unless the block differs per model rank; then the ZeRO-1 owner, or the
// lowest data rank holding the block (experts: data rank expert_rank, the first replica).
bool block_owner(const ProcessGrid& g, bool expert, int model_split_dim, int zero1_owner) {
  if (model_split_dim < 0 && g.model_rank != 0) return false;
  if (zero1_owner >= 0) return g.data_rank == zero1_owner;
  return expert ? g.data_rank < g.expert : g.data_rank == 0;
}

std::vector<int64_t> zeros_if_empty(const std::vector<int64_t>& start, size_t rank) {
  return start.empty() ? std::vector<int64_t>(rank, 0) : start;
}

std::vector<TensorSlot> param_slots(const TrainingState& st) {
  ParamStore& ps = st.params;
  std::vector<TensorSlot> slots;
  for (const ParamInfo& p : ps.infos()) {
    TensorSlot s;
    s.path = "params/" + p.name;
    s.full_shape = p.logical_shape();
    s.start = zeros_if_empty(p.slice_start, p.shape.size());
    s.count = p.shape;
    s.data = ps.values() + p.offset;
    s.backend = &st.backend;
    s.owner = block_owner(st.grid, p.kind == ParamKind::kStacked, p.model_split_dim, -1);
    slots.push_back(std::move(s));
  }
  return slots;
}

std::vector<TensorSlot> optimizer_slots(const TrainingState& st) {
  const ParamStore& ps = st.params;
  SWT_CHECK(st.param_owner.empty() || st.param_owner.size() == ps.infos().size(),
            "param_owner has {} entries for {} parameters", st.param_owner.size(),
            ps.infos().size());
  std::vector<TensorSlot> slots;
  for (const Optimizer::StateTensor& t : st.optimizer_state) {
    const ParamInfo& p = ps.infos()[size_t(t.param)];
    const int zero1_owner = st.param_owner.empty() ? -1 : st.param_owner[size_t(t.param)];
    TensorSlot s;
    s.path = "optimizer/" + t.name;
    s.full_shape = t.full_shape;
    s.start = t.slice_start;
    s.count = t.shape;
    s.data = t.data;
    s.backend = &st.backend;
    s.owner = t.data != nullptr && block_owner(st.grid, p.kind == ParamKind::kStacked,
                                               t.model_split_dim, zero1_owner);
    slots.push_back(std::move(s));
  }
  return slots;
}

std::string layout_text(const RunConfig& cfg, int world_size) {
  const ParallelConfig& pc = cfg.parallel;
  return fmt::format("world {} = data {} x model {}, experts over groups of {}{}", world_size,
                     pc.data, pc.model, pc.expert, pc.zero1 ? ", ZeRO-1" : "");
}

// Every data rank's loader state, on every rank (collective over the world).
std::vector<std::string> gather_loader_states(const TrainingState& st) {
  ProcessGrid& g = st.grid;
  std::vector<std::string> states;
  const std::string& mine = st.loader_state;
  for (int r = 0; r < g.data; ++r) {
    std::string s = g.data_rank == r && g.model_rank == 0 ? mine : std::string();
    g.world->broadcast(s, r * g.model);
    states.push_back(std::move(s));
  }
  return states;
}

// fsync, where a disk that is full or failing may first report a write it had accepted.
void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  SWT_USER_CHECK(fd >= 0, "{}: cannot open to sync it to disk: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  SWT_USER_CHECK(rc == 0, "{}: cannot sync to disk: {}", path, std::strerror(err));
}

// Runs `f` on rank 0 alone and makes its failure every rank's, as the same exception: the other
// ranks wait for the outcome instead of at a barrier that rank 0 would never reach.
void on_root(ProcessGrid& g, const std::function<void()>& f) {
  std::string error;  // 'U' (UserError) or 'E' (Error), then the message
  if (g.is_root()) {
    try {
      f();
    } catch (const UserError& e) {
      error = std::string("U") + e.what();
    } catch (const std::exception& e) {
      error = std::string("E") + e.what();
    }
  }
  g.world->broadcast(error, 0);
  if (error.empty()) return;
  // Every rank holds the same error now: rank 0 alone reports it (main.cpp), no job abort.
  if (error[0] == 'U') throw AgreedUserError(error.substr(1));
  throw Error(error.substr(1));
}

// Writes `text` to `path` (created or truncated) and syncs it; UserError with the OS reason.
void write_synced(const std::string& path, const std::string& text) {
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  SWT_USER_CHECK(fd >= 0, "{}: cannot create: {}", path, std::strerror(errno));
  size_t done = 0;
  int err = 0;
  while (done < text.size() && err == 0) {
    const ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n > 0) done += size_t(n);
    else if (n < 0 && errno != EINTR) err = errno;
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  SWT_USER_CHECK(err == 0, "{}: cannot write: {}", path, std::strerror(err));
}

// Renames, then syncs the directory so that the rename survives a crash.
void rename_synced(const std::string& from, const std::string& to, const std::string& dir) {
  std::error_code ec;
  fs::rename(from, to, ec);
  SWT_USER_CHECK(!ec, "{}: cannot rename to {}: {}", from, to, ec.message());
  fsync_path(dir, true);
}

// SWITCHT5_CRASH_IN_SAVE=POINT:STEP (see checkpoint.h).
void maybe_crash(const char* point, int64_t step) {
  const char* env = std::getenv("SWITCHT5_CRASH_IN_SAVE");
  if (!env) return;
  const std::string want = fmt::format("{}:{}", point, step);
  if (want != env) return;
  std::fprintf(stderr, "switcht5: SWITCHT5_CRASH_IN_SAVE=%s: killing this process\n", env);
  std::fflush(stderr);
  std::raise(SIGKILL);
}

// SWITCHT5_CRASH_IN_SAVE=damaged:STEP (see checkpoint.h): one byte in the middle of the file
// just written flipped, as a failing disk would, before pruning reads it back.
void maybe_damage(const std::string& path, int64_t step) {
  const char* env = std::getenv("SWITCHT5_CRASH_IN_SAVE");
  if (!env || fmt::format("damaged:{}", step) != env) return;
  std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(0, std::ios::end);
  const std::streamoff middle = f.tellg() / 2;
  char c = 0;
  f.seekg(middle);
  f.get(c);
  f.seekp(middle);
  f.put(char(c ^ 0x10));
  std::fprintf(stderr, "switcht5: SWITCHT5_CRASH_IN_SAVE=%s: flipped a byte of %s\n", env,
               path.c_str());
}

// Step of a complete checkpoint file name ("ckpt-00000120.h5" -> 120), or -1.
int64_t step_of(const std::string& name) {
  if (name.size() < 9 || name.rfind("ckpt-", 0) != 0 || name.substr(name.size() - 3) != ".h5")
    return -1;
  const std::string digits = name.substr(5, name.size() - 8);
  if (digits.empty() || !std::all_of(digits.begin(), digits.end(), ::isdigit)) return -1;
  return std::stoll(digits);
}

// Complete checkpoints in `dir`, oldest first.
std::vector<std::pair<int64_t, std::string>> list_checkpoints(const std::string& dir) {
  std::vector<std::pair<int64_t, std::string>> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const int64_t s = step_of(e.path().filename().string());
    if (s >= 0 && e.is_regular_file()) out.emplace_back(s, e.path().string());
  }
  std::sort(out.begin(), out.end());
  return out;
}

// DIR/<pointer> (`latest`, `verified`) names checkpoint `name`, replaced atomically through
// DIR/<pointer>.tmp, which a failure removes (the pointer then still names what it named).
void write_pointer(const std::string& dir, const char* pointer, const std::string& name) {
  const std::string path = dir + "/" + pointer, tmp = path + ".tmp";
  try {
    write_synced(tmp, name + "\n");
    rename_synced(tmp, path, dir);
  } catch (const UserError&) {
    std::error_code ec;
    fs::remove(tmp, ec);
    throw;
  }
}

// The checkpoint file DIR/<pointer> names, or "" (no pointer, or it names no file).
std::string read_pointer(const std::string& dir, const char* pointer) {
  std::ifstream f(dir + "/" + pointer);
  std::string name;
  if (!(f && std::getline(f, name)) || step_of(name) < 0 || !fs::exists(dir + "/" + name))
    return "";
  return name;
}

// The model keys that decide parameter shapes: a checkpoint loads only into a config that
// agrees on all of them.
void check_same_model(const ModelConfig& saved, const ModelConfig& cfg, const std::string& path,
                      const std::string& config_source) {
  auto same = [&](const char* key, const auto& a, const auto& b) {
    SWT_USER_CHECK(a == b,
                   "{}: model.{} is {} in the checkpoint but {} in the config ({}); a checkpoint "
                   "loads only into a model of the same dimensions",
                   path, key, a, b, config_source);
  };
  same("vocab_size", saved.vocab_size, cfg.vocab_size);
  same("d_model", saved.d_model, cfg.d_model);
  same("d_ff", saved.d_ff, cfg.d_ff);
  same("d_kv", saved.d_kv, cfg.d_kv);
  same("num_heads", saved.num_heads, cfg.num_heads);
  same("num_layers", saved.num_layers, cfg.num_layers);
  same("num_decoder_layers", saved.num_decoder_layers, cfg.num_decoder_layers);
  same("num_experts", saved.num_experts, cfg.num_experts);
  same("encoder_sparse_step", saved.encoder_sparse_step, cfg.encoder_sparse_step);
  same("decoder_sparse_step", saved.decoder_sparse_step, cfg.decoder_sparse_step);
  same("relative_attention_num_buckets", saved.relative_attention_num_buckets,
       cfg.relative_attention_num_buckets);
  same("feed_forward_proj", saved.feed_forward_proj, cfg.feed_forward_proj);
  same("tie_word_embeddings", saved.tie_word_embeddings, cfg.tie_word_embeddings);
}

void check_format(const H5CheckpointReader& r) {
  SWT_USER_CHECK(r.has_attribute("format") && r.string_attribute("format") == kFormat,
                 "{}: not a switcht5 checkpoint (no format = \"{}\" attribute)", r.path(), kFormat);
  const int64_t v = r.int_attribute("format_version");
  SWT_USER_CHECK(v == kFormatVersion,
                 "{}: checkpoint format version {}, this build reads version {}", r.path(), v,
                 kFormatVersion);
}

RunConfig stored_config(const H5CheckpointReader& r, const std::vector<std::string>& overrides) {
  check_format(r);
  return parse_config(r.string_attribute("config"), r.path() + ":config", overrides);
}

// The datasets of a whole model's parameters (`ps` registered unsharded), as slots without data.
std::vector<TensorSlot> expected_param_slots(const ParamStore& ps) {
  std::vector<TensorSlot> out;
  for (const ParamInfo& p : ps.infos()) {
    TensorSlot s;
    s.path = "params/" + p.name;
    s.full_shape = p.logical_shape();
    out.push_back(std::move(s));
  }
  return out;
}

// The datasets of the state train.optimizer `name` keeps for the whole model `ps` (registered
// unsharded): the names and logical shapes Optimizer::state() gives them (train/optimizer.h;
// the tests inspect checkpoints of both optimizers on several layouts, which fails where the two
// disagree). Empty for an unknown name.
std::vector<TensorSlot> expected_optimizer_slots(const std::string& name, const ParamStore& ps) {
  std::vector<TensorSlot> out;
  auto add = [&](const std::string& tensor, std::vector<int64_t> shape) {
    TensorSlot s;
    s.path = "optimizer/" + tensor;
    s.full_shape = std::move(shape);
    out.push_back(std::move(s));
  };
  for (const ParamInfo& p : ps.infos()) {
    const std::vector<int64_t>& shape = p.logical_shape();
    if (name == "adamw") {
      add(p.name + ".exp_avg", shape);
      add(p.name + ".exp_avg_sq", shape);
    } else if (name == "adafactor") {
      if (!adafactor_factored(p)) {
        add(p.name + ".exp_avg_sq", shape);
        continue;
      }
      // [.., R, C] -> exp_avg_sq_row [.., R] and exp_avg_sq_col [.., C]; stacked experts keep E.
      std::vector<int64_t> row(shape.begin(), shape.end() - 1), col = row;
      col.back() = shape.back();
      add(p.name + ".exp_avg_sq_row", row);
      add(p.name + ".exp_avg_sq_col", col);
    }
  }
  return out;
}

// What a checkpoint holds besides its tensors' values, checked one way for every reader:
// loading (against the run's config and the slots it will read) and `switcht5 inspect` and
// pruning (verify_file: against the config the file stores), so that inspect passes exactly
// the files that load. Format and version, the stored config, the model's dimensions, the
// attributes a resume reads, and every dataset: present as float32 with its shape and a
// checksum, and none that the model and optimizer do not have. UserError naming the file and
// the first problem. Returns whether the optimizer state is to be read (`optimizer` non-empty
// and the file has an /optimizer group).
bool check_contents(const H5CheckpointReader& r, const RunConfig& cfg,
                    const std::vector<TensorSlot>& params,
                    const std::vector<TensorSlot>& optimizer) {
  const std::string& path = r.path();
  const RunConfig saved = stored_config(r, {});
  check_same_model(saved.model, cfg.model, path, cfg.source_path);
  (void)r.int_attribute("step");
  const bool with_state = !optimizer.empty() && r.has_group("optimizer");
  if (with_state) {
    const std::string opt = r.string_attribute("optimizer");
    SWT_USER_CHECK(opt == cfg.train.optimizer,
                   "{}: the checkpoint holds {} state but the config's train.optimizer is {} ({})",
                   path, opt, cfg.train.optimizer, cfg.source_path);
    (void)r.int_attribute("optimizer_steps");
    (void)r.int_attribute("consecutive_skips");
    // Loader states are global positions (data/loader.h): the same on every data rank, so any
    // data-parallel degree continues from the first.
    const std::vector<std::string> states = r.string_list_attribute("data_loader_states");
    SWT_USER_CHECK(!states.empty() && std::all_of(states.begin(), states.end(),
                                                   [&](const std::string& s) { return s == states[0]; }),
                   "{}: data_loader_states disagree across data ranks", path);
  }
  std::set<std::string> expected;
  for (const TensorSlot& s : params) {
    r.check_dataset(s.path, s.full_shape);
    expected.insert(s.path);
  }
  for (const TensorSlot& s : with_state ? optimizer : std::vector<TensorSlot>{}) {
    r.check_dataset(s.path, s.full_shape);
    expected.insert(s.path);
  }
  for (const std::string& d : r.datasets()) {
    // Optimizer state that is not read (evaluation, a run without state) is not checked.
    if (expected.count(d) || (!with_state && d.rfind("optimizer/", 0) == 0)) continue;
    throw UserError(fmt::format("{}: dataset \"{}\" is not a tensor of the model{} that the "
                                "config describes",
                                path, d, with_state ? " and optimizer" : ""));
  }
  return with_state;
}

// The strict check of a checkpoint file by one process, against the config it stores, exactly
// as strict as a resume: check_contents, then every dataset's data (dataset_data_problem, the
// rule H5CheckpointReader::read applies), in the order a resume reads them. `scans` holds the
// scans already made (inspect's report) and receives the others. UserError at the first problem.
void verify_file(H5CheckpointReader& r,
                 std::map<std::string, H5CheckpointReader::DatasetScan>& scans) {
  const RunConfig saved = stored_config(r, {});
  ParamStore ps;
  register_model_params(ps, saved.model);
  std::vector<TensorSlot> slots = expected_param_slots(ps);
  const std::vector<TensorSlot> optimizer = expected_optimizer_slots(saved.train.optimizer, ps);
  if (check_contents(r, saved, slots, optimizer))
    slots.insert(slots.end(), optimizer.begin(), optimizer.end());
  for (const TensorSlot& s : slots) {
    auto it = scans.find(s.path);
    if (it == scans.end()) it = scans.emplace(s.path, r.scan_dataset(s.path)).first;
    const std::string problem = dataset_data_problem(r.path(), s.path, r.stored_checksum(s.path),
                                                     it->second.checksum, it->second.nonfinite);
    if (!problem.empty()) throw UserError(problem);
  }
}

// verify_file's verdict on `path`: "" when it verifies, else the reason.
std::string checkpoint_problem(const std::string& path) {
  try {
    auto self = make_self_communicator();
    H5CheckpointReader r(path, *self);
    std::map<std::string, H5CheckpointReader::DatasetScan> scans;
    verify_file(r, scans);
    return "";
  } catch (const std::exception& e) {
    return e.what();
  }
}

// Refuses to save non-finite values (a run gone bad; collective, before anything is written):
// each owner counts its blocks' non-finite values, and every rank throws the same
// AgreedUserError (rank 0 reports it, every rank exits 2), naming the first tensor that holds
// any and the checkpoint that stays the newest.
void refuse_nonfinite(const TrainingState& st, const std::vector<TensorSlot>& slots,
                      const std::string& dir) {
  std::vector<int64_t> bad(slots.size(), 0);
  for (size_t i = 0; i < slots.size(); ++i) {
    const TensorSlot& s = slots[i];
    if (!s.owner || !s.data) continue;
    int64_t n = 1;
    for (int64_t d : s.count) n *= d;
    bad[i] = st.backend.count_nonfinite(s.data, n);
  }
  if (!bad.empty()) st.grid.world->all_reduce_sum(bad.data(), int64_t(bad.size()));
  const auto first = std::find_if(bad.begin(), bad.end(), [](int64_t n) { return n > 0; });
  if (first == bad.end()) return;
  const TensorSlot& s = slots[size_t(first - bad.begin())];
  const bool param = s.path.rfind("params/", 0) == 0;
  const int64_t tensors = std::count_if(bad.begin(), bad.end(), [](int64_t n) { return n > 0; });
  std::string previous;  // rank 0 reads the directory, every rank says the same
  if (st.grid.is_root()) {
    previous = read_pointer(dir, "latest");
    if (previous.empty()) {
      const auto all = list_checkpoints(dir);
      if (!all.empty()) previous = fs::path(all.back().second).filename().string();
    }
  }
  st.grid.world->broadcast(previous, 0);
  throw AgreedUserError(fmt::format(
      "refusing to save checkpoint step {}: {} {} holds {} non-finite values (NaN or Inf){}; {}",
      st.step, param ? "parameter" : "optimizer state", s.path.substr(s.path.find('/') + 1), *first,
      tensors > 1 ? fmt::format(", and {} more tensors do", tensors - 1) : "",
      previous.empty() ? fmt::format("{} holds no earlier checkpoint", dir)
                       : fmt::format("the previous checkpoint {}/{} is kept", dir, previous)));
}

// Pruning (rank 0, once `latest` names the checkpoint just written): keeps the newest
// checkpoint.keep checkpoints by step (the one just written always among them) and removes the
// older ones and stale temporaries, but never the newest checkpoint that verifies
// (checkpoint_problem: checksums match, values finite). DIR/verified names the newest checkpoint
// known to verify; checkpoints are read back only when pruning would remove that one (or there
// is no record), newest first until one verifies: with keep = K one read every K - 1 saves,
// of the checkpoint just written unless it does not verify. Returns what the log should say.
std::vector<std::string> prune(const std::string& dir, const std::string& just_written, int keep) {
  std::vector<std::string> notes;
  std::vector<std::string> kept, doomed;  // newest first
  const auto all = list_checkpoints(dir);
  int others = 0;
  for (auto it = all.rbegin(); it != all.rend(); ++it)
    (it->second == just_written || others++ < keep - 1 ? kept : doomed).push_back(it->second);
  auto name_of = [](const std::string& p) { return fs::path(p).filename().string(); };
  const std::string record = read_pointer(dir, "verified");
  const bool record_kept = std::any_of(kept.begin(), kept.end(), [&](const std::string& p) {
    return name_of(p) == record;
  });
  if (!doomed.empty() && !record_kept) {
    std::vector<std::string> order = kept;
    order.insert(order.end(), doomed.begin(), doomed.end());
    for (const std::string& p : order) {
      std::string problem = name_of(p) == record ? "" : checkpoint_problem(p);
      if (!problem.empty()) {
        notes.push_back(fmt::format("{} does not verify: {}", p, problem));
        continue;
      }
      if (name_of(p) != record) {
        try {
          write_pointer(dir, "verified", name_of(p));
        } catch (const UserError& e) {
          notes.push_back(e.what());
        }
      }
      const auto at = std::find(doomed.begin(), doomed.end(), p);
      if (at != doomed.end()) {
        doomed.erase(at);
        notes.push_back(fmt::format("kept {} beyond checkpoint.keep = {}: the newest checkpoint "
                                    "that verifies",
                                    p, keep));
      }
      break;
    }
  }
  for (const std::string& p : doomed) {
    std::error_code ec;
    fs::remove(p, ec);
    if (ec) notes.push_back(fmt::format("{}: cannot remove: {}", p, ec.message()));
  }
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string f = e.path().filename().string();
    if (f.size() > 7 && f.rfind("ckpt-", 0) == 0 && f.substr(f.size() - 7) == ".h5.tmp")
      fs::remove(e.path(), ec);
  }
  return notes;
}

}  // namespace

std::string checkpoint_file_name(int64_t step) { return fmt::format("ckpt-{:08d}.h5", step); }

std::string checkpoint_dir(const RunConfig& cfg, const std::string& run_dir) {
  return cfg.checkpoint.dir.empty() ? run_dir + "/checkpoints" : cfg.checkpoint.dir;
}

SaveResult save_checkpoint(const TrainingState& state, const std::string& dir) {
  const auto t0 = std::chrono::steady_clock::now();
  ProcessGrid& g = state.grid;
  const RunConfig& cfg = state.config;
  const int64_t step = state.step;
  std::vector<TensorSlot> slots = param_slots(state);
  for (TensorSlot& s : optimizer_slots(state)) slots.push_back(std::move(s));
  state.backend.synchronize();
  refuse_nonfinite(state, slots, dir);
  on_root(g, [&] {
    std::error_code ec;
    fs::create_directories(dir, ec);
    SWT_USER_CHECK(!ec, "checkpoint.dir {}: cannot create: {}", dir, ec.message());
  });

  H5Attributes a;
  a.strings["format"] = kFormat;
  a.ints["format_version"] = kFormatVersion;
  a.ints["step"] = step;
  a.ints["optimizer_steps"] = state.optimizer_steps;
  a.ints["consecutive_skips"] = state.consecutive_skips;
  a.strings["optimizer"] = cfg.train.optimizer;
  a.strings["config"] = to_yaml(cfg);
  a.strings["layout"] = layout_text(cfg, g.world_size);
  a.ints["layout_data"] = g.data;
  a.ints["layout_model"] = g.model;
  a.ints["layout_expert"] = g.expert;
  a.ints["layout_zero1"] = cfg.parallel.zero1 ? 1 : 0;
  a.ints["world_size"] = g.world_size;
  a.string_lists["data_loader_states"] = gather_loader_states(state);
  a.strings["seed"] = fmt::format("{}", cfg.train.seed);
  a.strings["rng"] =
      "counter-based: every random draw (init, dropout, router jitter, data order, span "
      "corruption) is a pure function of (train.seed, step, index); no stream state";
  a.strings["schedule"] = fmt::format("train.schedule {} is a function of the step: lr = {:.9g} at "
                                      "the next step",
                                      cfg.train.schedule,
                                      LrSchedule({cfg.train.schedule, cfg.train.learning_rate,
                                                  cfg.train.warmup_steps, cfg.train.steps,
                                                  cfg.train.min_learning_rate})
                                          .lr(step + 1));
  a.strings["checksum_algorithm"] =
      "sum mod 2^64 over elements i (row-major index in the logical tensor) of "
      "mix64(mix64(i) + float32 bits of element i); mix64 = splitmix64 finalizer";

  const std::string name = checkpoint_file_name(step);
  const std::string final_path = dir + "/" + name, tmp = final_path + ".tmp";
  // A failed write removes the .tmp and throws the same error on every rank (h5_file.h).
  write_h5_checkpoint(tmp, *g.world, a, slots, [&](size_t k, size_t total) {
    if (k == total / 2) maybe_crash("datasets", step);
  });
  g.world->barrier();
  maybe_crash("written", step);
  SaveResult result;
  on_root(g, [&] {
    try {
      fsync_path(tmp, false);
      rename_synced(tmp, final_path, dir);
    } catch (const UserError&) {
      std::error_code ec;
      fs::remove(tmp, ec);
      throw;
    }
    maybe_crash("renamed", step);
    const std::string previous = read_pointer(dir, "latest");
    try {
      write_pointer(dir, "latest", name);
    } catch (const UserError& e) {
      throw UserError(fmt::format("{}; {} is complete, but `latest` still names {}", e.what(),
                                  final_path, previous.empty() ? "nothing" : previous));
    }
    maybe_crash("latest", step);
    maybe_damage(final_path, step);
    result.notes = prune(dir, final_path, cfg.checkpoint.keep);
    std::error_code ec;
    result.bytes = int64_t(fs::file_size(final_path, ec));
  });
  result.path = final_path;
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

std::string resolve_resume(const std::string& arg, const std::string& dir) {
  auto latest_in = [](const std::string& d) -> std::string {
    const std::string name = read_pointer(d, "latest");
    if (!name.empty()) return d + "/" + name;
    auto all = list_checkpoints(d);  // no (valid) pointer: the newest complete file
    return all.empty() ? std::string() : all.back().second;
  };
  if (arg == "auto") return latest_in(dir);
  if (fs::is_directory(arg)) {
    std::string p = latest_in(arg);
    SWT_USER_CHECK(!p.empty(), "--resume {}: the directory holds no checkpoint (ckpt-*.h5)", arg);
    return p;
  }
  SWT_USER_CHECK(fs::exists(arg), "{}: no such file or directory (expected a checkpoint file or "
                                  "a checkpoint directory)",
                 arg);
  if (fs::path(arg).filename() == "latest") {
    std::ifstream f(arg);
    std::string name;
    SWT_USER_CHECK(f && std::getline(f, name) && step_of(name) >= 0,
                   "{}: expected the name of a checkpoint file (ckpt-<step>.h5)", arg);
    const std::string named = (fs::path(arg).parent_path() / name).string();
    require_regular_file(named, "checkpoint");
    return named;
  }
  // A FIFO or a device named as a checkpoint would block HDF5's open or read for ever.
  require_regular_file(arg, "checkpoint");
  return arg;
}

LoadResult load_checkpoint(TrainingState& state, const std::string& path, bool training_state) {
  ProcessGrid& g = state.grid;
  const RunConfig& cfg = state.config;
  H5CheckpointReader r(path, *g.world);
  std::vector<TensorSlot> slots = param_slots(state);
  const std::vector<TensorSlot> optimizer =
      training_state ? optimizer_slots(state) : std::vector<TensorSlot>{};
  const bool with_state = check_contents(r, cfg, slots, optimizer);
  if (with_state) slots.insert(slots.end(), optimizer.begin(), optimizer.end());

  LoadResult result;
  result.step = r.int_attribute("step");
  result.layout = r.has_attribute("layout") ? r.string_attribute("layout") : "unknown";
  r.read(slots);  // checksums and finiteness
  state.params.refresh_compute_copy(state.backend);  // bf16 compute copies follow the masters
  state.backend.synchronize();
  state.step = result.step;
  if (with_state) {
    state.optimizer_steps = r.int_attribute("optimizer_steps");
    state.consecutive_skips = int(r.int_attribute("consecutive_skips"));
    state.loader_state = r.string_list_attribute("data_loader_states")[0];  // checked: all equal
    result.training_state = true;
  }
  return result;
}

RunConfig checkpoint_config(const std::string& path, const std::vector<std::string>& overrides) {
  auto self = make_self_communicator();
  H5CheckpointReader r(path, *self);
  return stored_config(r, overrides);
}

int inspect_checkpoint(const std::string& path) {
  auto self = make_self_communicator();
  H5CheckpointReader r(path, *self);
  // The report first, as much of it as the file allows; then the verdict (verify_file).
  auto text_or_problem = [](const std::function<std::string()>& f) {
    try {
      return f();
    } catch (const std::exception& e) {
      return fmt::format("(unreadable: {})", e.what());
    }
  };
  fmt::print("checkpoint: {}\n", path);
  for (const std::string& name : r.attribute_names()) {
    if (name == "config" || name == "data_loader_states") continue;
    fmt::print("  {}: {}\n", name, text_or_problem([&] { return r.attribute_text(name); }));
  }
  if (r.has_attribute("data_loader_states")) {
    try {
      const std::vector<std::string> states = r.string_list_attribute("data_loader_states");
      for (size_t i = 0; i < states.size(); ++i)
        fmt::print("  data_loader_states[{}]: {}\n", i, states[i]);
    } catch (const std::exception& e) {
      fmt::print("  data_loader_states: (unreadable: {})\n", e.what());
    }
  }
  const std::vector<std::string> names = r.datasets();
  std::map<std::string, H5CheckpointReader::DatasetScan> scans;
  int mismatched = 0, nonfinite = 0;
  int64_t elements = 0;
  fmt::print("datasets: {}\n", names.size());
  for (const std::string& d : names) {
    const std::vector<int64_t> shape = r.shape(d);
    const std::string dtype = r.dtype(d);
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    elements += n;
    const std::string verdict = text_or_problem([&]() -> std::string {
      if (dtype != "float32") return "(not float32)";
      const uint64_t stored = r.stored_checksum(d);
      const H5CheckpointReader::DatasetScan scan = scans.emplace(d, r.scan_dataset(d)).first->second;
      std::string v = fmt::format("checksum {:#018x} ", stored);
      if (scan.checksum != stored) {
        ++mismatched;
        return v + fmt::format("MISMATCH (computed {:#018x})", scan.checksum);
      }
      if (scan.nonfinite > 0) {
        ++nonfinite;
        return v + fmt::format("ok, {} NON-FINITE", scan.nonfinite);
      }
      return v + "ok";
    });
    fmt::print("  {:<72} {:<8} [{}]  {}\n", d, dtype, fmt::join(shape, ", "), verdict);
  }
  fmt::print("elements: {} ({:.1f} MB float32); checksums: {}{}\n", elements, elements * 4e-6,
             mismatched ? fmt::format("{} of {} MISMATCH", mismatched, names.size())
                        : fmt::format("all {} verified", names.size()),
             nonfinite ? fmt::format("; {} dataset(s) hold non-finite values", nonfinite) : "");
  if (r.has_attribute("config"))
    fmt::print("config:\n{}", text_or_problem([&] { return r.string_attribute("config"); }));
  std::fflush(stdout);
  verify_file(r, scans);  // UserError with the reason, as loading would give it
  return 0;
}

}  // namespace switcht5
