// Golden loss trajectories: the switcht5 binary reruns the exact command recorded in a golden file
// under tests/golden/ and must reproduce every logged column (loss, aux_loss, z_loss, grad_norm)
// of every step, to a relative tolerance per case. Any change to the math, the initialisation,
// the random streams, the data order or the optimizer shows up here; a change that is meant to
// move the numbers regenerates the file on purpose with tests/golden/regenerate.sh (this test
// never writes it).
//
// Golden file format (written by regenerate.sh): '#' comment lines, then
//   precision: fp32                    the dtype the trajectory was computed in
//   args: train --config ...           switcht5's arguments, run in the source root
//   columns: step loss aux_loss z_loss grad_norm
// and one row of those columns per step.
#include <unistd.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "test_util.h"

namespace {

const std::string kSource = SWITCHT5_SOURCE_DIR;
const std::string kBin = std::string(SWITCHT5_BINARY_DIR) + "/switcht5";
const std::vector<std::string> kColumns = {"loss", "aux_loss", "z_loss", "grad_norm"};

struct Golden {
  std::string precision, args;
  std::vector<int64_t> steps;
  std::vector<std::vector<double>> rows;  // [step][kColumns]
};

// Reads a golden file; any deviation from the format is a test failure, never a skip.
::testing::AssertionResult read_golden(const std::string& path, Golden& g) {
  std::ifstream in(path);
  if (!in) return ::testing::AssertionFailure() << path << ": cannot open";
  std::string line;
  int lineno = 0;
  while (std::getline(in, line)) {
    ++lineno;
    if (line.empty() || line[0] == '#') continue;
    const auto at = [&] { return ::testing::AssertionFailure() << path << ":" << lineno << ": "; };
    if (line.rfind("precision: ", 0) == 0) {
      g.precision = line.substr(11);
    } else if (line.rfind("args: ", 0) == 0) {
      g.args = line.substr(6);
    } else if (line.rfind("columns: ", 0) == 0) {
      if (line != "columns: step loss aux_loss z_loss grad_norm") return at() << "columns " << line;
    } else {
      std::istringstream row(line);
      int64_t step;
      std::vector<double> v(kColumns.size());
      if (!(row >> step)) return at() << "not a row: " << line;
      for (double& x : v)
        if (!(row >> x)) return at() << "short row: " << line;
      std::string extra;
      if (row >> extra) return at() << "long row: " << line;
      g.steps.push_back(step);
      g.rows.push_back(v);
    }
  }
  if (g.precision.empty() || g.args.empty() || g.rows.empty())
    return ::testing::AssertionFailure() << path << ": needs precision, args and rows";
  return ::testing::AssertionSuccess();
}

// The number after "\"key\": " in a metrics.jsonl line (NaN if absent or null).
double json_field(const std::string& line, const std::string& key) {
  const std::string tag = "\"" + key + "\": ";
  const size_t at = line.find(tag);
  if (at == std::string::npos) return std::nan("");
  try {
    return std::stod(line.substr(at + tag.size()));
  } catch (const std::exception&) {
    return std::nan("");
  }
}

struct GoldenCase {
  const char* name;
  const char* file;        // under tests/golden/
  const char* precision;   // must equal the file's precision
  const char* extra_args;  // appended to the file's args ("": the generating command itself)
  double rtol;             // largest relative change allowed in any column
};

// The checked trajectories.
const GoldenCase kCases[] = {
    // The generating command on the reference backend (plain loops, double accumulation, SSE2
    // code without FMA, no oneDNN): the same numbers on every x86-64 machine and thread count
    // (also checked with glibc's FMA/AVX2 code paths disabled), so any change beyond the
    // 9 printed digits is a change in the math.
    {"reference_fp32", "tiny_synthetic_fp32.txt", "fp32", "", 1e-6},
    // The production CPU backend on the same trajectory. Its GEMM is oneDNN sgemm: float
    // accumulation whose blocking depends on the instruction set and thread count, so it is not
    // bitwise portable. Measured largest relative difference from the reference trajectory over
    // the 20 steps, any column: 1.3e-7 with AVX-512 (1 and 2 threads) and with oneDNN held to
    // AVX2 or SSE4.1 (ONEDNN_MAX_CPU_ISA); 1e-5 leaves a margin of ~80 and still catches any
    // real divergence of the CPU backend, which moves the loss by far more.
    {"cpu_fp32", "tiny_synthetic_fp32.txt", "fp32", "--set train.backend=cpu", 1e-5},
    // train.precision: bf16 on the reference backend: deterministic like the fp32 case, but a
    // bf16 rounding boundary amplifies a last-bit difference (another libm's exp, say) into a
    // 2^-8 step, so it is held to 1e-3 rather than 1e-6. The cpu backend's fp32 GEMM sums put
    // values on the other side of bf16 rounding boundaries than the reference's double sums:
    // measured 1.9% apart from this file after 20 steps (and bf16 vs fp32 1.6%), so no cpu case
    // here; tests/test_precision.cpp checks bf16 training on the cpu backend against fp32.
    {"reference_bf16", "tiny_synthetic_bf16.txt", "bf16", "", 1e-3},
};

void PrintTo(const GoldenCase& c, std::ostream* os) { *os << c.name; }

class GoldenTrajectory : public ::testing::TestWithParam<GoldenCase> {};

TEST_P(GoldenTrajectory, RerunMatchesGoldenFile) {
  const GoldenCase& c = GetParam();
  const std::string path = kSource + "/tests/golden/" + c.file;
  Golden g;
  ASSERT_TRUE(read_golden(path, g));
  ASSERT_EQ(g.precision, c.precision) << path;

  const std::string run_dir = (std::filesystem::temp_directory_path() /
                               ("switcht5_golden_" + std::string(c.name) + "_" +
                                std::to_string(getpid())))
                                  .string();
  std::filesystem::remove_all(run_dir);
  const std::string command = "cd '" + kSource + "' && '" + kBin + "' " + g.args + " " +
                              c.extra_args + " --run-dir '" + run_dir + "'";
  const auto r = switcht5::testing::run_command(command);
  ASSERT_EQ(r.code, 0) << command << "\n" << r.output;

  std::ifstream metrics(run_dir + "/metrics.jsonl");
  ASSERT_TRUE(metrics.good()) << run_dir << "/metrics.jsonl";
  std::vector<std::string> lines;
  for (std::string line; std::getline(metrics, line);) lines.push_back(line);
  ASSERT_EQ(lines.size(), g.rows.size()) << "logged steps vs " << path;

  double worst = 0.0;
  for (size_t i = 0; i < lines.size(); ++i) {
    EXPECT_EQ(json_field(lines[i], "step"), double(g.steps[i])) << lines[i];
    EXPECT_EQ(lines[i].find("\"skipped\""), std::string::npos) << lines[i];
    for (size_t k = 0; k < kColumns.size(); ++k) {
      const double want = g.rows[i][k], got = json_field(lines[i], kColumns[k]);
      const double rel = std::fabs(got - want) / std::fabs(want);
      if (!(rel <= worst)) worst = rel;  // NaN sticks
      EXPECT_LE(rel, c.rtol) << "step " << g.steps[i] << " " << kColumns[k] << ": " << got
                             << " vs golden " << want << " (relative change " << rel << ")";
    }
  }
  std::printf("%s: largest relative change from %s: %.3g (tolerance %.0e)\n", c.name, c.file,
              worst, c.rtol);
  if (::testing::Test::HasFailure())
    std::printf("If the change is intended, regenerate with tests/golden/regenerate.sh and say "
                "why in the commit.\n");
  else
    std::filesystem::remove_all(run_dir);
}

INSTANTIATE_TEST_SUITE_P(Golden, GoldenTrajectory, ::testing::ValuesIn(kCases),
                         [](const auto& info) { return std::string(info.param.name); });

}  // namespace
