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

#include "checkpoint/h5_file.h"
#include "comm/communicator.h"
#include "core/check.h"
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

void fsync_path(const std::string& path, bool directory) {
  const int fd = ::open(path.c_str(), directory ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  SWT_CHECK(fd >= 0, "{}: cannot open to sync: {}", path, std::strerror(errno));
  const int rc = ::fsync(fd);
  const int err = errno;
  ::close(fd);
  SWT_CHECK(rc == 0, "{}: fsync failed: {}", path, std::strerror(err));
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

void write_latest(const std::string& dir, const std::string& name) {
  const std::string tmp = dir + "/latest.tmp";
  {
    std::ofstream f(tmp, std::ios::trunc);
    f << name << "\n";
    f.flush();
    SWT_USER_CHECK(f.good(), "{}: cannot write", tmp);
  }
  fsync_path(tmp, false);
  fs::rename(tmp, dir + "/latest");
  fsync_path(dir, true);
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
  if (g.is_root()) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    SWT_USER_CHECK(!ec, "checkpoint.dir {}: cannot create: {}", dir, ec.message());
  }
  g.world->barrier();

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

  std::vector<TensorSlot> slots = param_slots(state);
  for (TensorSlot& s : optimizer_slots(state)) slots.push_back(std::move(s));

  const std::string name = checkpoint_file_name(step);
  const std::string final_path = dir + "/" + name, tmp = final_path + ".tmp";
  state.backend.synchronize();
  write_h5_checkpoint(tmp, *g.world, a, slots, [&](size_t k, size_t total) {
    if (k == total / 2) maybe_crash("datasets", step);
  });
  g.world->barrier();
  maybe_crash("written", step);
  SaveResult result;
  if (g.is_root()) {
    fsync_path(tmp, false);
    fs::rename(tmp, final_path);
    fsync_path(dir, true);
    maybe_crash("renamed", step);
    write_latest(dir, name);
    maybe_crash("latest", step);
    // Prune: keep the newest `keep` (by step) and the one just written; drop stale temporaries.
    auto all = list_checkpoints(dir);
    int kept = 0;
    for (auto it = all.rbegin(); it != all.rend(); ++it)
      if (it->second != final_path && ++kept >= cfg.checkpoint.keep) fs::remove(it->second);
    std::error_code ec;
    for (const auto& e : fs::directory_iterator(dir, ec)) {
      const std::string f = e.path().filename().string();
      if (f.size() > 7 && f.rfind("ckpt-", 0) == 0 && f.substr(f.size() - 7) == ".h5.tmp")
        fs::remove(e.path(), ec);
    }
    result.bytes = int64_t(fs::file_size(final_path));
  }
  g.world->barrier();
  result.path = final_path;
  result.seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

std::string resolve_resume(const std::string& arg, const std::string& dir) {
  auto latest_in = [](const std::string& d) -> std::string {
    std::ifstream f(d + "/latest");
    std::string name;
    if (f && std::getline(f, name) && !name.empty() && fs::exists(d + "/" + name))
      return d + "/" + name;
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
    return (fs::path(arg).parent_path() / name).string();
  }
  return arg;
}

LoadResult load_checkpoint(TrainingState& state, const std::string& path, bool training_state) {
  ProcessGrid& g = state.grid;
  const RunConfig& cfg = state.config;
  H5CheckpointReader r(path, *g.world);
  check_format(r);
  const RunConfig saved = parse_config(r.string_attribute("config"), path + ":config", {});
  check_same_model(saved.model, cfg.model, path, cfg.source_path);

  LoadResult result;
  result.step = r.int_attribute("step");
  result.layout = r.has_attribute("layout") ? r.string_attribute("layout") : "unknown";
  std::vector<TensorSlot> slots = param_slots(state);
  const bool with_state = training_state && r.has_group("optimizer");
  if (with_state) {
    const std::string opt = r.string_attribute("optimizer");
    SWT_USER_CHECK(opt == cfg.train.optimizer,
                   "{}: the checkpoint holds {} state but the config's train.optimizer is {} ({})",
                   path, opt, cfg.train.optimizer, cfg.source_path);
    for (TensorSlot& s : optimizer_slots(state)) slots.push_back(std::move(s));
  }
  r.read(slots);
  state.params.refresh_compute_copy(state.backend);  // bf16 compute copies follow the masters
  state.backend.synchronize();
  state.step = result.step;
  if (with_state) {
    state.optimizer_steps = r.int_attribute("optimizer_steps");
    state.consecutive_skips = int(r.int_attribute("consecutive_skips"));
    // Loader states are global positions (data/loader.h): the same on every data rank, so any
    // data-parallel degree continues from the first.
    const std::vector<std::string> states = r.string_list_attribute("data_loader_states");
    SWT_USER_CHECK(!states.empty() && std::all_of(states.begin(), states.end(),
                                                   [&](const std::string& s) { return s == states[0]; }),
                   "{}: data_loader_states disagree across data ranks", path);
    state.loader_state = states[0];
    result.training_state = true;
  }
  return result;
}

RunConfig checkpoint_config(const std::string& path, const std::vector<std::string>& overrides) {
  auto self = make_self_communicator();
  H5CheckpointReader r(path, *self);
  check_format(r);
  return parse_config(r.string_attribute("config"), path + ":config", overrides);
}

int inspect_checkpoint(const std::string& path) {
  auto self = make_self_communicator();
  H5CheckpointReader r(path, *self);
  check_format(r);
  fmt::print("checkpoint: {}\n", path);
  for (const std::string& name : r.attribute_names()) {
    if (name == "config" || name == "data_loader_states") continue;
    fmt::print("  {}: {}\n", name, r.attribute_text(name));
  }
  if (r.has_attribute("data_loader_states")) {
    const auto states = r.string_list_attribute("data_loader_states");
    for (size_t i = 0; i < states.size(); ++i)
      fmt::print("  data_loader_states[{}]: {}\n", i, states[i]);
  }
  const std::vector<std::string> names = r.datasets();
  int bad = 0;
  int64_t elements = 0;
  fmt::print("datasets: {}\n", names.size());
  for (const std::string& d : names) {
    const std::vector<int64_t> shape = r.shape(d);
    int64_t n = 1;
    for (int64_t x : shape) n *= x;
    elements += n;
    const uint64_t stored = r.stored_checksum(d);
    const uint64_t computed = r.compute_checksum(d);
    bad += stored != computed;
    fmt::print("  {:<72} {:<8} [{}]  checksum {:#018x} {}\n", d, r.dtype(d),
               fmt::join(shape, ", "), stored,
               stored == computed ? "ok" : fmt::format("MISMATCH (computed {:#018x})", computed));
  }
  fmt::print("elements: {} ({:.1f} MB float32); checksums: {}\n", elements, elements * 4e-6,
             bad ? fmt::format("{} of {} MISMATCH", bad, names.size())
                 : fmt::format("all {} verified", names.size()));
  fmt::print("config:\n{}", r.string_attribute("config"));
  if (bad) {
    std::fprintf(stderr, "switcht5: error: %s: %d dataset(s) fail their checksum: the file is corrupt\n",
                 path.c_str(), bad);
    return 2;
  }
  return 0;
}

}  // namespace switcht5
