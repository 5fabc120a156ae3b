// switcht5: train, evaluate and inspect Switch Transformers (usage in kUsage below).
// Exit codes: 0 success, 2 anything the user can fix (config, CLI, data, checkpoint, storage,
// memory; fail_with below), 1 an internal error, 128 + signal number when SIGTERM / SIGUSR1 /
// SIGINT stopped training after saving a checkpoint (130 also for a second SIGINT, which exits
// at once), 3 when a collective, a checkpoint read or write or a wait for the data loader
// missed its deadline (parallel.timeout_s; comm/watchdog.h). Under MPI a failing rank prints its error tagged with
// the rank and ends every rank of the job.
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <new>
#include <set>
#include <string>
#include <vector>

#include <fmt/format.h>

#include "backend/cuda/cuda_memory.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/h5_file.h"
#include "comm/mpi_communicator.h"
#include "comm/process_grid.h"
#include "core/check.h"
#include "config/config.h"
#include "model/flops.h"
#include "model/model.h"
#include "train/batch_source.h"
#include "train/comm_plan.h"
#include "train/memory_plan.h"
#include "train/optimizer.h"
#include "train/metrics.h"
#include "train/trainer.h"

namespace {

using namespace switcht5;

constexpr const char* kUsage =
    "usage: switcht5 <command> [options]\n"
    "commands:\n"
    "  train --config FILE [--run-dir DIR] [--resume auto|CKPT|CKPT_DIR] [--set section.key=value ...]\n"
    "        train a model; DIR (default: log.run_dir, else runs/<config name>) receives\n"
    "        config.yaml, train.log, metrics.jsonl and checkpoints/ (checkpoint.dir)\n"
    "  eval  --checkpoint CKPT [--config FILE] [--set ...] [--dump-batch OUT.h5 [--force]]\n"
    "        validation loss of a checkpoint as one JSON line, on any layout (the config\n"
    "        defaults to the checkpoint's own, with one data-parallel rank per process);\n"
    "        --dump-batch never overwrites an existing file unless --force\n"
    "  inspect CKPT   (CKPT: a checkpoint file, a checkpoint directory or its latest file)\n"
    "        datasets, shapes, dtypes, step, layout, config and checksum status of a checkpoint\n"
    "  inspect --hf-names CKPT | --config FILE [--set ...]\n"
    "        the HuggingFace state_dict names of the model's parameters as JSON (HF key ->\n"
    "        internal name, offset, shape); scripts/export_hf.py and import_hf.py use it\n"
    "  plan  --config FILE [--set section.key=value ...] [--json] [--device-memory-gb GB]\n"
    "        [--world-size N] [--gpus-per-node G] [--nvlink-gbs X] [--network-gbs X]\n"
    "        [--gpu-tflops X] [--mfu F]\n"
    "        validate a config and print the model's parameters, capacities, FLOPs and the\n"
    "        backend memory one rank allocates (counted from the training code's own\n"
    "        allocations), against the device's memory for train.backend cuda (default 141 GB);\n"
    "        then what a rank communicates per step, collective by collective, with a time\n"
    "        estimate from link speeds (defaults: 8 GPUs per node, NVLink 370 GB/s, network\n"
    "        50 GB/s per GPU, 989 TFLOP/s at 40% MFU) and the predicted step time and\n"
    "        weak-scaling efficiency; --world-size N plans N ranks (parallel.data = N /\n"
    "        parallel.model); --json: the same as one JSON object\n"
    "  config-reference\n"
    "        every config key (type, default, allowed values, meaning) as a markdown table, the\n"
    "        README's config reference\n";
// Set once the process grid exists; read by the error path in main().
int g_world_rank = 0;
int g_world_size = 1;

struct Args {
  std::string command;
  std::string config;
  std::string run_dir;
  std::string resume;
  std::string checkpoint;
  std::string dump_batch;
  bool force = false;             // eval --force: --dump-batch may overwrite
  bool hf_names = false;
  bool json = false;              // plan --json
  double device_memory_gb = 0.0;  // plan --device-memory-gb (0: the default device)
  int world_size = 0;             // plan --world-size (0: as the config's parallel section)
  LinkModel links;                // plan --gpus-per-node, --nvlink-gbs, ...
  std::vector<std::string> positional;
  std::vector<std::string> overrides;
};

// A command-line number > 0 (a whole one when `whole`), or a UserError naming the flag.
double positive_number(const std::string& flag, const std::string& v, const char* expected,
                       bool whole = false) {
  char* end = nullptr;
  const double x = std::strtod(v.c_str(), &end);
  SWT_USER_CHECK(end != v.c_str() && *end == '\0' && x > 0 && (!whole || x == double(int64_t(x))) &&
                     x < 1e15,
                 "{} \"{}\": expected {}", flag, v, expected);
  return x;
}

Args parse_args(int argc, char** argv) {
  Args a;
  SWT_USER_CHECK(argc >= 2, "missing command (see switcht5 --help)");
  a.command = argv[1];
  std::set<std::string> given;  // options seen: each but --set is given at most once
  for (int i = 2; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      SWT_USER_CHECK(i + 1 < argc, "{} needs a value", flag);
      return argv[++i];
    };
    // A second value would silently replace the first (a pasted command line keeping an old
    // --run-dir, say); --set repeats by design, one override each.
    SWT_USER_CHECK(flag.rfind("-", 0) != 0 || flag == "--set" || flag.rfind("--set=", 0) == 0 ||
                       given.insert(flag).second,
                   "{} is given twice; give it once", flag);
    if (flag == "--config") a.config = value();
    else if (flag == "--run-dir") a.run_dir = value();
    else if (flag == "--resume") a.resume = value();
    else if (flag == "--checkpoint") a.checkpoint = value();
    else if (flag == "--dump-batch") a.dump_batch = value();
    else if (flag == "--force" && a.command == "eval") a.force = true;
    else if (flag == "--hf-names" && a.command == "inspect") a.hf_names = true;
    else if (flag == "--json" && a.command == "plan") a.json = true;
    else if (flag == "--device-memory-gb" && a.command == "plan")
      a.device_memory_gb = positive_number(flag, value(), "a number of GB (10^9 bytes) > 0");
    else if (flag == "--world-size" && a.command == "plan")
      a.world_size = int(positive_number(flag, value(), "a whole number of ranks >= 1", true));
    else if (flag == "--gpus-per-node" && a.command == "plan")
      a.links.gpus_per_node = int(positive_number(flag, value(), "a whole number >= 1", true));
    else if (flag == "--nvlink-gbs" && a.command == "plan")
      a.links.nvlink_gb_per_s = positive_number(flag, value(), "GB/s > 0");
    else if (flag == "--network-gbs" && a.command == "plan")
      a.links.network_gb_per_s = positive_number(flag, value(), "GB/s > 0");
    else if (flag == "--gpu-tflops" && a.command == "plan")
      a.links.gpu_tflops = positive_number(flag, value(), "TFLOP/s > 0");
    else if (flag == "--mfu" && a.command == "plan") {
      a.links.mfu = positive_number(flag, value(), "a fraction in (0, 1]");
      SWT_USER_CHECK(a.links.mfu <= 1.0, "--mfu \"{}\": expected a fraction in (0, 1]", a.links.mfu);
    }
    else if (flag == "--set") a.overrides.push_back(value());
    else if (flag.rfind("--set=", 0) == 0) a.overrides.push_back(flag.substr(6));
    else if (flag.rfind("-", 0) != 0) a.positional.push_back(flag);
    else SWT_USER_CHECK(false, "unknown option \"{}\" for \"{}\" (see switcht5 --help)", flag, a.command);
  }
  return a;
}

int cmd_plan(const RunConfig& cfg, const Args& args) {
  ModelConfig m = cfg.model;
  ParamStore ps;
  register_model_params(ps, m);
  int64_t dense = 0, expert = 0;
  for (const ParamInfo& p : ps.infos()) (p.kind == ParamKind::kStacked ? expert : dense) += p.numel;
  const double f = forward_matmul_flops(m, cfg.train.batch_size, cfg.data.inputs_length,
                                        cfg.data.targets_length, true);
  // The model's FLOPs: one sequence, each token through its top-1 expert (no capacity slots).
  const double f_seq =
      forward_matmul_flops(m, 1, cfg.data.inputs_length, cfg.data.targets_length, true, false);
  const int64_t active = active_parameters(m);
  // What one rank allocates in backend memory, counted by building the run's step state on a
  // sizing backend (train/memory_plan.h).
  const MemoryPlan mp = plan_memory(cfg, args.device_memory_gb * 1e9);
  const int64_t host_available = host_memory_available();
  const int64_t process = std::max<int64_t>(0, process_peak_resident());
  const CommPlan cp = plan_communication(cfg, args.links);
  const ParallelConfig& pc = cfg.parallel;
  const LinkModel& lk = args.links;
  if (args.json) {
    std::string out = "{";
    auto field = [&](const std::string& key, const std::string& value) {
      out += fmt::format("{}{}: {}", out.size() > 1 ? ", " : "", json_string(key), value);
    };
    field("config", json_string(cfg.source_path));
    field("parameters", std::to_string(dense + expert));
    field("expert_parameters", std::to_string(expert));
    field("active_parameters", std::to_string(active));
    field("train_flops_per_sequence", fmt::format("{:.6g}", 3 * f_seq));
    field("train_flops_per_step", fmt::format("{:.6g}", 3 * f_seq * cfg.train.batch_size));
    field("train_step_matmul_flops", fmt::format("{:.6g}", 3 * f));
    field("flops_formula", json_string(kMatmulFlopsFormula));
    field("batch_size", std::to_string(cfg.train.batch_size));
    field("micro_batch", std::to_string(mp.micro_batch));
    field("layout", fmt::format("{{\"data\": {}, \"model\": {}, \"expert\": {}, \"zero1\": {}}}",
                                pc.data, pc.model, pc.expert, pc.zero1 ? "true" : "false"));
    field("backend", json_string(mp.backend));
    field("precision", json_string(mp.precision));
    field("optimizer", json_string(cfg.train.optimizer));
    // Bytes, rank 0's share.
    for (const auto& [key, v] : std::initializer_list<std::pair<const char*, int64_t>>{
             {"master_params_bytes", mp.master_params}, {"compute_copy_bytes", mp.compute_copy},
             {"gradients_bytes", mp.gradients}, {"optimizer_state_bytes", mp.optimizer_state},
             {"optimizer_state_without_zero1_bytes", mp.optimizer_unsharded},
             {"kept_activations_bytes", mp.kept_activations},
             {"activation_workspace_bytes", mp.activation_workspace},
             {"inputs_bytes", mp.inputs}, {"statistics_bytes", mp.statistics},
             {"communication_bytes", mp.communication}, {"other_bytes", mp.other},
             {"counted_bytes", mp.counted}, {"rounding_bytes", mp.rounding},
             {"backend_workspace_bytes", mp.backend_workspace}, {"total_bytes", mp.total}})
      field(key, std::to_string(v));
    if (mp.device_memory > 0) {
      field("device_memory_bytes", std::to_string(mp.device_memory));
      field("arena_limit_bytes", std::to_string(mp.arena_limit));
      field("fits", mp.fits ? "true" : "false");
    } else {
      // A backend in host memory: a rank's whole resident memory is the plan's total plus the
      // program's own (measured in this process), and how many such ranks this machine holds.
      field("process_bytes", std::to_string(process));
      field("host_total_bytes", std::to_string(mp.total + process));
      if (host_available >= 0) {
        field("host_memory_available_bytes", std::to_string(host_available));
        field("ranks_fitting_host",
              std::to_string(host_available / std::max<int64_t>(1, mp.total + process)));
      }
    }
    // Communication per rank and step (train/comm_plan.h).
    std::string colls = "[";
    for (const PlannedCollective& c : cp.collectives)
      colls += fmt::format(
          "{}{{\"group\": \"{}\", \"group_size\": {}, \"spans_nodes\": {}, \"collective\": "
          "\"{}\", \"carries\": {}, \"calls\": {}, \"payload_bytes\": {}, \"wire_bytes\": "
          "{:.0f}, \"seconds\": {:.6g}, \"overlapped\": {}}}",
          colls.size() > 1 ? ", " : "", c.group, c.group_size, c.spans_nodes ? "true" : "false",
          collective_name(c.collective), json_string(c.carries), c.calls, 4 * c.floats,
          c.wire_bytes, c.seconds, c.overlapped ? "true" : "false");
    field("communication", colls + "]");
    field("links", fmt::format("{{\"gpus_per_node\": {}, \"nvlink_gb_per_s\": {}, "
                               "\"network_gb_per_s\": {}, \"gpu_tflops\": {}, \"mfu\": {}}}",
                               lk.gpus_per_node, lk.nvlink_gb_per_s, lk.network_gb_per_s,
                               lk.gpu_tflops, lk.mfu));
    field("predicted", fmt::format("{{\"compute_seconds\": {:.6g}, \"communication_seconds\": "
                                   "{:.6g}, \"exposed_communication_seconds\": {:.6g}, "
                                   "\"step_seconds\": {:.6g}, \"scaling_efficiency\": {:.4f}}}",
                                   cp.compute_seconds, cp.comm_seconds, cp.exposed_seconds,
                                   cp.step_seconds, cp.scaling_efficiency));
    fmt::print("{}}}\n", out);
    return 0;
  }

  fmt::print("config: {}\n", cfg.source_path);
  fmt::print("parameters: {} ({} outside experts, {} in experts), {:.1f} MB fp32\n",
             dense + expert, dense, expert, (dense + expert) * 4e-6);
  for (int dec = 0; dec < 2; ++dec) {
    const int layers = dec ? m.num_decoder_layers : m.num_layers;
    const int step = dec ? m.decoder_sparse_step : m.encoder_sparse_step;
    const int T = dec ? cfg.data.targets_length : cfg.data.inputs_length;
    const int S = m.group_size > 0 ? m.group_size : T;
    std::string sparse;
    for (int i = 0; i < layers; ++i)
      if (is_sparse_layer(step, i)) sparse += fmt::format("{}{}", sparse.empty() ? "" : ",", i);
    fmt::print("{}: {} blocks, Switch blocks [{}], group {} tokens, capacity {} train / {} eval\n",
               dec ? "decoder" : "encoder", layers, sparse, S,
               sparse.empty() ? 0 : expert_capacity(m, S, true), sparse.empty() ? 0 : expert_capacity(m, S, false));
  }
  fmt::print("active parameters per token: {} (every parameter outside the experts and one expert "
             "per Switch layer)\n",
             active);
  fmt::print("training FLOPs, each token through its top-1 expert: {:.4g} GFLOP per sequence "
             "({} + {} tokens), {:.4g} GFLOP per step (batch {})\n  formula: {}\n",
             3 * f_seq * 1e-9, cfg.data.inputs_length, cfg.data.targets_length,
             3 * f_seq * cfg.train.batch_size * 1e-9, cfg.train.batch_size, kMatmulFlopsFormula);
  fmt::print("matmul GFLOP per training step over the whole capacity buffers (experts over "
             "every capacity slot, as a GPU runs them; the CPU backend skips the empty ones; "
             "batch {}): {:.3f} forward, {:.3f} total\n",
             cfg.train.batch_size, f * 1e-9, 3 * f * 1e-9);

  // What one rank holds under cfg.parallel (rank 0's share; every rank's is the same size):
  // parameters and gradients, and the optimizer state as the optimizer allocates it
  // (optimizer_state_numel, train/optimizer.h), with ZeRO-1 dividing the replicated
  // parameters' state over the data ranks.
  ParamStore local;
  register_model_params(local, m, Sharding{pc.expert, 0, pc.model, 0});
  int64_t held = 0;
  double state_rep = 0, state_other = 0;
  for (const ParamInfo& p : local.infos()) {
    held += p.numel;
    const double st = double(optimizer_state_numel(cfg.train.optimizer, p, pc.model));
    (p.kind == ParamKind::kStacked || p.model_split_dim >= 0 ? state_other : state_rep) += st;
  }
  if (pc.zero1) state_rep /= pc.data;
  fmt::print("per rank (data {} x model {}, experts over {}{}): parameters {:.1f} MB, gradients "
             "{:.1f} MB, {} state {:.1f} MB (fp32)\n",
             pc.data, pc.model, pc.expert, pc.zero1 ? ", ZeRO-1" : "", held * 4e-6, held * 4e-6,
             cfg.train.optimizer, (state_rep + state_other) * 4e-6);

  // The backend memory of rank 0 as training allocates it (MB = 10^6 bytes).
  auto line = [](const std::string& label, int64_t bytes, const std::string& note = "") {
    fmt::print("  {:<31}{:10.1f} MB{}\n", label, double(bytes) * 1e-6,
               note.empty() ? "" : "  (" + note + ")");
  };
  fmt::print("backend memory per rank (rank 0; {} backend, {}, micro-batch {} sequences):\n",
             mp.backend, mp.precision, mp.micro_batch);
  line("parameters (fp32 masters)", mp.master_params);
  if (mp.compute_copy > 0) line("compute copy (bf16)", mp.compute_copy);
  line("gradients (fp32)", mp.gradients);
  line("optimizer state (" + cfg.train.optimizer + ")", mp.optimizer_state,
       pc.zero1 && pc.data > 1
           ? fmt::format("ZeRO-1 over {} data ranks; {:.1f} MB without", pc.data,
                         double(mp.optimizer_unsharded) * 1e-6)
           : "");
  line("activations kept for backward", mp.kept_activations);
  line("activation workspace", mp.activation_workspace);
  line("batch and position buckets", mp.inputs);
  line("step statistics", mp.statistics);
  line("communication buffers", mp.communication,
       "gradients reduce in place; device buffers stage through host memory");
  if (mp.other != 0) line("other", mp.other);
  line("allocation rounding", mp.rounding);
  if (mp.backend_workspace > 0) line("CUDA backend workspaces", mp.backend_workspace);
  line("total", mp.total);
  if (mp.device_memory > 0)
    fmt::print("device: {:.1f} GB; the arena at the default {} {} (1 GiB left free) holds "
               "{:.1f} GB: {} ({:.0f}%), besides the transient scratch of mixed-precision GEMMs\n",
               double(mp.device_memory) * 1e-9, kCudaMemoryFractionEnv,
               cuda::kDefaultMemoryFraction, double(mp.arena_limit) * 1e-9,
               mp.fits ? "fits" : "DOES NOT FIT", 100.0 * double(mp.total) / double(mp.arena_limit));
  else {
    const int64_t rank_bytes = mp.total + process;
    fmt::print("host memory per rank: {:.1f} MB with the program's own {:.1f} MB (code, libraries, "
               "measured here)\n",
               double(rank_bytes) * 1e-6, double(process) * 1e-6);
    if (host_available >= 0)
      fmt::print("host memory available on this machine: {:.1f} GB (MemAvailable, or the "
                 "cgroup's limit): {} rank{} of this size fit{}\n",
                 double(host_available) * 1e-9, host_available / rank_bytes,
                 host_available / rank_bytes == 1 ? "" : "s",
                 host_available < mp.total ? " (DOES NOT FIT: train refuses it here)" : "");
  }

  // Communication of one rank per optimizer step (train/comm_plan.h has the model).
  const int world = pc.data * pc.model;
  fmt::print("communication per rank and step ({} ranks, {} GPUs per node; NVLink {} GB/s, "
             "network {} GB/s per GPU; fp32 on the wire):\n",
             world, lk.gpus_per_node, lk.nvlink_gb_per_s, lk.network_gb_per_s);
  if (cp.collectives.empty()) fmt::print("  none (one rank)\n");
  for (const PlannedCollective& c : cp.collectives)
    fmt::print("  {:<15}{:>5} {:<6} {:<15}{:>6} calls {:>10.1f} MB  sends {:>10.1f} MB {:>9.2f} ms"
               "{}  {}\n",
               c.group, c.group_size, c.spans_nodes ? "nodes" : "node", collective_name(c.collective),
               c.calls, 4e-6 * double(c.floats), 1e-6 * c.wire_bytes, 1e3 * c.seconds,
               c.overlapped ? " (overlapped)" : "", c.carries);
  fmt::print("predicted step: compute {:.1f} ms ({} TFLOP/s at {:.0f}% MFU) + exposed "
             "communication {:.1f} ms (of {:.1f} ms; gradient buckets behind the backward pass but "
             "the last) = {:.1f} ms, weak-scaling efficiency {:.0f}%\n",
             1e3 * cp.compute_seconds, lk.gpu_tflops, 100 * lk.mfu, 1e3 * cp.exposed_seconds,
             1e3 * cp.comm_seconds, 1e3 * cp.step_seconds, 100 * cp.scaling_efficiency);
  return 0;
}


// `inspect --hf-names`: the parameter table of the whole (unsharded) model of a config or a
// checkpoint's config, as one JSON object:
//   "params":   internal name -> logical shape, in ParamStore order (a checkpoint's /params)
//   "hf_names": HF key -> {"name": internal name, "offset": first element of the HF tensor
//               within the internal one (floats, row-major), "shape": the HF tensor's shape}
// (ParamStore::hf_names(), the one place the mapping lives: scripts/export_hf.py and
// scripts/import_hf.py read it from here). Keys are HF SwitchTransformers names.
int cmd_hf_names(const Args& a) {
  SWT_USER_CHECK(a.positional.size() + (a.config.empty() ? 0 : 1) == 1,
                 "inspect --hf-names: expected one checkpoint or --config FILE, got {} (see "
                 "switcht5 --help)",
                 a.positional.size() + (a.config.empty() ? 0 : 1));
  std::string source = a.config;
  RunConfig cfg;
  if (a.config.empty()) {
    source = resolve_resume(a.positional[0], "");
    SWT_USER_CHECK(!source.empty(), "inspect {}: no checkpoint there", a.positional[0]);
    cfg = checkpoint_config(source, a.overrides);
  } else {
    cfg = load_config(a.config, a.overrides);
  }
  ParamStore ps;
  register_model_params(ps, cfg.model);
  std::string out = "{\n  \"source\": " + json_string(source) + ",\n  \"params\": {";
  for (size_t i = 0; i < ps.infos().size(); ++i) {
    const ParamInfo& p = ps.infos()[i];
    out += fmt::format("{}\n    {}: [{}]", i ? "," : "", json_string(p.name),
                       fmt::join(p.logical_shape(), ", "));
  }
  out += "\n  },\n  \"hf_names\": {";
  const std::vector<ParamStore::HfEntry> entries = ps.hf_names();
  for (size_t i = 0; i < entries.size(); ++i) {
    const ParamStore::HfEntry& e = entries[i];
    out += fmt::format("{}\n    {}: {{\"name\": {}, \"offset\": {}, \"shape\": [{}]}}",
                       i ? "," : "", json_string(e.hf_name), json_string(e.internal_name),
                       e.inner_offset, fmt::join(e.hf_shape, ", "));
  }
  fmt::print("{}\n  }}\n}}\n", out);
  return 0;
}

// Reports an error and ends the process, or, under MPI with several ranks, the whole job (the
// other ranks may be waiting in a collective and would otherwise hang).
int fail(const char* what, int code) {
  if (g_world_size > 1) {
    std::fprintf(stderr, "[rank %d] switcht5: error: %s\n", g_world_rank, what);
    std::fflush(stderr);
    abort_all_ranks(code);
  }
  // Before the grid exists every rank of an MPI job raises the same (config) error: only the
  // launcher's rank 0 reports it.
  for (const char* var : {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"})
    if (const char* r = std::getenv(var); r && std::string(r) != "0") return code;
  std::fprintf(stderr, "switcht5: error: %s\n", what);
  return code;
}

// Ends the process on an exception with the one exit-code contract: 2 for anything the user
// can fix -- a bad input, config or command line (UserError), a path the filesystem refuses
// (permissions, a full disk: std::filesystem::filesystem_error names the path), more memory
// than the machine has -- and 1 for an internal error (SWT_CHECK: "file:line: check failed").
int fail_with(const std::exception& e) {
  if (dynamic_cast<const UserError*>(&e) ||
      dynamic_cast<const std::filesystem::filesystem_error*>(&e))
    return fail(e.what(), 2);
  if (dynamic_cast<const std::bad_alloc*>(&e))
    return fail("out of host memory (an allocation failed): the model, batch or data loader "
                "need more than this machine has",
                2);
  return fail(e.what(), 1);
}


// Writes the first micro-batch of validation data, our logits on it and its mean cross-entropy
// to `path` (the HF parity tests compare them with transformers' outputs).
void dump_batch(Trainer& t, const std::string& path) {
  SWT_USER_CHECK(t.grid().world_size == 1, "--dump-batch runs on one process, not {}",
                 t.grid().world_size);
  const RunConfig& cfg = t.config();
  auto source = make_validation_source(cfg, 0, 1);
  Batch full, b;
  source->next(full);
  full.slice_rows(0, cfg.train.batch_size / cfg.train.grad_accum_steps, b);
  const ForwardStats& st = t.model().forward(b, /*training=*/false, 0);
  const int64_t B = b.batch, Ti = b.inputs_length, Tt = b.targets_length, V = cfg.model.vocab_size;
  std::vector<float> logits(size_t(B * Tt * V));
  t.backend().copy_to_host(logits.data(), t.model().logits(), sizeof(float) * logits.size());
  write_h5_arrays(path,
                  {{"encoder_input_tokens", {B, Ti}, b.encoder_input_tokens.data(), true},
                   {"encoder_mask", {B, Ti}, b.encoder_mask.data(), false},
                   {"decoder_input_tokens", {B, Tt}, b.decoder_input_tokens.data(), true},
                   {"decoder_mask", {B, Tt}, b.decoder_mask.data(), false},
                   {"labels", {B, Tt}, b.labels.data(), true},
                   {"logits", {B, Tt, V}, logits.data(), false}},
                  {{"loss", st.target_tokens > 0 ? st.ce_sum / double(st.target_tokens) : 0.0}});
}

int cmd_eval(const Args& a) {
  SWT_USER_CHECK(!a.checkpoint.empty(), "eval: --checkpoint CKPT is required");
  // Before any work: a dump never replaces a file (the checkpoint under evaluation included)
  // unless asked to.
  std::error_code ec;
  SWT_USER_CHECK(a.dump_batch.empty() || a.force || !std::filesystem::exists(a.dump_batch, ec),
                 "--dump-batch {}: the file exists; pass --force to overwrite it", a.dump_batch);
  std::unique_ptr<Communicator> world = mpi_world();
  const std::string checkpoint = resolve_resume(a.checkpoint, "");  // a file, directory or latest
  SWT_USER_CHECK(!checkpoint.empty(), "eval: --checkpoint {}: no checkpoint there", a.checkpoint);
  RunConfig cfg;
  if (!a.config.empty()) {
    cfg = load_config(a.config, a.overrides);
  } else {
    // The checkpoint's own config, on however many processes run this: data parallel.
    std::vector<std::string> o = {fmt::format("parallel.data={}", world->size()),
                                  "parallel.model=1", "parallel.expert=1", "parallel.zero1=false"};
    o.insert(o.end(), a.overrides.begin(), a.overrides.end());
    cfg = checkpoint_config(checkpoint, o);
  }
  ProcessGrid grid = ProcessGrid::create(std::move(world), cfg.parallel.data, cfg.parallel.model,
                                         cfg.parallel.expert, cfg.parallel.timeout_s);
  g_world_rank = grid.world_rank;
  g_world_size = grid.world_size;
  Trainer t(cfg, grid, TrainerUse::kEvaluate);
  SWT_USER_CHECK(t.has_validation(),
                 "eval: the config has no validation data (set data.val_glob, or data.source "
                 "synthetic)");
  TrainingState state = t.checkpoint_state();
  const LoadResult lr = load_checkpoint(state, checkpoint, /*training_state=*/false);
  const double loss = t.evaluate();
  if (!a.dump_batch.empty()) dump_batch(t, a.dump_batch);
  if (grid.is_root())
    fmt::print("{{\"checkpoint\": {}, \"step\": {}, \"val_loss\": {}, "
               "\"eval_batches\": {}, \"batch_size\": {}, \"layout\": \"data {} x model {}, "
               "expert {}\"}}\n",
               json_string(checkpoint), lr.step, json_number(loss), cfg.train.eval_batches,
               cfg.train.batch_size,
               grid.data, grid.model, grid.expert);
  return 0;
}

int run(int argc, char** argv) {
  // --help (or -h) anywhere, e.g. `switcht5 train --help`: the usage, exit 0, nothing run.
  for (int i = 1; i < argc; ++i)
    if (std::string(argv[i]) == "--help" || std::string(argv[i]) == "-h") {
      std::fputs(kUsage, stdout);
      return 0;
    }
  Args a = parse_args(argc, argv);
  SWT_USER_CHECK(a.command == "train" || a.command == "plan" || a.command == "eval" ||
                     a.command == "inspect" || a.command == "config-reference",
                 "unknown command \"{}\" (expected train, eval, inspect, plan or "
                 "config-reference; see switcht5 --help)",
                 a.command);
  if (a.command == "config-reference") {
    SWT_USER_CHECK(a.positional.empty() && a.config.empty() && a.overrides.empty(),
                   "config-reference takes no arguments (see switcht5 --help)");
    fmt::print("{}", config_reference_markdown());
    return 0;
  }
  SWT_USER_CHECK(a.positional.empty() || a.command == "inspect",
                 "{}: unexpected argument \"{}\" (see switcht5 --help)", a.command,
                 a.positional.empty() ? "" : a.positional[0]);
  if (a.command == "inspect" && a.hf_names) return cmd_hf_names(a);
  if (a.command == "inspect") {
    SWT_USER_CHECK(a.positional.size() == 1,
                   "inspect: expected one checkpoint file, got {} (see switcht5 --help)",
                   a.positional.size());
    const std::string path = resolve_resume(a.positional[0], "");
    SWT_USER_CHECK(!path.empty(), "inspect {}: no checkpoint there", a.positional[0]);
    return inspect_checkpoint(path);
  }
  try {
    if (a.command == "eval") return cmd_eval(a);
  } catch (const std::exception& e) {
    return fail_with(e);  // while the grid still exists: no collective runs in teardown
  }
  SWT_USER_CHECK(!a.config.empty(), "{}: --config FILE is required", a.command);
  std::vector<std::string> first = a.overrides;
  if (a.command == "plan" && a.world_size > 0) {
    // --world-size N sets parallel.data = N / parallel.model: read the model degree with the
    // data and expert degrees at 1 (always a valid pair), then load the planned layout.
    first.push_back("parallel.data=1");
    first.push_back("parallel.expert=1");
  }
  RunConfig cfg = load_config(a.config, first);
  if (a.command == "plan" && a.world_size > 0) {
    const int M = cfg.parallel.model;
    SWT_USER_CHECK(a.world_size % M == 0,
                   "--world-size {}: expected a multiple of parallel.model = {} (ranks are data "
                   "x model)",
                   a.world_size, M);
    std::vector<std::string> sets = a.overrides;
    sets.push_back("parallel.data=" + std::to_string(a.world_size / M));
    cfg = load_config(a.config, sets);
  }
  if (a.command == "plan") return cmd_plan(cfg, a);
  std::string dir = a.run_dir;
  if (dir.empty()) dir = cfg.log.run_dir;
  if (dir.empty()) dir = "runs/" + std::filesystem::path(a.config).stem().string();
  ProcessGrid grid = ProcessGrid::create(mpi_world(), cfg.parallel.data, cfg.parallel.model,
                                         cfg.parallel.expert, cfg.parallel.timeout_s);
  g_world_rank = grid.world_rank;
  g_world_size = grid.world_size;
  try {
    TrainOptions options;
    options.resume = a.resume;
    const TrainResult r = train(cfg, grid, dir, options);
    if (r.stop_signal) return 128 + r.stop_signal;
  } catch (const AgreedUserError& e) {
    if (grid.is_root()) std::fprintf(stderr, "switcht5: error: %s\n", e.what());
    return 2;  // every rank, normally: they all raised it
  } catch (const std::exception& e) {
    return fail_with(e);  // while the grid still exists: no collective runs in teardown
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // A file-size limit (ulimit -f) reached by a write: the write fails with EFBIG and the error
  // names the file, instead of SIGXFSZ's core dump.
  std::signal(SIGXFSZ, SIG_IGN);
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    return fail_with(e);
  }
}
