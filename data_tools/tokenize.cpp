#include "tokenize.h"

#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <deque>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <set>
#include <thread>

#include <fmt/format.h>
#include <sentencepiece_processor.h>

#include "core/check.h"
#include "core/input_file.h"
#include "data/shard.h"
#include "json_line.h"
#include "line_reader.h"

namespace fs = std::filesystem;

namespace switcht5::data_tools {

// ---------------------------------------------------------------------------------------------
// Tokenizer

Tokenizer::Tokenizer(const std::string& model_path)
    : sp_(std::make_unique<sentencepiece::SentencePieceProcessor>()) {
  // Read here, not by SentencePiece from the path: only a regular file of a bounded size (T5's
  // model is 0.8 MB), so a FIFO or a device given as --spm fails at once instead of blocking.
  const std::string model =
      read_regular_file(model_path, "SentencePiece model", kMaxSentencePieceModelBytes);
  const auto status = sp_->LoadFromSerializedProto(model);
  SWT_USER_CHECK(status.ok(), "{}: cannot load the SentencePiece model: {}", model_path,
                 status.ToString());
  vocab_size_ = sp_->GetPieceSize();
  eos_id_ = sp_->eos_id();
  SWT_USER_CHECK(vocab_size_ > 0, "{}: the SentencePiece model has no pieces", model_path);
  SWT_USER_CHECK(eos_id_ >= 0 && eos_id_ < vocab_size_,
                 "{}: the SentencePiece model has no EOS piece (eos_id {}); documents need one "
                 "(T5: eos_id=1)",
                 model_path, eos_id_);
}

Tokenizer::~Tokenizer() = default;

void Tokenizer::encode(std::string_view text, std::vector<int>* ids) const {
  const auto status = sp_->Encode(text, ids);
  SWT_CHECK(status.ok(), "SentencePiece Encode failed: {}", status.ToString());
}

std::string Tokenizer::decode(const std::vector<int>& ids) const {
  std::string text;
  const auto status = sp_->Decode(ids, &text);
  SWT_CHECK(status.ok(), "SentencePiece Decode failed: {}", status.ToString());
  return text;
}

// ---------------------------------------------------------------------------------------------

void BadLineCounter::report(const std::string& path, uint64_t line, const std::string& reason) {
  ++count_;
  fmt::print(log_, "warning: {}:{}: malformed line skipped: {}\n", path, line, reason);
  SWT_USER_CHECK(count_ <= limit_,
                 "too many malformed lines: {} so far, more than --max-bad-lines {} (the last: "
                 "{}:{}: {})",
                 count_, limit_, path, line, reason);
}

std::vector<std::string> expand_inputs(const std::vector<std::string>& globs) {
  SWT_USER_CHECK(!globs.empty(), "--input GLOB is required");
  std::vector<std::string> files;
  std::set<std::string> seen;
  for (const std::string& g : globs)
    for (std::string& p : expand_glob(g, "--input")) {
      if (!seen.insert(p).second) continue;
      require_regular_file(p, "input");
      files.push_back(std::move(p));
    }
  return files;
}

std::string shard_path_for(const std::string& input_path, const std::string& output_dir) {
  std::string name = fs::path(input_path).filename().string();
  for (std::string_view suffix : {".json.gz", ".jsonl.gz", ".jsonl", ".json", ".gz"}) {
    if (name.size() > suffix.size() && name.ends_with(suffix)) {
      name.resize(name.size() - suffix.size());
      break;
    }
  }
  return (fs::path(output_dir) / (name + ".shard")).string();
}

namespace {

using Clock = std::chrono::steady_clock;

double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

// Lines [first_line, first_line + lines.size()) of one file.
struct Batch {
  uint64_t first_line = 0;
  size_t bytes = 0;
  std::vector<std::string> lines;
};

struct BatchResult {
  std::vector<int32_t> tokens;        // all documents' tokens, EOS included
  std::vector<size_t> doc_lengths;
  std::vector<std::pair<uint64_t, std::string>> bad;  // (line number, reason)
  uint64_t text_bytes = 0;
};

bool is_blank(const std::string& line) {
  return std::all_of(line.begin(), line.end(),
                     [](char c) { return c == ' ' || c == '\t' || c == '\r'; });
}

BatchResult process_batch(const Batch& batch, const Tokenizer& tok) {
  BatchResult r;
  std::string text, error;
  std::vector<int> ids;
  for (size_t i = 0; i < batch.lines.size(); ++i) {
    const std::string& line = batch.lines[i];
    if (is_blank(line)) continue;
    if (!extract_json_text(line, &text, &error)) {
      r.bad.emplace_back(batch.first_line + i, error);
      continue;
    }
    tok.encode(text, &ids);
    r.tokens.insert(r.tokens.end(), ids.begin(), ids.end());
    r.tokens.push_back(tok.eos_id());
    r.doc_lengths.push_back(ids.size() + 1);
    r.text_bytes += text.size();
  }
  return r;
}

// Workers that turn batches into results; results come back through futures, so the caller
// decides the order in which they are used.
class BatchPool {
 public:
  BatchPool(int num_threads, const Tokenizer& tok) : tok_(tok) {
    for (int i = 0; i < num_threads; ++i) threads_.emplace_back([this] { work(); });
  }
  ~BatchPool() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
      queue_.clear();  // pending batches are dropped (their futures report broken_promise)
    }
    cv_.notify_all();
    for (auto& t : threads_) t.join();
  }
  std::future<BatchResult> submit(Batch batch) {
    std::packaged_task<BatchResult()> task(
        [this, b = std::move(batch)] { return process_batch(b, tok_); });
    auto fut = task.get_future();
    {
      std::lock_guard<std::mutex> lock(mu_);
      queue_.push_back(std::move(task));
    }
    cv_.notify_one();
    return fut;
  }

 private:
  void work() {
    for (;;) {
      std::packaged_task<BatchResult()> task;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
        if (stop_) return;
        task = std::move(queue_.front());
        queue_.pop_front();
      }
      task();  // exceptions land in the future
    }
  }

  const Tokenizer& tok_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::packaged_task<BatchResult()>> queue_;
  bool stop_ = false;
  std::vector<std::thread> threads_;
};

std::string format_duration(double s) {
  if (!(s >= 0) || s > 1e7) return "?";
  const auto t = static_cast<int64_t>(s + 0.5);
  return fmt::format("{}:{:02d}:{:02d}", t / 3600, (t / 60) % 60, t % 60);
}

// Progress on the log: rewritten in place on a terminal (at most 4 times a second), one line
// every 10 s otherwise (logs of long runs).
class Progress {
 public:
  Progress(std::FILE* log, bool enabled, uint64_t total_bytes)
      : log_(log), enabled_(enabled), total_bytes_(total_bytes), tty_(::isatty(::fileno(log)) == 1) {}

  void update(const TokenizeSummary& s, uint64_t bytes_read, const std::string& file, size_t index,
              size_t num_files) {
    if (!enabled_) return;
    const auto now = Clock::now();
    if (now - last_ < std::chrono::milliseconds(tty_ ? 250 : 10000)) return;
    last_ = now;
    const double secs = seconds_since(start_);
    const double frac = total_bytes_ ? std::min(1.0, double(bytes_read) / double(total_bytes_)) : 0;
    const double eta = frac > 0 ? secs * (1 - frac) / frac : -1;
    const std::string line = fmt::format(
        "{:5.1f}%  {} docs  {:.0f} docs/s  {:.2f} MB/s  ETA {}  [{}/{}] {}", 100 * frac, s.documents,
        s.documents / std::max(secs, 1e-9), s.text_bytes / std::max(secs, 1e-9) * 1e-6,
        format_duration(eta), index + 1, num_files, fs::path(file).filename().string());
    if (tty_) fmt::print(log_, "\r{}\x1b[K", line);
    else fmt::print(log_, "{}\n", line);
    std::fflush(log_);
    shown_ = true;
  }

  // Erases the in-place line before other output.
  void clear() {
    if (enabled_ && tty_ && shown_) fmt::print(log_, "\r\x1b[K");
    shown_ = false;
  }

 private:
  std::FILE* log_;
  bool enabled_;
  uint64_t total_bytes_;
  bool tty_;
  bool shown_ = false;
  Clock::time_point start_ = Clock::now();
  Clock::time_point last_ = Clock::now();
};

}  // namespace

TokenizeSummary tokenize_inputs(const TokenizeOptions& opts, std::FILE* out, std::FILE* log) {
  SWT_USER_CHECK(!opts.spm_model.empty(), "tokenize: --spm MODEL is required");
  SWT_USER_CHECK(!opts.output_dir.empty(), "tokenize: --output DIR is required");
  SWT_USER_CHECK(opts.threads >= 1, "tokenize: --threads must be at least 1, got {}", opts.threads);
  SWT_USER_CHECK(opts.max_bad_lines >= 0, "tokenize: --max-bad-lines must be >= 0, got {}",
                 opts.max_bad_lines);
  SWT_CHECK(opts.batch_lines >= 1, "batch_lines must be at least 1");

  const std::vector<std::string> files = expand_inputs(opts.input_globs);
  std::map<std::string, std::string> shard_owner;  // shard path -> input path
  std::vector<std::string> shard_paths;
  TokenizeSummary s;
  for (const std::string& f : files) {
    std::string shard = shard_path_for(f, opts.output_dir);
    auto [it, fresh] = shard_owner.emplace(shard, f);
    SWT_USER_CHECK(fresh, "inputs {} and {} would both be written to {}; tokenize them into "
                   "different --output directories", it->second, f, shard);
    shard_paths.push_back(std::move(shard));
    std::error_code ec;
    s.input_bytes += fs::file_size(f, ec);
  }
  // Before any work: shards that exist are replaced only when asked (a typo in --output must not
  // cost the shards of a finished run).
  if (!opts.force) {
    std::vector<std::string> existing;
    for (const std::string& shard : shard_paths) {
      std::error_code ec;
      if (fs::exists(fs::symlink_status(shard, ec))) existing.push_back(shard);
    }
    SWT_USER_CHECK(existing.empty(),
                   "{}: the shard exists{}; pass --force to replace {}", existing.empty() ? "" : existing[0],
                   existing.size() > 1 ? fmt::format(" (and {} more of the {} outputs)",
                                                     existing.size() - 1, shard_paths.size())
                                       : "",
                   existing.size() > 1 ? "them" : "it");
  }
  const Tokenizer tok(opts.spm_model);
  {
    std::error_code ec;
    fs::create_directories(opts.output_dir, ec);
    SWT_USER_CHECK(!ec && fs::is_directory(opts.output_dir),
                   "--output {}: cannot create the directory{}", opts.output_dir,
                   ec ? ": " + ec.message() : " (a file of that name exists)");
  }
  const auto t0 = Clock::now();

  std::unique_ptr<BatchPool> pool;
  if (opts.threads > 1) pool = std::make_unique<BatchPool>(opts.threads, tok);
  const size_t max_in_flight = 4 * size_t(opts.threads);
  constexpr size_t kMaxBatchBytes = 8 << 20;
  BadLineCounter bad(opts.max_bad_lines, log);
  Progress progress(log, !opts.quiet, s.input_bytes);
  uint64_t bytes_before_file = 0;

  for (size_t fi = 0; fi < files.size(); ++fi) {
    const std::string& path = files[fi];
    LineReader reader(path);
    ShardWriter writer(shard_paths[fi], uint64_t(tok.vocab_size()));
    int64_t file_docs = 0, file_tokens = 0, file_bad = 0;

    auto consume = [&](BatchResult r) {
      for (const auto& [line, reason] : r.bad) {
        progress.clear();
        ++file_bad;
        bad.report(path, line, reason);
      }
      size_t at = 0;
      for (size_t len : r.doc_lengths) {
        writer.add_document(r.tokens.data() + at, len);
        at += len;
      }
      file_docs += int64_t(r.doc_lengths.size());
      file_tokens += int64_t(r.tokens.size());
      s.documents += int64_t(r.doc_lengths.size());
      s.tokens += int64_t(r.tokens.size());
      s.text_bytes += r.text_bytes;
      progress.update(s, bytes_before_file + reader.file_bytes_read(), path, fi, files.size());
    };
    std::deque<std::future<BatchResult>> in_flight;
    auto dispatch = [&](Batch&& b) {
      if (!pool) {
        consume(process_batch(b, tok));
        return;
      }
      in_flight.push_back(pool->submit(std::move(b)));
      if (in_flight.size() >= max_in_flight) {
        auto fut = std::move(in_flight.front());
        in_flight.pop_front();
        consume(fut.get());
      }
    };

    Batch batch;
    std::string line;
    while (reader.next(&line)) {
      if (batch.lines.empty()) batch.first_line = reader.line_number();
      batch.bytes += line.size();
      batch.lines.push_back(std::move(line));
      if (batch.lines.size() >= opts.batch_lines || batch.bytes >= kMaxBatchBytes) {
        dispatch(std::move(batch));
        batch = Batch();
      }
    }
    if (!batch.lines.empty()) dispatch(std::move(batch));
    while (!in_flight.empty()) {
      auto fut = std::move(in_flight.front());
      in_flight.pop_front();
      consume(fut.get());
    }
    writer.finish();

    progress.clear();
    if (file_docs == 0)
      fmt::print(log, "warning: {}: no documents ({}); wrote {} with 0 documents\n", path,
                 reader.line_number() == 0 ? "empty file"
                                           : fmt::format("{} lines, all blank or malformed",
                                                         reader.line_number()),
                 shard_paths[fi]);
    if (!opts.quiet)
      fmt::print(out, "{} -> {}: {} documents, {} tokens{}\n", path, shard_paths[fi], file_docs,
                 file_tokens, file_bad ? fmt::format(", {} malformed lines skipped", file_bad) : "");
    std::error_code ec;
    bytes_before_file += fs::file_size(path, ec);
    s.files += 1;
    s.shards.push_back(shard_paths[fi]);
  }
  progress.clear();
  s.bad_lines = bad.count();
  s.seconds = seconds_since(t0);
  const double secs = std::max(s.seconds, 1e-9);
  fmt::print(out,
             "tokenized {} files: {} documents, {} tokens (EOS included), {} malformed lines "
             "skipped, {:.2f} s, {:.0f} docs/s, {:.2f} MB/s of text\n",
             s.files, s.documents, s.tokens, s.bad_lines, s.seconds, s.documents / secs,
             s.text_bytes / secs * 1e-6);
  std::fflush(out);
  return s;
}

}  // namespace switcht5::data_tools
