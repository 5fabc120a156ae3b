#include "core/check.h"

namespace switcht5 {

void throw_check_failure(const char* file, int line, const char* cond, const std::string& msg) {
  throw Error(fmt::format("{}:{}: check failed ({}): {}", file, line, cond, msg));
}

}  // namespace switcht5
