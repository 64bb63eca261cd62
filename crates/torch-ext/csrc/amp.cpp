// Mixed precision and CPU memory accounting, which tch does not bind.
//
// Autocast: tch's `autocast` switches CUDA autocast on with libtorch's default CUDA dtype, which is
// float16 (PyTorch's `torch.autocast("cuda")` default), not bfloat16, and cannot switch on CPU
// autocast at all. These entry points set the device type's autocast dtype explicitly.
//
// Counting CPU allocator: libtorch keeps no statistics for CPU tensors (there is no CPU
// `max_memory_allocated`). Once installed, this allocator hands out blocks of libtorch's own
// `alloc_cpu` and counts the bytes of every block it handed out that is still alive, and the peak
// of that count, as the CUDA caching allocator's `allocated_bytes` does. Sizes are kept in a side
// table, so a block it did not hand out (allocated before installation, e.g. by oneDNN through
// `raw_allocate`, and freed after) is freed as the default allocator would and not counted.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace {

at::DeviceType device_type(int cuda) { return cuda ? at::kCUDA : at::kCPU; }

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};

void count(int64_t delta) {
  int64_t now = g_current.fetch_add(delta, std::memory_order_relaxed) + delta;
  int64_t peak = g_peak.load(std::memory_order_relaxed);
  while (now > peak && !g_peak.compare_exchange_weak(peak, now, std::memory_order_relaxed)) {
  }
}

// Block address -> size, sharded to keep allocations from different threads apart.
constexpr size_t kShards = 64;
struct Shard {
  std::mutex mu;
  std::unordered_map<void *, size_t> sizes;
};
// Never destroyed: tensors freed during static destruction still find it.
Shard *const g_shards = new Shard[kShards];
Shard &shard_of(void *p) { return g_shards[(reinterpret_cast<uintptr_t>(p) >> 6) % kShards]; }

void counted_free(void *data) {
  if (!data) return;
  Shard &s = shard_of(data);
  size_t n = 0;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    auto it = s.sizes.find(data);
    if (it != s.sizes.end()) {
      n = it->second;
      s.sizes.erase(it);
    }
  }
  if (n) count(-static_cast<int64_t>(n));
  c10::free_cpu(data);
}

struct CountingCpuAllocator final : public c10::Allocator {
  c10::DataPtr allocate(size_t n) override {
    void *data = c10::alloc_cpu(n);  // nullptr for n == 0, as the default allocator
    if (data && n) {
      Shard &s = shard_of(data);
      {
        std::lock_guard<std::mutex> lock(s.mu);
        s.sizes[data] = n;
      }
      count(static_cast<int64_t>(n));
    }
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
// Returns 1, or 0 if libtorch refused (then nothing changed).
int fab_autocast_enter(int cuda, int enabled, int *prev_enabled, int *prev_dtype) {
  try {
    auto t = device_type(cuda);
    *prev_enabled = at::autocast::is_autocast_enabled(t);
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(t));
    at::autocast::set_autocast_dtype(t, at::kBFloat16);
    at::autocast::set_autocast_enabled(t, enabled != 0);
    if (enabled) at::autocast::increment_nesting();
    return 1;
  } catch (...) {
    return 0;
  }
}

// Holds the autocast weight-cast cache across regions: while held, leaving the outermost
// autocast region keeps the bf16 copies of the weights, so the micro-batches of one step (and a
// pipeline's micro-batches in flight) share one copy of each weight instead of casting it again
// and keeping one copy per micro-batch. `fab_release_casts` frees them (before the weights change).
void fab_hold_casts() {
  try {
    at::autocast::increment_nesting();
  } catch (...) {
  }
}
void fab_release_casts() {
  try {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
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
