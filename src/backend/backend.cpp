#include "backend/backend.h"

#include "backend/cpu/cpu_backend.h"
#include "backend/reference/reference_backend.h"
#include "core/check.h"
#if defined(SWITCHT5_HAVE_CUDA)
#include "backend/cuda/cuda_backend.h"
#endif

namespace switcht5 {

void Backend::begin_recording() { SWT_CHECK(false, "backend '{}' cannot record work", name()); }
void Backend::end_recording() { SWT_CHECK(false, "backend '{}' cannot record work", name()); }
void Backend::replay() { SWT_CHECK(false, "backend '{}' cannot record work", name()); }

std::unique_ptr<Backend> make_backend(const std::string& name, const BackendOptions& options) {
  if (name == "reference") return std::make_unique<ReferenceBackend>();
  if (name == "cpu") return std::make_unique<CpuBackend>();
  if (name == "cuda") {
#if defined(SWITCHT5_HAVE_CUDA)
    return make_cuda_backend(options);
#else
    throw UserError(
        "train.backend 'cuda': this build has no CUDA backend (configure with -DSWITCHT5_CUDA=ON "
        "where the CUDA toolkit is installed)");
#endif
  }
  throw UserError(
      fmt::format("unknown backend '{}': expected one of 'reference', 'cpu', 'cuda'", name));
}

}  // namespace switcht5
