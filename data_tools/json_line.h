// A small, strict JSON reader for one line of C4-style JSON lines: the line must be one JSON
// object (RFC 8259); its "text" member must be a string and is returned as UTF-8. Other members
// may hold any JSON value and are checked for syntax, then ignored (C4 has "timestamp" and
// "url"; other dumps have "date", "meta", ...).
//
// Strictness, so that a corrupt line is reported instead of silently tokenized:
//   - escapes: \" \\ \/ \b \f \n \r \t and \uXXXX; a UTF-16 surrogate pair (\ud83d\ude0b) becomes
//     one 4-byte UTF-8 sequence; a lone or reversed surrogate is an error;
//   - raw bytes inside strings must be valid UTF-8 (no overlong forms, no encoded surrogates,
//     nothing above U+10FFFF); raw control characters (< 0x20) are an error;
//   - a missing, duplicated or non-string "text", anything after the closing brace other than
//     whitespace, and nesting deeper than 256 levels are errors.
#pragma once
#include <string>
#include <string_view>

namespace switcht5::data_tools {

// Parses `line` (without its newline) and stores the decoded "text" member in *text. Returns
// false and sets *error to a one-line reason (with the byte column, 1-based) when the line is
// malformed.
bool extract_json_text(std::string_view line, std::string* text, std::string* error);

// True when `s` is valid UTF-8 (same rules as strings in the JSON above).
bool is_valid_utf8(std::string_view s);

}  // namespace switcht5::data_tools
