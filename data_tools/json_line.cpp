#include "json_line.h"

#include <fmt/format.h>

namespace switcht5::data_tools {

namespace {

constexpr int kMaxDepth = 256;

// Length of the valid UTF-8 sequence at p (avail bytes readable), or 0 when it is invalid
// (RFC 3629: no overlong forms, no surrogates U+D800..DFFF, nothing above U+10FFFF).
size_t utf8_sequence_length(const unsigned char* p, size_t avail) {
  const unsigned c = p[0];
  if (c < 0x80) return 1;
  if (c < 0xC2) return 0;  // a continuation byte, or an overlong 2-byte lead (C0, C1)
  auto cont = [&](size_t i, unsigned lo = 0x80, unsigned hi = 0xBF) {
    return p[i] >= lo && p[i] <= hi;
  };
  if (c < 0xE0) return avail >= 2 && cont(1) ? 2 : 0;
  if (c < 0xF0) {
    const unsigned lo = c == 0xE0 ? 0xA0 : 0x80;  // E0 80..9F would be overlong
    const unsigned hi = c == 0xED ? 0x9F : 0xBF;  // ED A0..BF would be a surrogate
    return avail >= 3 && cont(1, lo, hi) && cont(2) ? 3 : 0;
  }
  if (c < 0xF5) {
    const unsigned lo = c == 0xF0 ? 0x90 : 0x80;  // F0 80..8F would be overlong
    const unsigned hi = c == 0xF4 ? 0x8F : 0xBF;  // F4 90.. would exceed U+10FFFF
    return avail >= 4 && cont(1, lo, hi) && cont(2) && cont(3) ? 4 : 0;
  }
  return 0;
}

void append_utf8(std::string* out, uint32_t cp) {
  if (cp < 0x80) {
    out->push_back(char(cp));
  } else if (cp < 0x800) {
    out->push_back(char(0xC0 | (cp >> 6)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(char(0xE0 | (cp >> 12)));
    out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(char(0xF0 | (cp >> 18)));
    out->push_back(char(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(char(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(char(0x80 | (cp & 0x3F)));
  }
}

const char* describe_value_start(char c) {
  switch (c) {
    case '{': return "an object";
    case '[': return "an array";
    case 't': case 'f': return "a boolean";
    case 'n': return "null";
    default: return (c == '-' || (c >= '0' && c <= '9')) ? "a number" : "not a JSON value";
  }
}

class Parser {
 public:
  explicit Parser(std::string_view s) : s_(s) {}

  bool parse_line(std::string* text) {
    skip_ws();
    if (at_end()) return fail("empty line (expected a JSON object)");
    if (peek() != '{') return fail("expected a JSON object starting with '{'");
    ++pos_;
    bool seen_text = false;
    skip_ws();
    if (!at_end() && peek() == '}') {
      ++pos_;
    } else {
      for (;;) {
        skip_ws();
        if (at_end() || peek() != '"') return fail("expected a string key");
        key_.clear();
        if (!parse_string(&key_)) return false;
        skip_ws();
        if (at_end() || peek() != ':') return fail("expected ':' after a key");
        ++pos_;
        skip_ws();
        if (key_ == "text") {
          if (seen_text) return fail("duplicate \"text\" member");
          if (at_end()) return fail("unexpected end of line (expected a value)");
          if (peek() != '"')
            return fail(fmt::format("\"text\" is {}, not a string", describe_value_start(peek())));
          text->clear();
          if (!parse_string(text)) return false;
          seen_text = true;
        } else if (!parse_value(1)) {
          return false;
        }
        skip_ws();
        if (at_end()) return fail("unexpected end of line (expected ',' or '}')");
        if (peek() == ',') { ++pos_; continue; }
        if (peek() == '}') { ++pos_; break; }
        return fail("expected ',' or '}' after a member");
      }
    }
    skip_ws();
    if (!at_end()) return fail("trailing characters after the JSON object");
    if (!seen_text) {
      pos_ = 0;
      return fail("no \"text\" member");
    }
    return true;
  }

  const std::string& error() const { return error_; }

 private:
  bool at_end() const { return pos_ >= s_.size(); }
  char peek() const { return s_[pos_]; }

  bool fail(const std::string& msg) {
    error_ = fmt::format("{} (column {})", msg, pos_ + 1);
    return false;
  }

  void skip_ws() {
    while (pos_ < s_.size() &&
           (s_[pos_] == ' ' || s_[pos_] == '\t' || s_[pos_] == '\n' || s_[pos_] == '\r'))
      ++pos_;
  }

  // A JSON value of any kind, checked and discarded.
  bool parse_value(int depth) {
    if (depth > kMaxDepth) return fail(fmt::format("nesting deeper than {} levels", kMaxDepth));
    if (at_end()) return fail("unexpected end of line (expected a value)");
    const char c = peek();
    if (c == '"') return parse_string(nullptr);
    if (c == '{' || c == '[') {
      const char close = c == '{' ? '}' : ']';
      ++pos_;
      skip_ws();
      if (!at_end() && peek() == close) { ++pos_; return true; }
      for (;;) {
        skip_ws();
        if (c == '{') {
          if (at_end() || peek() != '"') return fail("expected a string key");
          if (!parse_string(nullptr)) return false;
          skip_ws();
          if (at_end() || peek() != ':') return fail("expected ':' after a key");
          ++pos_;
          skip_ws();
        }
        if (!parse_value(depth + 1)) return false;
        skip_ws();
        if (at_end()) return fail(fmt::format("unexpected end of line (expected ',' or '{}')", close));
        if (peek() == ',') { ++pos_; continue; }
        if (peek() == close) { ++pos_; return true; }
        return fail(fmt::format("expected ',' or '{}'", close));
      }
    }
    if (c == 't') return parse_literal("true");
    if (c == 'f') return parse_literal("false");
    if (c == 'n') return parse_literal("null");
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
    return fail(fmt::format("unexpected character '{}'", printable(c)));
  }

  static std::string printable(char c) {
    const auto u = static_cast<unsigned char>(c);
    return u >= 0x20 && u < 0x7F ? std::string(1, c) : fmt::format("\\x{:02x}", u);
  }

  bool parse_literal(std::string_view word) {
    if (s_.substr(pos_, word.size()) != word) return fail("invalid literal");
    pos_ += word.size();
    return true;
  }

  // -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?
  bool parse_number() {
    auto digit = [&] { return !at_end() && peek() >= '0' && peek() <= '9'; };
    if (peek() == '-') ++pos_;
    if (!digit()) return fail("invalid number");
    if (peek() == '0') ++pos_;
    else while (digit()) ++pos_;
    if (!at_end() && peek() == '.') {
      ++pos_;
      if (!digit()) return fail("invalid number (no digits after '.')");
      while (digit()) ++pos_;
    }
    if (!at_end() && (peek() == 'e' || peek() == 'E')) {
      ++pos_;
      if (!at_end() && (peek() == '+' || peek() == '-')) ++pos_;
      if (!digit()) return fail("invalid number (no exponent digits)");
      while (digit()) ++pos_;
    }
    return true;
  }

  bool parse_hex4(uint32_t* cp) {
    if (s_.size() - pos_ < 4) return fail("truncated \\u escape");
    uint32_t v = 0;
    for (int i = 0; i < 4; ++i) {
      const char h = s_[pos_ + i];
      v <<= 4;
      if (h >= '0' && h <= '9') v |= uint32_t(h - '0');
      else if (h >= 'a' && h <= 'f') v |= uint32_t(h - 'a' + 10);
      else if (h >= 'A' && h <= 'F') v |= uint32_t(h - 'A' + 10);
      else return fail("invalid \\u escape (expected 4 hex digits)");
    }
    pos_ += 4;
    *cp = v;
    return true;
  }

  // A string starting at '"'; decoded into *out unless out is null (then only checked).
  bool parse_string(std::string* out) {
    ++pos_;  // opening quote
    const auto* bytes = reinterpret_cast<const unsigned char*>(s_.data());
    for (;;) {
      // Copy the run of plain ASCII bytes in one go.
      const size_t run_begin = pos_;
      while (pos_ < s_.size()) {
        const unsigned char b = bytes[pos_];
        if (b == '"' || b == '\\' || b < 0x20 || b >= 0x80) break;
        ++pos_;
      }
      if (out) out->append(s_.data() + run_begin, pos_ - run_begin);
      if (at_end()) return fail("unterminated string");
      const unsigned char b = bytes[pos_];
      if (b == '"') { ++pos_; return true; }
      if (b < 0x20) return fail(fmt::format("raw control character \\x{:02x} in a string", b));
      if (b >= 0x80) {
        const size_t n = utf8_sequence_length(bytes + pos_, s_.size() - pos_);
        if (n == 0) return fail(fmt::format("invalid UTF-8 byte \\x{:02x} in a string", b));
        if (out) out->append(s_.data() + pos_, n);
        pos_ += n;
        continue;
      }
      // Backslash escape.
      ++pos_;
      if (at_end()) return fail("unterminated string");
      const char e = peek();
      ++pos_;
      char simple = 0;
      switch (e) {
        case '"': simple = '"'; break;
        case '\\': simple = '\\'; break;
        case '/': simple = '/'; break;
        case 'b': simple = '\b'; break;
        case 'f': simple = '\f'; break;
        case 'n': simple = '\n'; break;
        case 'r': simple = '\r'; break;
        case 't': simple = '\t'; break;
        case 'u': break;
        default: --pos_; return fail(fmt::format("invalid escape '\\{}'", printable(e)));
      }
      if (simple) {
        if (out) out->push_back(simple);
        continue;
      }
      uint32_t cp;
      if (!parse_hex4(&cp)) return false;
      if (cp >= 0xDC00 && cp <= 0xDFFF)
        return fail(fmt::format("lone low surrogate \\u{:04x}", cp));
      if (cp >= 0xD800 && cp <= 0xDBFF) {
        if (s_.substr(pos_, 2) != "\\u")
          return fail(fmt::format("lone high surrogate \\u{:04x} (no low surrogate follows)", cp));
        pos_ += 2;
        uint32_t low;
        if (!parse_hex4(&low)) return false;
        if (low < 0xDC00 || low > 0xDFFF)
          return fail(fmt::format("high surrogate \\u{:04x} followed by \\u{:04x}, not a low surrogate",
                                  cp, low));
        cp = 0x10000 + ((cp - 0xD800) << 10) + (low - 0xDC00);
      }
      if (out) append_utf8(out, cp);
    }
  }

  std::string_view s_;
  size_t pos_ = 0;
  std::string key_;
  std::string error_;
};

}  // namespace

bool extract_json_text(std::string_view line, std::string* text, std::string* error) {
  Parser p(line);
  if (p.parse_line(text)) return true;
  *error = p.error();
  return false;
}

bool is_valid_utf8(std::string_view s) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  size_t i = 0;
  while (i < s.size()) {
    const size_t n = utf8_sequence_length(p + i, s.size() - i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

}  // namespace switcht5::data_tools
