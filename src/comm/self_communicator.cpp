// The one-process communicator: every collective over a single rank is the identity or a copy.
#include <algorithm>
#include <memory>

#include "comm/communicator.h"
#include "core/check.h"

namespace switcht5 {
namespace {

class SelfCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }

  void all_reduce_sum(float*, int64_t) override {}
  void all_reduce_sum(double*, int64_t) override {}
  void all_reduce_sum(int64_t*, int64_t) override {}
  void all_reduce_max(int64_t*, int64_t) override {}

  void reduce_scatter_sum(float* out, const float* in, int64_t n) override { copy(out, in, n); }
  void all_gather(float* out, const float* in, int64_t n) override { copy(out, in, n); }
  void all_to_all(float* out, const float* in, int64_t n) override { copy(out, in, n); }

  void broadcast(float*, int64_t, int root) override { check_root(root); }
  void broadcast(std::string&, int root) override { check_root(root); }
  void barrier() override {}

  std::unique_ptr<Communicator> split(int color, int) const override {
    SWT_CHECK(color >= 0, "split: color must be >= 0, got {}", color);
    return std::make_unique<SelfCommunicator>();
  }

 private:
  static void copy(float* out, const float* in, int64_t n) {
    SWT_CHECK(n >= 0, "negative count {}", n);
    if (out != in) std::copy_n(in, n, out);
  }
  static void check_root(int root) {
    SWT_CHECK(root == 0, "broadcast root {} is not a rank of a 1-process communicator", root);
  }
};

}  // namespace

std::unique_ptr<Communicator> make_self_communicator() {
  return std::make_unique<SelfCommunicator>();
}

}  // namespace switcht5
