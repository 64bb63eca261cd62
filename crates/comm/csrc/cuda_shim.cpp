// The CUDA stream and event glue of the NCCL backend, over libtorch's device-generic c10 layer.
//
// Why not the CUDA runtime, nor the c10/cuda headers: the pip wheels ship the CUDA headers
// without crt/ (cuda_runtime_api.h includes crt/host_defines.h), so nothing that includes them
// compiles on a plain venv; and the binaries reach libcudart only through libtorch_cuda's rpath,
// so a direct reference from here would add a NEEDED entry the loader cannot resolve. Instead,
// everything goes through the CUDA DeviceGuardImpl that libc10_cuda registers with c10 when it
// is loaded (it is: libtorch_cuda needs it, and build/torch_link.rs keeps libtorch_cuda linked):
// current stream, pool stream, native handle, device exchange, and c10::Event, whose
// record/block/query dispatch to the same implementation, and recordDataPtrOnStream, which is the
// caching allocator's recordStream. This file needs only libc10 (TensorBase's storage accessors
// are inline), and only the headers in torch/include.
//
// Streams cross the boundary as c10's packed form (stream id + device index), so no C++ object
// has to live on the Rust side. Events are heap-allocated c10::Event objects (timing disabled:
// EventFlag::PYTORCH_DEFAULT is cudaEventDisableTiming).
//
// Every entry point returns NULL on success or a malloc'd message that the caller frees with
// fab_cuda_free_message: a C++ exception must never unwind into Rust. Without a registered CUDA
// implementation every call fails with c10's "PyTorch is not linked with support for cuda
// devices".

#include <ATen/core/TensorBase.h>
#include <c10/core/Device.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>

namespace {
// Returned when even the message cannot be allocated (NULL would read as success); never freed.
char kNoMemory[] = "out of host memory while reporting a CUDA error";

char *dup_message(const char *what) {
  size_t n = std::strlen(what);
  char *out = static_cast<char *>(std::malloc(n + 1));
  if (!out) return kNoMemory;
  std::memcpy(out, what, n + 1);
  return out;
}

const c10::impl::DeviceGuardImplInterface *cuda() {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

c10::Device cuda_device(int device) {
  return c10::Device(c10::DeviceType::CUDA, static_cast<c10::DeviceIndex>(device));
}

// The current stream of `device` when `current`, else the stream with packed id `stream_id`.
c10::Stream stream_of(int device, int current, int64_t stream_id) {
  if (current) return cuda()->getStream(cuda_device(device));
  return c10::Stream::unpack3(static_cast<c10::StreamId>(stream_id),
                              static_cast<c10::DeviceIndex>(device), c10::DeviceType::CUDA);
}

void export_stream(const c10::Stream &s, int64_t *id, void **raw) {
  *id = static_cast<int64_t>(s.id());
  *raw = cuda()->getStreamNativeHandle(s);
}
}  // namespace

#define FAB_TRY try {
#define FAB_CATCH                                   \
  return nullptr;                                   \
  }                                                 \
  catch (const c10::Error &e) {                     \
    return dup_message(e.what_without_backtrace()); \
  }                                                 \
  catch (const std::exception &e) {                 \
    return dup_message(e.what());                   \
  }                                                 \
  catch (...) {                                     \
    return dup_message("unknown C++ exception");    \
  }

extern "C" {

void fab_cuda_free_message(char *msg) {
  if (msg != kNoMemory) std::free(msg);
}

// Makes `device` current on this thread; `*previous` gets the device that was current.
char *fab_cuda_exchange_device(int device, int *previous) {
  FAB_TRY
  *previous = static_cast<int>(cuda()->exchangeDevice(cuda_device(device)).index());
  FAB_CATCH
}

// Puts back the device a fab_cuda_exchange_device call replaced, as c10's DeviceGuard does on
// exit: without creating a CUDA context on a device that has none yet (a thread that never chose
// a device reports device 0, which on a shared node is another rank's GPU).
char *fab_cuda_restore_device(int device) {
  FAB_TRY
  cuda()->uncheckedSetDevice(cuda_device(device));
  FAB_CATCH
}

// A stream of libtorch's pool on `device` (where ProcessGroupNCCL takes its NCCL streams from).
char *fab_cuda_pool_stream(int device, int high_priority, int64_t *id, void **raw) {
  FAB_TRY
  export_stream(cuda()->getStreamFromGlobalPool(cuda_device(device), high_priority != 0), id, raw);
  FAB_CATCH
}

char *fab_cuda_event_new(void **event) {
  FAB_TRY
  cuda();  // fails here, with c10's message, when no CUDA implementation is registered
  *event = new c10::Event(c10::DeviceType::CUDA, c10::EventFlag::PYTORCH_DEFAULT);
  FAB_CATCH
}

// Destroys the event on its own device: c10's destroyEvent switches to it and back with a plain
// SetDevice, which on a thread whose device was never chosen would set up a context on device 0.
void fab_cuda_event_free(void *event) {
  auto *ev = static_cast<c10::Event *>(event);
  const c10::DeviceIndex own = ev->device_index();  // -1: never recorded, no CUDA event exists
  c10::DeviceIndex previous = -1;
  if (own >= 0) {
    try {
      previous = cuda()->exchangeDevice(cuda_device(own)).index();
    } catch (...) {
      previous = -1;
    }
  }
  delete ev;  // ~Event is noexcept; c10 reports CUDA failures inside as warnings
  if (previous >= 0 && previous != own) {
    try {
      cuda()->uncheckedSetDevice(cuda_device(previous));
    } catch (...) {
    }
  }
}

// Records `event` on a stream of `device`: its current stream when `current`, else the stream
// with packed id `stream_id`.
char *fab_cuda_event_record(void *event, int device, int current, int64_t stream_id) {
  FAB_TRY
  static_cast<c10::Event *>(event)->record(stream_of(device, current, stream_id));
  FAB_CATCH
}

// Makes a stream (chosen as in fab_cuda_event_record) wait for the event's last record. Never
// blocks the host.
char *fab_cuda_event_block(void *event, int device, int current, int64_t stream_id) {
  FAB_TRY
  static_cast<const c10::Event *>(event)->block(stream_of(device, current, stream_id));
  FAB_CATCH
}

// `*done` = 1 when the work before the event's last record has finished (or it was never
// recorded), else 0. Callable from any thread, whatever its current device.
char *fab_cuda_event_query(void *event, int *done) {
  FAB_TRY
  *done = static_cast<const c10::Event *>(event)->query() ? 1 : 0;
  FAB_CATCH
}

// Tells libtorch's caching allocator that the tensor's memory is used by a stream of `device` (chosen
// as in fab_cuda_event_record), as Tensor.record_stream does: when the tensor is freed, its block is
// not handed out again before the work queued on that stream up to the free has finished,
// whichever stream allocated it and whichever stream frees it.
char *fab_cuda_record_stream(void *tensor, int device, int current, int64_t stream_id) {
  FAB_TRY
  const auto *t = static_cast<const at::TensorBase *>(tensor);
  cuda()->recordDataPtrOnStream(t->storage().data_ptr(), stream_of(device, current, stream_id));
  FAB_CATCH
}

}  // extern "C"
