#include "model/params.h"

#include <regex>

#include "core/check.h"
#include "core/rng.h"

namespace switcht5 {

void split_over_model(ParamInfo& p, int dim, int parts, int index) {
  SWT_CHECK(dim >= 0 && size_t(dim) < p.shape.size(), "parameter {}: no dimension {}", p.name, dim);
  SWT_CHECK(p.shape[dim] % parts == 0, "parameter {}: dimension {} of {} does not split into {}",
            p.name, dim, p.shape[dim], parts);
  if (p.full_shape.empty()) {
    p.full_shape = p.shape;
    p.slice_start.assign(p.shape.size(), 0);
  }
  p.shape[dim] /= parts;
  p.slice_start[dim] += int64_t(index) * p.shape[dim];
  p.model_split_dim = dim;
}

int ParamStore::add(ParamInfo info) {
  SWT_CHECK(!values_.data(), "ParamStore::add after allocate ({})", info.name);
  SWT_CHECK(!index_.count(info.name), "duplicate parameter {}", info.name);
  info.numel = 1;
  for (int64_t d : info.shape) info.numel *= d;
  if (!info.full_shape.empty()) {
    SWT_CHECK(info.full_shape.size() == info.shape.size() &&
                  info.slice_start.size() == info.shape.size(),
              "parameter {}: slice rank mismatch", info.name);
    for (size_t k = 0; k < info.shape.size(); ++k)
      SWT_CHECK(info.slice_start[k] + info.shape[k] <= info.full_shape[k],
                "parameter {}: block outside the logical tensor", info.name);
  }
  index_[info.name] = static_cast<int>(infos_.size());
  infos_.push_back(std::move(info));
  return static_cast<int>(infos_.size()) - 1;
}

void ParamStore::allocate(Backend& be) {
  // Three contiguous regions (see params.h): replicated, model-split, experts; every parameter
  // 16-float aligned (64 bytes) so vectorised kernels see aligned rows. The padding stays zero.
  auto region = [](const ParamInfo& p) {
    return p.kind == ParamKind::kStacked ? 2 : (p.model_split_dim >= 0 ? 1 : 0);
  };
  total_ = 0;
  for (int pass = 0; pass < 3; ++pass) {
    if (pass == 1) model_split_begin_ = total_;
    if (pass == 2) expert_begin_ = total_;
    for (ParamInfo& p : infos_) {
      if (region(p) != pass) continue;
      p.offset = total_;
      total_ += (p.numel + 15) / 16 * 16;
    }
  }
  values_ = DeviceArray<float>(be, total_);
  grads_ = DeviceArray<float>(be, total_);
  be.fill(grads_.data(), 0.0f, total_);  // the padding between parameters stays zero from here
  be_ = &be;
  grad_pending_.assign(infos_.size(), uint8_t(0));
  grad_squared_.assign(infos_.size(), uint8_t(0));
}

void ParamStore::set_compute_dtype(Backend& be, DType dtype) {
  SWT_CHECK(values_.data() != nullptr, "ParamStore::set_compute_dtype before allocate");
  SWT_CHECK(dtype == DType::kF32 || dtype == DType::kBF16, "compute dtype {}", dtype_name(dtype));
  compute_dtype_ = dtype;
  compute_ = dtype == DType::kBF16 ? DeviceArray<uint16_t>(be, total_) : DeviceArray<uint16_t>();
  refresh_compute_copy(be);
}

void ParamStore::refresh_compute_copy(Backend& be) { refresh_compute_copy(be, 0, total_); }

void ParamStore::refresh_compute_copy(Backend& be, int64_t begin, int64_t end) {
  SWT_CHECK(0 <= begin && begin <= end && end <= total_, "compute copy range [{}, {}) of {}",
            begin, end, total_);
  if (compute_dtype_ == DType::kBF16 && end > begin)
    be.cast(compute_.data() + begin, DType::kBF16, values_.data() + begin, DType::kF32,
            end - begin);
}

const ParamInfo& ParamStore::info(const std::string& name) const {
  auto it = index_.find(name);
  SWT_CHECK(it != index_.end(), "no parameter named {}", name);
  return infos_[it->second];
}

// Name-keyed seeds: FNV-1a of the name, mixed with the run seed.
static uint64_t name_hash(const std::string& s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) h = (h ^ c) * 1099511628211ull;
  return h;
}

void ParamStore::initialize(Backend& be, uint64_t seed) {
  std::vector<float> host;
  for (const ParamInfo& p : infos_) {
    host.assign(static_cast<size_t>(p.numel), p.init_value);
    if (p.init_std > 0.0) {
      const uint64_t pseed = derive_seed(seed, name_hash(p.name));
      const std::vector<int64_t>& full = p.logical_shape();
      const size_t rank = p.shape.size();
      // Local element i (row-major over shape) -> flat index g in the logical tensor.
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < p.numel; ++i) {
        int64_t rest = i, g = 0, stride = 1;
        for (size_t k = rank; k-- > 0;) {
          const int64_t local = rest % p.shape[k];
          rest /= p.shape[k];
          g += (local + (p.slice_start.empty() ? 0 : p.slice_start[k])) * stride;
          stride *= full[k];
        }
        CounterRng rng(derive_seed(pseed, uint64_t(g)));
        host[size_t(i)] = static_cast<float>(p.init_std * rng.next_truncated_normal());
      }
    }
    be.copy_to_device(values_.data() + p.offset, host.data(), sizeof(float) * host.size());
  }
  refresh_compute_copy(be);
  zero_grads(be);
  finish_grads();  // every gradient zero in memory now
}

size_t ParamStore::index_of(const ParamInfo& p) const {
  SWT_CHECK(!infos_.empty() && &p >= infos_.data() && &p < infos_.data() + infos_.size(),
            "ParamStore: {} is not one of this store's parameters", p.name);
  return size_t(&p - infos_.data());
}

void ParamStore::zero_grads(Backend& be) {
  SWT_CHECK(&be == be_, "ParamStore::zero_grads on another backend than allocate's");
  std::fill(grad_pending_.begin(), grad_pending_.end(), uint8_t(1));
  std::fill(grad_squared_.begin(), grad_squared_.end(), uint8_t(0));
  square_acc_ = nullptr;
}

void ParamStore::square_final_writes(int64_t begin, int64_t end, double* acc) {
  SWT_CHECK(acc != nullptr && 0 <= begin && begin <= end && end <= total_,
            "ParamStore::square_final_writes: range [{}, {}) of {} floats", begin, end, total_);
  square_acc_ = acc;
  square_begin_ = begin;
  square_end_ = end;
}

size_t ParamStore::writable_index(const ParamInfo& p) const {
  const size_t i = index_of(p);
  SWT_CHECK(!grad_squared_[i],
            "ParamStore: {} gradient written after the write that made it final (its squares "
            "are already in the norm)", p.name);
  return i;
}

float* ParamStore::grad(const ParamInfo& p) {
  float* g = grads_.data() + p.offset;
  uint8_t& pending = grad_pending_[writable_index(p)];
  if (pending) {
    be_->fill(g, 0.0f, p.numel);
    pending = 0;
  }
  return g;
}

ParamStore::GradTarget ParamStore::grad_target(const ParamInfo& p, int64_t floats) {
  SWT_CHECK(floats == p.numel, "ParamStore::grad_target: a writer of {} floats for {} ({} floats)",
            floats, p.name, p.numel);
  const size_t i = writable_index(p);
  const float beta = grad_pending_[i] ? 0.0f : 1.0f;
  grad_pending_[i] = 0;
  double* squares = nullptr;
  if (square_acc_ && p.offset >= square_begin_ && p.offset + p.numel <= square_end_) {
    squares = square_acc_;
    grad_squared_[i] = 1;
  }
  return {grads_.data() + p.offset, beta, squares};
}

void ParamStore::finish_grad(const ParamInfo& p) {
  if (grad_pending_[index_of(p)]) grad(p);
}

void ParamStore::finish_grads() {
  for (const ParamInfo& p : infos_) finish_grad(p);
  square_acc_ = nullptr;  // the backward is over: a later write is no longer a final one
}

std::vector<ParamStore::HfEntry> ParamStore::hf_names() const {
  // "<prefix>.mlp.experts.<w>.weight" -> "<prefix>.mlp.experts.expert_{j}.<w>.weight"
  static const std::regex stacked(R"(^(.*\.mlp\.experts)\.(\w+)\.weight$)");
  std::vector<HfEntry> out;
  for (const ParamInfo& p : infos_) {
    std::smatch m;
    if (p.kind == ParamKind::kStacked && std::regex_match(p.name, m, stacked)) {
      const int64_t per_expert = p.numel / p.shape[0];
      const int64_t first = p.slice_start.empty() ? 0 : p.slice_start[0];
      for (int64_t j = 0; j < p.shape[0]; ++j)
        out.push_back({fmt::format("{}.expert_{}.{}.weight", m[1].str(), first + j, m[2].str()),
                       p.name, j * per_expert, {p.shape[1], p.shape[2]}});
    } else {
      out.push_back({p.name, p.name, 0, p.shape});
    }
  }
  return out;
}

}  // namespace switcht5
