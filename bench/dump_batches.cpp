// dump_batches: the first N training batches a one-process `switcht5 train` of CONFIG consumes,
// as one HDF5 file, so that another implementation (bench/hf_routing.py: HuggingFace) can be
// trained on exactly the same token ids, masks and labels.
//
// Usage: dump_batches CONFIG OUT.h5 --steps N [--init DIR] [--set section.key=value ...]
// --init DIR: also save the model's initial weights (the trainer's own initialisation from
// train.seed) as DIR/ckpt-0.h5, a checkpoint at step 0, so that `switcht5 train --resume` and
// scripts/export_hf.py start both implementations from the same weights.
// Datasets, int32 unless noted, step-major (N x train.batch_size rows):
//   encoder_input_tokens [N, B, inputs_length]    encoder_mask [N, B, inputs_length] (float32)
//   decoder_input_tokens [N, B, targets_length]   decoder_mask [N, B, targets_length] (float32)
//   labels               [N, B, targets_length]   (kIgnoreLabel = -100 where no loss is taken)
// The source is make_train_source(cfg, rank 0, 1 rank): the trainer's own, so the batches are
// the ones `switcht5 train` sees at steps 1..N on one process (train.grad_accum_steps micro
// batches are rows of the same global batch). OUT.h5 is never overwritten.
#include <cstdio>
#include <filesystem>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.h"
#include "checkpoint/h5_file.h"
#include "comm/mpi_communicator.h"
#include "comm/process_grid.h"
#include "config/config.h"
#include "core/check.h"
#include "train/batch_source.h"
#include "train/trainer.h"

int main(int argc, char** argv) {
  using namespace switcht5;
  try {
    SWT_USER_CHECK(argc >= 5, "usage: dump_batches CONFIG OUT.h5 --steps N [--set k=v ...]");
    const std::string config = argv[1], out = argv[2];
    std::string init_dir;
    int steps = 0;
    std::vector<std::string> sets;
    for (int i = 3; i < argc; i += 2) {
      const std::string a = argv[i];
      SWT_USER_CHECK(i + 1 < argc, "{} needs a value", a);
      if (a == "--steps") steps = std::atoi(argv[i + 1]);
      else if (a == "--set") sets.push_back(argv[i + 1]);
      else if (a == "--init") init_dir = argv[i + 1];
      else SWT_USER_CHECK(false, "unknown option {} (expected --steps, --init or --set)", a);
    }
    SWT_USER_CHECK(steps > 0, "--steps: expected a positive number of batches");
    std::error_code ec;
    SWT_USER_CHECK(!std::filesystem::exists(out, ec), "{}: the file exists (never overwritten)",
                   out);
    const RunConfig cfg = load_config(config, sets);
    if (!init_dir.empty()) {
      SWT_USER_CHECK(cfg.parallel.data * cfg.parallel.model * cfg.parallel.expert == 1,
                     "--init: the config must be one process (parallel.* = 1)");
      std::filesystem::create_directories(init_dir);
      ProcessGrid grid = ProcessGrid::create(mpi_world(), 1, 1, 1, cfg.parallel.timeout_s);
      Trainer trainer(cfg, grid);
      const SaveResult r = save_checkpoint(trainer.checkpoint_state(0), init_dir);
      std::printf("dump_batches: initial weights (train.seed %lld) -> %s\n",
                  (long long)cfg.train.seed, r.path.c_str());
    }
    auto source = make_train_source(cfg, 0, 1);
    const int64_t N = steps, B = cfg.train.batch_size;
    const int64_t Ti = cfg.data.inputs_length, Tt = cfg.data.targets_length;
    std::vector<int32_t> ei, di, lab;
    std::vector<float> em, dm;
    Batch b;
    for (int s = 0; s < steps; ++s) {
      source->next(b);
      SWT_CHECK(b.batch == B && b.inputs_length == Ti && b.targets_length == Tt,
                "batch {}: {} x ({} + {})", s, b.batch, b.inputs_length, b.targets_length);
      ei.insert(ei.end(), b.encoder_input_tokens.begin(), b.encoder_input_tokens.end());
      em.insert(em.end(), b.encoder_mask.begin(), b.encoder_mask.end());
      di.insert(di.end(), b.decoder_input_tokens.begin(), b.decoder_input_tokens.end());
      dm.insert(dm.end(), b.decoder_mask.begin(), b.decoder_mask.end());
      lab.insert(lab.end(), b.labels.begin(), b.labels.end());
    }
    write_h5_arrays(out,
                    {{"encoder_input_tokens", {N, B, Ti}, ei.data(), true},
                     {"encoder_mask", {N, B, Ti}, em.data(), false},
                     {"decoder_input_tokens", {N, B, Tt}, di.data(), true},
                     {"decoder_mask", {N, B, Tt}, dm.data(), false},
                     {"labels", {N, B, Tt}, lab.data(), true}},
                    {{"steps", double(N)}});
    std::printf("dump_batches: %lld batches of %lld x (%lld + %lld) -> %s\n", (long long)N,
                (long long)B, (long long)Ti, (long long)Tt, out.c_str());
    return 0;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dump_batches: error: %s\n", e.what());
    return 2;
  }
}
