#include "backend/backend.h"

#include "backend/cpu/cpu_backend.h"
#include "backend/reference/reference_backend.h"
#include "core/check.h"

namespace switcht5 {

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "reference") return std::make_unique<ReferenceBackend>();
  if (name == "cpu") return std::make_unique<CpuBackend>();
  throw UserError(fmt::format("unknown backend '{}': expected one of 'reference', 'cpu'", name));
}

}  // namespace switcht5
