// Mixed precision and CPU memory accounting, which tch does not bind.
//
// Autocast: tch's `autocast` switches CUDA autocast on with libtorch's default CUDA dtype, which is
// float16 (PyTorch's `torch.autocast("cuda")` default), not bfloat16, and cannot switch on CPU
// autocast at all. These entry points set the device type's autocast dtype explicitly.
//
// Counting CPU allocator: libtorch keeps no statistics for CPU tensors (there is no CPU
// `max_memory_allocated`). Once installed, this allocator wraps libtorch's default CPU allocator
// and counts the bytes of every CPU tensor allocated afterwards that is still alive, and the peak
// of that count, as the CUDA caching allocator's `allocated_bytes` does. Each block carries its
// size in a 64-byte header (keeping libtorch's 64-byte alignment), so `raw_allocate` and
// `raw_deleter` work as they do on the default allocator.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/alignment.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>

namespace {

at::DeviceType device_type(int cuda) { return cuda ? at::kCUDA : at::kCPU; }

constexpr size_t kHeader = c10::gAlignment;  // 64: the data stays 64-byte aligned
static_assert(kHeader >= sizeof(size_t), "header holds the size");

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

void count(int64_t delta) {
  int64_t now = g_current.fetch_add(delta, std::memory_order_relaxed) + delta;
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

void counted_free(void *data) {
  if (!data) return;
  char *base = static_cast<char *>(data) - kHeader;
  size_t n = 0;
  std::memcpy(&n, base, sizeof(n));
  count(-static_cast<int64_t>(n));
  c10::free_cpu(base);
}

struct CountingCpuAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    // alloc_cpu(0) returns nullptr, and libtorch hands out empty storages that way too.
    if (n == 0) return {nullptr, nullptr, &counted_free, at::Device(at::kCPU)};
    char *base = static_cast<char *>(c10::alloc_cpu(n + kHeader));
    std::memcpy(base, &n, sizeof(n));
    count(static_cast<int64_t>(n));
    void *data = base + kHeader;
    return {data, data, &counted_free, at::Device(at::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &counted_free; }
  void copy_data(void *dest, const void *src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

std::once_flag g_installed;

}  // namespace

extern "C" {

// Switches autocast for CPU (`cuda` = 0) or CUDA (`cuda` = 1) on or off with bfloat16 as its
// dtype, and enters one autocast nesting level when switching on. Writes the previous enabled
// flag and dtype to `prev_enabled` and `prev_dtype` for `fab_autocast_exit`.
// These setters only store thread-local flags; the try blocks keep any C++ exception out of Rust.
void fab_autocast_enter(int cuda, int enabled, int *prev_enabled, int *prev_dtype) {
  try {
    auto t = device_type(cuda);
    *prev_enabled = at::autocast::is_autocast_enabled(t);
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(t));
    at::autocast::set_autocast_enabled(t, enabled != 0);
    at::autocast::set_autocast_dtype(t, at::kBFloat16);
    if (enabled) at::autocast::increment_nesting();
  } catch (...) {
  }
}

// Leaves what `fab_autocast_enter` entered: restores the previous flag and dtype and, when the
// outermost level is left, frees the cached low-precision weight copies.
void fab_autocast_exit(int cuda, int entered, int prev_enabled, int prev_dtype) {
  try {
    auto t = device_type(cuda);
    if (entered && at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    at::autocast::set_autocast_enabled(t, prev_enabled != 0);
    at::autocast::set_autocast_dtype(t, static_cast<at::ScalarType>(prev_dtype));
  } catch (...) {
  }
}

// Whether autocast is on for the device type, and its dtype (an at::ScalarType code).
int fab_autocast_state(int cuda, int *dtype) {
  try {
    auto t = device_type(cuda);
    *dtype = static_cast<int>(at::autocast::get_autocast_dtype(t));
    return at::autocast::is_autocast_enabled(t);
  } catch (...) {
    return -1;
  }
}

// Installs the counting CPU allocator (once per process; later calls do nothing).
void fab_count_cpu_allocations() {
  std::call_once(g_installed, [] {
    static CountingCpuAllocator alloc;
    // Above the default allocator's priority (0), so libtorch keeps it.
    c10::SetCPUAllocator(&alloc, /*priority=*/10);
  });
}

// Bytes of CPU tensors allocated since the allocator was installed and still alive.
int64_t fab_cpu_allocated_bytes() { return g_current.load(std::memory_order_relaxed); }

// The peak of `fab_cpu_allocated_bytes` since installation or the last reset.
int64_t fab_cpu_peak_allocated_bytes() { return g_peak.load(std::memory_order_relaxed); }

// Sets the peak to the bytes allocated now (`torch.cuda.reset_peak_memory_stats`).
void fab_cpu_reset_peak() { g_peak.store(g_current.load(std::memory_order_relaxed), std::memory_order_relaxed); }

}  // extern "C"
