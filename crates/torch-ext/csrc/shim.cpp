// What tch does not bind, over the same libtorch that tch links.
// Every entry point catches C++ exceptions and returns them as a malloc'd message (NULL on success):
// an exception must never unwind into Rust.
#include <ATen/ATen.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <cstring>
#include <vector>

extern "C" char *fab_oom_message();

namespace {
// A malloc'd copy of `what`. If malloc fails, the static message of `fab_oom_message` (never
// NULL, which callers read as success; the Rust side knows not to free it).
char *dup_message(const char *what) {
  size_t n = std::strlen(what);
  char *out = static_cast<char *>(std::malloc(n + 1));
  if (!out) return fab_oom_message();
  std::memcpy(out, what, n + 1);
  return out;
}

std::vector<at::Tensor> gather(at::Tensor **xs, int n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (int i = 0; i < n; ++i) out.push_back(*xs[i]);  // shallow: shares storage, in-place ops land
  return out;
}
}  // namespace

extern "C" {

// The one error message that is not malloc'd: what an entry point returns when it cannot
// allocate its message. Rust compares the pointer and does not free it.
char *fab_oom_message() {
  static char message[] = "out of memory (while reporting a libtorch error)";
  return message;
}

// One call of ATen's fused AdamW kernel (`torch.optim.AdamW(fused=True)`) over a parameter group.
// `steps` are float32 scalar tensors on the parameters' device, already incremented for this step.
char *fab_fused_adamw(at::Tensor **params, at::Tensor **grads, at::Tensor **exp_avgs,
                      at::Tensor **exp_avg_sqs, at::Tensor **steps, int n, double lr, double beta1,
                      double beta2, double weight_decay, double eps) {
  try {
    auto p = gather(params, n), g = gather(grads, n), m = gather(exp_avgs, n),
         v = gather(exp_avg_sqs, n), s = gather(steps, n);
    std::vector<at::Tensor> max_v;  // amsgrad off
    at::_fused_adamw_(p, g, m, v, max_v, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, /*grad_scale=*/std::nullopt,
                      /*found_inf=*/std::nullopt);
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// `torch._foreach_norm(xs)` (L2): one launch for the whole list on CUDA where the per-tensor path
// launches one per tensor; the CPU runs the per-tensor norms. `out` receives `n` new tensors
// (heap `at::Tensor`s, as tch's own tensors are), which the caller owns.
char *fab_foreach_norm(at::Tensor **xs, int n, at::Tensor **out) {
  try {
    auto norms = at::_foreach_norm(gather(xs, n), 2);
    for (int i = 0; i < n; ++i) out[i] = new at::Tensor(std::move(norms[i]));
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// `torch._foreach_mul_(xs, scalar)`, the scalar a 0-dim tensor (a clip coefficient left on the
// device: no host sync).
char *fab_foreach_mul_tensor_(at::Tensor **xs, int n, at::Tensor *scalar) {
  try {
    at::_foreach_mul_(gather(xs, n), *scalar);
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// `torch._foreach_add_(xs, value)`.
char *fab_foreach_add_scalar_(at::Tensor **xs, int n, double value) {
  try {
    at::_foreach_add_(gather(xs, n), value);
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// `torch._foreach_zero_(xs)`.
char *fab_foreach_zero_(at::Tensor **xs, int n) {
  try {
    at::_foreach_zero_(gather(xs, n));
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// Peak bytes allocated by libtorch's caching allocator on CUDA device `device` since the start
// (what `torch.cuda.max_memory_allocated` reports). -1 where no CUDA allocator is registered.
int64_t fab_cuda_peak_allocated_bytes(int device) {
  try {
    auto *alloc = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    if (!alloc || !alloc->initialized()) return -1;
    auto stats = alloc->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    return stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)].peak;
  } catch (...) {
    return -1;
  }
}

// `src.pin_memory().to(cuda:device, non_blocking=True)`: a host tensor copied to the GPU without
// waiting. A copy from pageable memory first waits for every kernel already queued on the stream
// (CUDA's documented behaviour for pageable host-to-device copies); from pinned memory it is queued
// like a kernel. libtorch's caching host allocator records an event on the copy's stream and does
// not reuse the pinned block before it, so the staging copy may be dropped at once.
char *fab_to_cuda_pinned(at::Tensor *src, int device, at::Tensor **out) {
  try {
    if (!src || !src->defined()) return dup_message("to_cuda_pinned: undefined tensor");
    if (!src->is_cpu()) return dup_message("to_cuda_pinned: the source must be a CPU tensor");
    auto pinned = src->is_pinned() ? *src : src->pin_memory();
    auto dev = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device));
    *out = new at::Tensor(pinned.to(dev, /*non_blocking=*/true));
    return nullptr;
  } catch (const c10::Error &e) {
    return dup_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// Whether float32 matmuls on CUDA run on TF32 tensor cores (`torch.backends.cuda.matmul.
// fp32_precision = "tf32"`, formerly `allow_tf32 = True`) or in IEEE float32. The flag is the one
// cuBLAS and cuBLASLt read; it changes nothing on the CPU.
char *fab_set_cuda_matmul_tf32(int on) {
  try {
    at::globalContext().setFloat32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL,
                                            on ? at::Float32Precision::TF32 : at::Float32Precision::IEEE);
    return nullptr;
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// 1 when float32 matmuls on CUDA run in TF32, 0 when not, -1 where the flag cannot be read.
int fab_cuda_matmul_tf32() {
  try {
    return at::globalContext().float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL) ==
                   at::Float32Precision::TF32
               ? 1
               : 0;
  } catch (...) {
    return -1;
  }
}

}  // extern "C"
