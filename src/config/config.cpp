// Reading, validating and writing the run configuration (see config.h).
//
// Flow: the file's keys and the --set overrides are first collected, unvalidated, into one table
// "section.key" -> (YAML node, where it came from); a later --set replaces an earlier value.
// Then each field is read from that table and checked on its own (type, range, allowed values),
// and last the rules across keys run. Collecting first means a --set can repair a bad file value
// and every message can name the file line or the --set argument the value came from.
//
// The list of fields lives in one place, for_each_field(); reading, writing (to_yaml) and the
// "known keys" lists in messages all walk it, so they cannot drift apart.
#include "config/config.h"

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <limits>
#include <map>
#include <optional>
#include <string_view>
#include <type_traits>

#include <fmt/format.h>
#include <yaml-cpp/yaml.h>

#include "config/config_docs.h"
#include "core/check.h"
#include "core/input_file.h"

namespace switcht5 {
namespace {

constexpr std::array<std::string_view, 6> kSections = {"model", "data",       "train",
                                                       "parallel", "checkpoint", "log"};

// ---- rules: what a value may be -----------------------------------------------------------

struct IntRule {
  int64_t min = 0;
  std::optional<int64_t> max;  // inclusive; none: up to the field type's maximum
  const char* note = nullptr;  // why, appended in parentheses
};

struct RealRule {
  double lo = 0.0;
  bool lo_open = false;        // lo itself excluded
  std::optional<double> hi;    // none: no upper bound
  bool hi_open = false;
};

struct EnumRule {
  std::vector<std::string_view> allowed;  // empty: any string
  const char* note = nullptr;
};

struct BoolRule {};

IntRule at_least(int64_t min) { return IntRule{min, std::nullopt, nullptr}; }
RealRule positive() { return RealRule{0.0, true, std::nullopt, false}; }
RealRule non_negative() { return RealRule{0.0, false, std::nullopt, false}; }
RealRule probability() { return RealRule{0.0, false, 1.0, true}; }  // [0, 1): a rate
EnumRule any_string() { return EnumRule{}; }

// Every key, its field and its rule. The order here is the order of to_yaml().
template <class V>
void for_each_field(RunConfig& c, V& v) {
  ModelConfig& m = c.model;
  v("model", "vocab_size", m.vocab_size, at_least(1));
  v("model", "d_model", m.d_model, at_least(1));
  v("model", "d_ff", m.d_ff, at_least(1));
  v("model", "d_kv", m.d_kv, at_least(1));
  v("model", "num_heads", m.num_heads, at_least(1));
  v("model", "num_layers", m.num_layers, at_least(1));
  v("model", "num_decoder_layers", m.num_decoder_layers, at_least(1));
  v("model", "num_experts", m.num_experts, at_least(0));
  v("model", "expert_capacity", m.expert_capacity, IntRule{0, std::nullopt, "0: from capacity_factor"});
  v("model", "router_jitter_noise", m.router_jitter_noise, probability());
  v("model", "router_z_loss_coef", m.router_z_loss_coef, non_negative());
  v("model", "router_aux_loss_coef", m.router_aux_loss_coef, non_negative());
  v("model", "encoder_sparse_step", m.encoder_sparse_step, IntRule{0, std::nullopt, "0: dense"});
  v("model", "decoder_sparse_step", m.decoder_sparse_step, IntRule{0, std::nullopt, "0: dense"});
  // The encoder halves the buckets by direction and each half needs >= 1 exact bucket.
  v("model", "relative_attention_num_buckets", m.relative_attention_num_buckets, at_least(4));
  v("model", "relative_attention_max_distance", m.relative_attention_max_distance, at_least(1));
  v("model", "dropout_rate", m.dropout_rate, probability());
  v("model", "feed_forward_proj", m.feed_forward_proj, EnumRule{{"relu", "gated-gelu"}});
  v("model", "tie_word_embeddings", m.tie_word_embeddings, BoolRule{});
  v("model", "layer_norm_epsilon", m.layer_norm_epsilon, positive());
  v("model", "pad_token_id", m.pad_token_id, at_least(0));
  v("model", "eos_token_id", m.eos_token_id, at_least(0));
  v("model", "decoder_start_token_id", m.decoder_start_token_id, at_least(0));
  v("model", "capacity_factor", m.capacity_factor, positive());
  v("model", "eval_capacity_factor", m.eval_capacity_factor, positive());
  v("model", "group_size", m.group_size, IntRule{0, std::nullopt, "0: one sequence per group"});
  v("model", "init_scale", m.init_scale, positive());
  v("model", "expert_dropout", m.expert_dropout, probability());
  v("model", "router_force_balance", m.router_force_balance, BoolRule{});

  DataConfig& d = c.data;
  v("data", "source", d.source, EnumRule{{"shards", "synthetic"}});
  v("data", "task", d.task, EnumRule{{"reverse", "copy", "span_corruption"}});
  v("data", "inputs_length", d.inputs_length, at_least(2));
  v("data", "targets_length", d.targets_length, at_least(2));
  v("data", "synthetic_vocab", d.synthetic_vocab, IntRule{0, std::nullopt, "0: the whole vocabulary"});
  v("data", "train_glob", d.train_glob, any_string());
  v("data", "val_glob", d.val_glob, any_string());
  v("data", "noise_density", d.noise_density, RealRule{0.0, true, 1.0, true});
  v("data", "mean_noise_span_length", d.mean_noise_span_length, RealRule{1.0, false, std::nullopt, false});
  v("data", "extra_ids", d.extra_ids, at_least(1));
  v("data", "shuffle_window", d.shuffle_window, at_least(1));
  v("data", "prefetch", d.prefetch, IntRule{0, 64, "0: prepare batches inline"});
  v("data", "verify_checksums", d.verify_checksums, BoolRule{});

  TrainConfig& t = c.train;
  v("train", "steps", t.steps, at_least(1));
  v("train", "batch_size", t.batch_size, at_least(1));
  v("train", "grad_accum_steps", t.grad_accum_steps, at_least(1));
  v("train", "optimizer", t.optimizer, EnumRule{{"adafactor", "adamw"}});
  v("train", "learning_rate", t.learning_rate, positive());
  v("train", "schedule", t.schedule, EnumRule{{"rsqrt", "cosine", "linear", "constant"}});
  v("train", "warmup_steps", t.warmup_steps, at_least(0));
  v("train", "min_learning_rate", t.min_learning_rate, non_negative());
  v("train", "weight_decay", t.weight_decay, non_negative());
  v("train", "adam_beta1", t.adam_beta1, probability());
  v("train", "adam_beta2", t.adam_beta2, probability());
  v("train", "adam_epsilon", t.adam_epsilon, positive());
  v("train", "adafactor_decay_rate", t.adafactor_decay_rate, positive());
  v("train", "adafactor_clipping_threshold", t.adafactor_clipping_threshold, positive());
  v("train", "adafactor_epsilon1", t.adafactor_epsilon1, positive());
  v("train", "adafactor_scale_parameter", t.adafactor_scale_parameter, BoolRule{});
  v("train", "adafactor_epsilon2", t.adafactor_epsilon2, positive());
  v("train", "max_grad_norm", t.max_grad_norm, non_negative());
  v("train", "z_loss", t.z_loss, non_negative());
  v("train", "seed", t.seed, at_least(0));
  v("train", "eval_every", t.eval_every, IntRule{0, std::nullopt, "0: never"});
  v("train", "eval_batches", t.eval_batches, at_least(1));
  v("train", "backend", t.backend, EnumRule{{"cpu", "reference", "cuda"}});
  v("train", "precision", t.precision, EnumRule{{"fp32", "bf16"}});
  v("train", "cuda_graphs", t.cuda_graphs, BoolRule{});
  v("train", "max_skipped_steps", t.max_skipped_steps, at_least(0));

  ParallelConfig& p = c.parallel;
  v("parallel", "data", p.data, at_least(1));
  v("parallel", "model", p.model, at_least(1));
  v("parallel", "expert", p.expert, at_least(1));
  v("parallel", "zero1", p.zero1, BoolRule{});
  v("parallel", "bucket_mb", p.bucket_mb, RealRule{0.0, true, 1048576.0, false});  // <= 1 TiB
  v("parallel", "data_plane", p.data_plane, EnumRule{{"mpi", "nccl"}});
  // At most 10^7 s (116 days): the deadline in nanoseconds fits an int64.
  v("parallel", "timeout_s", p.timeout_s, RealRule{0.0, true, 1e7, false});

  CheckpointConfig& k = c.checkpoint;
  v("checkpoint", "every", k.every, IntRule{0, std::nullopt, "0: only at the end"});
  v("checkpoint", "keep", k.keep, at_least(1));
  v("checkpoint", "dir", k.dir, any_string());

  LogConfig& l = c.log;
  v("log", "every", l.every, at_least(1));
  v("log", "level", l.level, EnumRule{{"trace", "debug", "info", "warn", "error"}});
  v("log", "run_dir", l.run_dir, any_string());
  v("log", "per_rank_files", l.per_rank_files, BoolRule{});
  v("log", "collapse_share", l.collapse_share, RealRule{0.0, false, 1.0, false});
  v("log", "collapse_logs", l.collapse_logs, at_least(1));
  v("log", "dead_expert_steps", l.dead_expert_steps, at_least(1));
}

// section -> its keys, in for_each_field order.
struct KeyLister {
  std::map<std::string, std::vector<std::string>, std::less<>> keys;
  template <class T, class R>
  void operator()(const char* section, const char* key, T&, const R&) {
    keys[section].push_back(key);
  }
};

const std::map<std::string, std::vector<std::string>, std::less<>>& known_keys() {
  static const auto keys = [] {
    RunConfig c;
    KeyLister lister;
    for_each_field(c, lister);
    return lister.keys;
  }();
  return keys;
}

// ---- text helpers -------------------------------------------------------------------------

// Double-quoted YAML string, escaped so that yaml-cpp reads back the same bytes.
std::string yaml_quote(std::string_view s) {
  std::string out = "\"";
  for (unsigned char ch : s) {
    switch (ch) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      case '\r': out += "\\r"; break;
      default:
        if (ch < 0x20 || ch == 0x7f) out += fmt::format("\\x{:02x}", ch);
        else out += static_cast<char>(ch);
    }
  }
  out += '"';
  return out;
}

std::string join(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& s : items) out += (out.empty() ? "" : ", ") + s;
  return out;
}

// Optimal string alignment distance (Levenshtein plus adjacent transpositions), for
// "did you mean" suggestions.
size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::vector<size_t>> d(a.size() + 1, std::vector<size_t>(b.size() + 1));
  for (size_t i = 0; i <= a.size(); ++i) d[i][0] = i;
  for (size_t j = 0; j <= b.size(); ++j) d[0][j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    for (size_t j = 1; j <= b.size(); ++j) {
      size_t cost = a[i - 1] == b[j - 1] ? 0 : 1;
      d[i][j] = std::min({d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + cost});
      if (i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1])
        d[i][j] = std::min(d[i][j], d[i - 2][j - 2] + 1);
    }
  }
  return d[a.size()][b.size()];
}

// The candidate closest to `word`, if it is close enough to be a likely typo.
std::optional<std::string> closest(std::string_view word, const std::vector<std::string>& candidates) {
  size_t limit = std::max<size_t>(1, word.size() / 3);
  std::optional<std::string> best;
  size_t best_distance = limit + 1;
  for (const auto& c : candidates) {
    size_t dist = edit_distance(word, c);
    if (dist < best_distance) {
      best_distance = dist;
      best = c;
    }
  }
  return best;
}

// Finite number, YAML style ("1e-6", "-0.5", "+3"); nullopt if `s` is anything else.
std::optional<double> parse_real(std::string_view s) {
  if (!s.empty() && s.front() == '+') {
    s.remove_prefix(1);
    if (!s.empty() && (s.front() == '+' || s.front() == '-')) return std::nullopt;
  }
  if (s.empty()) return std::nullopt;
  double v = 0.0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || end != s.data() + s.size() || !std::isfinite(v)) return std::nullopt;
  return v;
}

bool is_true(std::string_view s) { return s == "true" || s == "True" || s == "TRUE"; }
bool is_false(std::string_view s) { return s == "false" || s == "False" || s == "FALSE"; }

// How a value is shown after "got": numbers and booleans bare, other text quoted.
std::string show(const YAML::Node& node) {
  if (!node.IsDefined() || node.IsNull()) return "null";
  if (node.IsMap()) return "a map";
  if (node.IsSequence()) return "a list";
  const std::string& s = node.Scalar();
  if (parse_real(s) || is_true(s) || is_false(s)) return s;
  return yaml_quote(s);
}

std::string located(const std::string& source, const YAML::Mark& mark) {
  if (mark.is_null()) return source;
  return fmt::format("{}:{}", source, mark.line + 1);
}

// ---- collecting keys from the file and from --set -----------------------------------------

struct RawValue {
  YAML::Node node;
  std::string where;           // "configs/x.yaml:7" or "--set model.d_model=64"
  bool from_override = false;
};

using RawEntries = std::map<std::string, RawValue, std::less<>>;

[[noreturn]] void fail(const std::string& where, const std::string& message) {
  throw UserError(fmt::format("{}: {}", where, message));
}

std::string section_list() {
  std::string out;
  for (auto s : kSections) out += fmt::format("{}{}", out.empty() ? "" : ", ", s);
  return out;
}

bool is_section(std::string_view name) {
  return std::find(kSections.begin(), kSections.end(), name) != kSections.end();
}

// "did you mean" text naming every section.key with this key name ("log.every" or
// "checkpoint.every"), or "" if no section has it.
std::string sections_holding(std::string_view key) {
  std::string out;
  for (auto section : kSections) {
    const auto& keys = known_keys().find(section)->second;
    if (std::find(keys.begin(), keys.end(), key) == keys.end()) continue;
    out += fmt::format("{}{}", out.empty() ? "" : " or ", yaml_quote(fmt::format("{}.{}", section, key)));
  }
  return out;
}

// A suggestion for a section name that does not exist: a near miss of a section, or the
// section.key of a key written where a section belongs.
[[noreturn]] void fail_unknown_section(const std::string& where, const std::string& name) {
  std::string message = fmt::format("unknown section {} (expected one of: {})", yaml_quote(name),
                                    section_list());
  if (std::string full = sections_holding(name); !full.empty()) {
    message += fmt::format("; did you mean {}?", full);
  } else if (auto s = closest(name, std::vector<std::string>(kSections.begin(), kSections.end()))) {
    message += fmt::format("; did you mean {}?", yaml_quote(*s));
  }
  fail(where, message);
}

void check_key(const std::string& where, const std::string& section, const std::string& key) {
  const auto& keys = known_keys().find(section)->second;
  if (std::find(keys.begin(), keys.end(), key) != keys.end()) return;
  std::string message = fmt::format("unknown key {} (known keys in {}: {})",
                                    yaml_quote(fmt::format("{}.{}", section, key)), section, join(keys));
  if (std::string other = sections_holding(key); !other.empty()) {
    message += fmt::format("; did you mean {}?", other);
  } else if (auto k = closest(key, keys)) {
    message += fmt::format("; did you mean {}?", yaml_quote(fmt::format("{}.{}", section, *k)));
  }
  fail(where, message);
}

const char* kind_of(const YAML::Node& node) {
  if (node.IsMap()) return "a map";
  if (node.IsSequence()) return "a list";
  if (node.IsNull()) return "null";
  return "a scalar";
}

void collect_file(const std::string& text, const std::string& source, RawEntries& entries) {
  std::vector<YAML::Node> documents;
  try {
    documents = YAML::LoadAll(text);
  } catch (const YAML::Exception& e) {
    if (e.mark.is_null()) fail(source, fmt::format("invalid YAML: {}", e.msg));
    fail(located(source, e.mark), fmt::format("invalid YAML (column {}): {}", e.mark.column + 1, e.msg));
  }
  if (documents.size() > 1) {
    fail(located(source, documents[1].Mark()),
         "a second YAML document (after \"---\"); a config file holds exactly one");
  }
  if (documents.empty()) return;  // empty file: all defaults
  const YAML::Node& root = documents[0];
  if (!root.IsDefined() || root.IsNull()) return;
  if (!root.IsMap()) {
    fail(located(source, root.Mark()),
         fmt::format("expected a map of sections ({}) at the top level, got {}", section_list(),
                     root.IsScalar() ? show(root) : kind_of(root)));
  }
  std::map<std::string, int> section_lines;
  for (const auto& section_item : root) {
    const YAML::Node& section_key = section_item.first;
    const YAML::Node& section_value = section_item.second;
    std::string where = located(source, section_key.Mark());
    if (!section_key.IsScalar()) fail(where, fmt::format("expected a section name, got {}", kind_of(section_key)));
    const std::string& section = section_key.Scalar();
    if (!is_section(section)) fail_unknown_section(where, section);
    if (auto [it, inserted] = section_lines.emplace(section, section_key.Mark().line + 1); !inserted)
      fail(where, fmt::format("duplicate section {} (first on line {})", yaml_quote(section), it->second));
    if (section_value.IsNull()) continue;  // "model:" with every key commented out
    if (!section_value.IsMap()) {
      fail(where, fmt::format("section {} must be a map of key: value, got {}", yaml_quote(section),
                              section_value.IsScalar() ? show(section_value) : kind_of(section_value)));
    }
    std::map<std::string, int> key_lines;
    for (const auto& item : section_value) {
      const YAML::Node& key_node = item.first;
      const YAML::Node& value = item.second;
      std::string key_where = located(source, key_node.Mark());
      if (!key_node.IsScalar()) {
        fail(key_where, fmt::format("expected a key name in section {}, got {}", yaml_quote(section),
                                    kind_of(key_node)));
      }
      const std::string& key = key_node.Scalar();
      check_key(key_where, section, key);
      std::string full = fmt::format("{}.{}", section, key);
      if (auto [it, inserted] = key_lines.emplace(key, key_node.Mark().line + 1); !inserted)
        fail(key_where, fmt::format("duplicate key {} (first on line {})", yaml_quote(full), it->second));
      // A null value may carry no mark of its own; the key's line is the useful one then.
      std::string value_where =
          value.IsNull() || value.Mark().is_null() ? key_where : located(source, value.Mark());
      entries[full] = RawValue{value, value_where, false};
    }
  }
}

void collect_overrides(const std::vector<std::string>& overrides, RawEntries& entries) {
  for (const auto& ov : overrides) {
    std::string where = "--set " + ov;
    size_t eq = ov.find('=');
    std::string full = ov.substr(0, eq);
    size_t dot = full.find('.');
    if (eq == std::string::npos || dot == std::string::npos || dot == 0 || dot + 1 == full.size() ||
        full.find('.', dot + 1) != std::string::npos) {
      fail(where, "expected section.key=value");
    }
    std::string section = full.substr(0, dot);
    std::string key = full.substr(dot + 1);
    if (!is_section(section)) fail_unknown_section(where, section);
    check_key(where, section, key);
    std::string text = ov.substr(eq + 1);
    YAML::Node value;
    try {
      value = YAML::Load(text);
    } catch (const YAML::Exception& e) {
      fail(where, fmt::format("{}: cannot read the value {} as YAML: {}", full, yaml_quote(text), e.msg));
    }
    entries[full] = RawValue{value, where, true};
  }
}

// ---- reading one field --------------------------------------------------------------------

[[noreturn]] void fail_value(const std::string& key, const RawValue& raw, const std::string& expected) {
  fail(raw.where, fmt::format("{}: got {}, expected {}", key, show(raw.node), expected));
}

template <class T>
std::string describe_int(const IntRule& rule, bool out_of_type_range) {
  std::string phrase;
  if (rule.max && *rule.max == rule.min) {
    phrase = fmt::format("{}", rule.min);
  } else if (rule.max) {
    phrase = fmt::format("an integer in [{}, {}]", rule.min, *rule.max);
  } else if (out_of_type_range) {
    phrase = fmt::format("an integer in [{}, {}]", rule.min, std::numeric_limits<T>::max());
  } else {
    phrase = fmt::format("an integer >= {}", rule.min);
  }
  if (rule.note) phrase += fmt::format(" ({})", rule.note);
  return phrase;
}

std::string describe_real(const RealRule& rule) {
  if (!rule.hi) return fmt::format("a number {} {}", rule.lo_open ? ">" : ">=", rule.lo);
  return fmt::format("a number in {}{}, {}{}", rule.lo_open ? '(' : '[', rule.lo, *rule.hi,
                     rule.hi_open ? ')' : ']');
}

template <class T>
void read_field(const std::string& key, const RawValue& raw, T& field, const IntRule& rule) {
  static_assert(std::is_integral_v<T> && !std::is_same_v<T, bool>);
  // Wide enough for every field type: int64 for signed fields, uint64 for the seed.
  using Wide = std::conditional_t<std::is_unsigned_v<T>, uint64_t, int64_t>;
  if (!raw.node.IsScalar()) fail_value(key, raw, describe_int<T>(rule, false));
  std::string_view s = raw.node.Scalar();
  if (!s.empty() && s.front() == '+') {
    s.remove_prefix(1);
    if (!s.empty() && s.front() == '-') fail_value(key, raw, describe_int<T>(rule, false));
  }
  Wide v = 0;
  auto [end, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec == std::errc::result_out_of_range && end == s.data() + s.size())
    fail_value(key, raw, describe_int<T>(rule, true));
  if (ec != std::errc() || end != s.data() + s.size() || s.empty())
    fail_value(key, raw, describe_int<T>(rule, false));
  if constexpr (std::is_signed_v<T>) {
    if (v < rule.min || (rule.max && v > *rule.max)) fail_value(key, raw, describe_int<T>(rule, false));
    if (v > static_cast<Wide>(std::numeric_limits<T>::max()) ||
        v < static_cast<Wide>(std::numeric_limits<T>::min()))
      fail_value(key, raw, describe_int<T>(rule, true));
  } else {
    if (rule.min > 0 && v < static_cast<Wide>(rule.min)) fail_value(key, raw, describe_int<T>(rule, false));
    if (rule.max && v > static_cast<Wide>(*rule.max)) fail_value(key, raw, describe_int<T>(rule, false));
  }
  field = static_cast<T>(v);
}

void read_field(const std::string& key, const RawValue& raw, double& field, const RealRule& rule) {
  std::optional<double> v;
  if (raw.node.IsScalar()) v = parse_real(raw.node.Scalar());
  bool ok = v && (rule.lo_open ? *v > rule.lo : *v >= rule.lo) &&
            (!rule.hi || (rule.hi_open ? *v < *rule.hi : *v <= *rule.hi));
  if (!ok) fail_value(key, raw, describe_real(rule));
  field = *v;
}

void read_field(const std::string& key, const RawValue& raw, bool& field, const BoolRule&) {
  if (raw.node.IsScalar() && is_true(raw.node.Scalar())) field = true;
  else if (raw.node.IsScalar() && is_false(raw.node.Scalar())) field = false;
  else fail_value(key, raw, "true or false");
}

void read_field(const std::string& key, const RawValue& raw, std::string& field, const EnumRule& rule) {
  if (rule.allowed.empty()) {
    if (!raw.node.IsScalar()) fail_value(key, raw, "a string");
    field = raw.node.Scalar();
    return;
  }
  std::vector<std::string> allowed(rule.allowed.begin(), rule.allowed.end());
  if (raw.node.IsScalar() &&
      std::find(allowed.begin(), allowed.end(), raw.node.Scalar()) != allowed.end()) {
    field = raw.node.Scalar();
    return;
  }
  std::string expected = allowed.size() == 1 ? yaml_quote(allowed[0]) : "one of: " + join(allowed);
  if (rule.note) expected += fmt::format(" ({})", rule.note);
  if (raw.node.IsScalar()) {
    if (auto s = closest(raw.node.Scalar(), allowed)) expected += fmt::format("; did you mean {}?", yaml_quote(*s));
  }
  fail_value(key, raw, expected);
}

struct Applier {
  const RawEntries& entries;
  template <class T, class R>
  void operator()(const char* section, const char* key, T& field, const R& rule) {
    std::string full = fmt::format("{}.{}", section, key);
    auto it = entries.find(full);
    if (it != entries.end()) read_field(full, it->second, field, rule);
  }
};

// ---- rules across keys --------------------------------------------------------------------

class CrossChecks {
 public:
  CrossChecks(const RunConfig& c, const RawEntries& entries, const std::string& source)
      : c_(c), entries_(entries), source_(source) {}

  void run() const {
    const ModelConfig& m = c_.model;
    const DataConfig& d = c_.data;
    const TrainConfig& t = c_.train;
    const ParallelConfig& p = c_.parallel;

    if (t.batch_size % t.grad_accum_steps != 0) {
      fail_at({"train.grad_accum_steps", "train.batch_size"},
              fmt::format("train.grad_accum_steps: got {}, expected a divisor of train.batch_size = {} "
                          "(each step splits the batch into equal microbatches)",
                          t.grad_accum_steps, t.batch_size));
    }
    const int micro = t.batch_size / t.grad_accum_steps;  // sequences per microbatch

    for (const char* step_key : {"model.encoder_sparse_step", "model.decoder_sparse_step"}) {
      int step = std::string_view(step_key) == "model.encoder_sparse_step" ? m.encoder_sparse_step
                                                                           : m.decoder_sparse_step;
      if (step > 0 && m.num_experts < 1) {
        fail_at({"model.num_experts", step_key},
                fmt::format("model.num_experts: got {}, expected an integer >= 1 ({} = {} makes "
                            "Switch layers; set both sparse steps to 0 for a dense model)",
                            m.num_experts, step_key, step));
      }
    }

    // T5 buckets: a causal (decoder) stack keeps num_buckets / 2 exact buckets and spaces the
    // rest logarithmically up to max_distance, log(max_distance / max_exact): it must exceed 0.
    if (m.relative_attention_max_distance <= m.relative_attention_num_buckets / 2) {
      fail_at({"model.relative_attention_max_distance", "model.relative_attention_num_buckets"},
              fmt::format("model.relative_attention_max_distance: got {}, expected an integer > {} "
                          "(model.relative_attention_num_buckets / 2 = {} / 2, where the "
                          "log-spaced buckets start)",
                          m.relative_attention_max_distance, m.relative_attention_num_buckets / 2,
                          m.relative_attention_num_buckets));
    }

    for (const char* id_key : {"model.pad_token_id", "model.eos_token_id", "model.decoder_start_token_id"}) {
      int id = token_id(id_key);
      if (id >= m.vocab_size) {
        fail_at({id_key, "model.vocab_size"},
                fmt::format("{}: got {}, expected an integer in [0, {}] (below model.vocab_size = {})",
                            id_key, id, m.vocab_size - 1, m.vocab_size));
      }
    }
    if (m.eos_token_id == m.pad_token_id) {
      fail_at({"model.eos_token_id", "model.pad_token_id"},
              fmt::format("model.eos_token_id: got {}, expected an id other than model.pad_token_id "
                          "= {} (padding is masked out of the loss, eos is not)",
                          m.eos_token_id, m.pad_token_id));
    }

    // Routing groups tile a microbatch's tokens in each stack: encoder micro * inputs_length,
    // decoder micro * targets_length.
    if (m.group_size > 0) {
      int64_t enc = int64_t{micro} * d.inputs_length;
      int64_t dec = int64_t{micro} * d.targets_length;
      if (enc % m.group_size != 0 || dec % m.group_size != 0) {
        fail_at({"model.group_size", "train.batch_size", "train.grad_accum_steps", "data.inputs_length",
                 "data.targets_length"},
                fmt::format("model.group_size: got {}, expected a divisor of the tokens of a microbatch "
                            "in each stack: encoder {} x {} = {} and decoder {} x {} = {} (microbatch = "
                            "train.batch_size / train.grad_accum_steps = {} / {} = {} sequences; 0 "
                            "routes each sequence as its own group)",
                            m.group_size, micro, d.inputs_length, enc, micro, d.targets_length, dec,
                            t.batch_size, t.grad_accum_steps, micro));
      }
    }

    if (d.synthetic_vocab != 0 && (d.synthetic_vocab < 3 || d.synthetic_vocab > m.vocab_size)) {
      fail_at({"data.synthetic_vocab", "model.vocab_size"},
              fmt::format("data.synthetic_vocab: got {}, expected 0 (the whole vocabulary) or an "
                          "integer in [3, {}] (model.vocab_size = {}; pad, eos and at least one "
                          "content token)",
                          d.synthetic_vocab, m.vocab_size, m.vocab_size));
    }

    if (d.source == "shards" && d.train_glob.empty()) {
      fail_at({"data.source", "data.train_glob"},
              "data.train_glob: got \"\", expected a glob of token shards (data.source = shards; "
              "make shards with switcht5-data tokenize)");
    }
    if (d.source == "shards" && t.eval_every > 0 && d.val_glob.empty()) {
      fail_at({"train.eval_every", "data.val_glob"},
              fmt::format("data.val_glob: got \"\", expected a glob of validation shards "
                          "(train.eval_every = {} evaluates on them; 0 turns evaluation off)",
                          t.eval_every));
    }

    if (t.min_learning_rate > t.learning_rate) {
      fail_at({"train.min_learning_rate", "train.learning_rate"},
              fmt::format("train.min_learning_rate: got {}, expected a number in [0, {}] (at most "
                          "train.learning_rate)",
                          t.min_learning_rate, t.learning_rate));
    }

    if (micro % p.data != 0) {
      fail_at({"parallel.data", "train.batch_size", "train.grad_accum_steps"},
              fmt::format("parallel.data: got {}, expected a divisor of the microbatch, "
                          "train.batch_size / train.grad_accum_steps = {} / {} = {} sequences",
                          p.data, t.batch_size, t.grad_accum_steps, micro));
    }
    if (m.num_heads % p.model != 0 || m.d_ff % p.model != 0) {
      fail_at({"parallel.model", "model.num_heads", "model.d_ff"},
              fmt::format("parallel.model: got {}, expected a divisor of model.num_heads = {} and "
                          "model.d_ff = {} (tensor parallelism splits heads and MLP columns)",
                          p.model, m.num_heads, m.d_ff));
    }
    if (m.num_experts == 0 && p.expert != 1) {
      fail_at({"parallel.expert", "model.num_experts"},
              fmt::format("parallel.expert: got {}, expected 1 (model.num_experts = 0: the model has "
                          "no experts to distribute)",
                          p.expert));
    }
    if (m.num_experts > 0 && m.num_experts % p.expert != 0) {
      fail_at({"parallel.expert", "model.num_experts"},
              fmt::format("parallel.expert: got {}, expected a divisor of model.num_experts = {}",
                          p.expert, m.num_experts));
    }
    if (p.data_plane == "nccl" && t.backend != "cuda") {
      fail_at({"parallel.data_plane", "train.backend"},
              fmt::format("parallel.data_plane: got \"nccl\", expected mpi with train.backend = {} "
                          "(NCCL moves CUDA device memory: set train.backend: cuda)",
                          t.backend));
    }
    if (p.data % p.expert != 0) {
      fail_at({"parallel.expert", "parallel.data"},
              fmt::format("parallel.expert: got {}, expected a divisor of parallel.data = {} "
                          "(experts are sharded over groups of data-parallel ranks)",
                          p.expert, p.data));
    }
  }

 private:
  int token_id(std::string_view key) const {
    if (key == "model.pad_token_id") return c_.model.pad_token_id;
    if (key == "model.eos_token_id") return c_.model.eos_token_id;
    return c_.model.decoder_start_token_id;
  }

  // Reports at the line of one of the keys involved: a key set by --set first (the most recent
  // change), else the first of `keys` set in the file, else the file as a whole.
  [[noreturn]] void fail_at(std::initializer_list<const char*> keys, const std::string& message) const {
    for (bool want_override : {true, false}) {
      for (const char* key : keys) {
        auto it = entries_.find(std::string_view(key));
        if (it != entries_.end() && it->second.from_override == want_override) fail(it->second.where, message);
      }
    }
    fail(source_, message);
  }

  const RunConfig& c_;
  const RawEntries& entries_;
  const std::string& source_;
};

// ---- writing ------------------------------------------------------------------------------

// Shortest text that reads back as the same double, always with a '.' so that every YAML reader
// takes it for a float.
std::string format_real(double v) {
  std::string s = fmt::format("{}", v);
  if (s.find_first_of(".n") != std::string::npos) return s;  // has a '.', or is inf / nan
  size_t e = s.find('e');
  // "1e-06" -> "1.0e-06": YAML 1.1 readers (PyYAML) take an exponent without a '.' for a string.
  if (e == std::string::npos) return s + ".0";
  return s.insert(e, ".0");
}

struct Writer {
  std::string out;
  std::string_view current_section;

  template <class T, class R>
  void operator()(const char* section, const char* key, T& field, const R&) {
    if (current_section != section) {
      current_section = section;
      out += fmt::format("{}:\n", section);
    }
    out += fmt::format("  {}: {}\n", key, format_value(field));
  }

  template <class T>
  static std::string format_value(const T& v) {
    if constexpr (std::is_same_v<T, bool>) return v ? "true" : "false";
    else if constexpr (std::is_same_v<T, double>) return format_real(v);
    else if constexpr (std::is_same_v<T, std::string>) return yaml_quote(v);
    else return fmt::format("{}", v);
  }
};

// One row of the config reference per key.
struct ReferenceWriter {
  std::string out;

  template <class T, class R>
  void operator()(const char* section, const char* key, T& field, const R& rule) {
    const std::string full = fmt::format("{}.{}", section, key);
    std::string_view meaning;
    for (const ConfigKeyDoc& d : kConfigKeyDocs)
      if (d.key == full) meaning = d.meaning;
    SWT_CHECK(!meaning.empty(), "config key {} has no meaning in config/config_docs.h", full);
    std::string shown = Writer::format_value(field);
    if (full == "model.num_decoder_layers") shown = "num_layers";
    out += fmt::format("| `{}` | {} | `{}` | {} | {} |\n", full, type_name(field), shown,
                       allowed(field, rule), meaning);
  }

  template <class T>
  static const char* type_name(const T&) {
    if constexpr (std::is_same_v<T, bool>) return "bool";
    else if constexpr (std::is_same_v<T, double>) return "number";
    else if constexpr (std::is_same_v<T, std::string>) return "string";
    else return "integer";
  }
  template <class T>
  static std::string allowed(const T&, const IntRule& r) { return describe_int<T>(r, false); }
  template <class T>
  static std::string allowed(const T&, const RealRule& r) { return describe_real(r); }
  template <class T>
  static std::string allowed(const T&, const BoolRule&) { return "true or false"; }
  template <class T>
  static std::string allowed(const T&, const EnumRule& r) {
    if (r.allowed.empty()) return "any string";
    std::string s;
    for (std::string_view a : r.allowed) s += fmt::format("{}`{}`", s.empty() ? "" : ", ", a);
    return s;
  }
};

}  // namespace

std::string config_reference_markdown() {
  RunConfig defaults;
  ReferenceWriter w;
  w.out = "| key | type | default | allowed | meaning |\n| --- | --- | --- | --- | --- |\n";
  for_each_field(defaults, w);
  return w.out;
}

RunConfig parse_config(const std::string& yaml_text, const std::string& source_name,
                       const std::vector<std::string>& overrides) {
  RawEntries entries;
  collect_file(yaml_text, source_name, entries);
  collect_overrides(overrides, entries);

  RunConfig config;
  Applier applier{entries};
  for_each_field(config, applier);
  if (config.model.num_decoder_layers < 0) config.model.num_decoder_layers = config.model.num_layers;
  CrossChecks(config, entries, source_name).run();
  config.source_path = source_name;
  return config;
}

RunConfig load_config(const std::string& path, const std::vector<std::string>& overrides) {
  // A regular file of at most kMaxConfigBytes: a FIFO or /dev/zero given as --config would
  // otherwise block or be read without end. Real configs are a few KB.
  return parse_config(read_regular_file(path, "config", kMaxConfigBytes), path, overrides);
}

std::string to_yaml(const RunConfig& config) {
  RunConfig resolved = config;
  if (resolved.model.num_decoder_layers < 0) resolved.model.num_decoder_layers = resolved.model.num_layers;
  Writer writer;
  std::string source = resolved.source_path;
  std::replace_if(source.begin(), source.end(), [](unsigned char ch) { return ch < 0x20; }, ' ');
  writer.out = fmt::format("# SwitchT5 run configuration, resolved{}\n",
                           source.empty() ? "" : fmt::format(" from {}", source));
  for_each_field(resolved, writer);
  return writer.out;
}

}  // namespace switcht5
