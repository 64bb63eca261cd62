// Autograd hooks for data parallelism, which tch does not bind: a "gradient ready" callback on a
// parameter, and setting a parameter's `.grad` to a view of bucket storage. This is what PyTorch
// DDP's C++ reducer does (torch/csrc/distributed/c10d/reducer.cpp): it takes each parameter's grad
// accumulator node (`impl::grad_accumulator`), keeps it alive, and adds a post hook to it.
//
// Why a post hook on the AccumulateGrad node rather than `impl::post_acc_grad_hooks`: the latter is
// one slot per tensor (Python's `register_post_accumulate_grad_hook` keeps its dict there), while a
// node holds any number of post hooks, each removable by the key `add_post_hook` returns.
//
// Like shim.cpp, every entry point catches C++ exceptions and returns a malloc'd message (NULL on
// success): an exception must never unwind into Rust.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/variable.h>

#include <cstdlib>
#include <cstring>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>

namespace {
using torch::autograd::Node;
using torch::autograd::variable_list;

extern "C" char *fab_oom_message();  // shim.cpp

char *dup_message(const std::string &what) {
  char *out = static_cast<char *>(std::malloc(what.size() + 1));
  if (!out) return fab_oom_message();  // never NULL: that reads as success
  std::memcpy(out, what.c_str(), what.size() + 1);
  return out;
}

// Rust callback: runs the user's closure for parameter `index`; returns NULL, or a malloc'd
// message if the closure panicked (the panic is caught on the Rust side).
typedef char *(*fab_grad_ready_fn)(void *ctx, size_t index);
// Rust destructor of `ctx`; never unwinds.
typedef void (*fab_drop_fn)(void *ctx);

// Owns `ctx` from construction on: whoever destroys the hook (del_post_hook, or the node's own
// destruction) drops the Rust closure, exactly once.
struct GradReadyHook final : torch::autograd::FunctionPostHook {
  GradReadyHook(fab_grad_ready_fn fn, void *ctx, fab_drop_fn drop, size_t index)
      : fn_(fn), ctx_(ctx), drop_(drop), index_(index) {}
  ~GradReadyHook() override { drop_(ctx_); }
  GradReadyHook(const GradReadyHook &) = delete;
  GradReadyHook &operator=(const GradReadyHook &) = delete;

  // Called by the autograd engine right after AccumulateGrad::apply, i.e. once `.grad` holds this
  // backward pass's gradient; on the thread that runs the node (see src/hooks.rs).
  variable_list operator()(const variable_list &outputs, const variable_list & /*inputs*/) override {
    char *err = fn_(ctx_, index_);
    if (err) {
      std::string msg(err);
      std::free(err);
      // The engine stores the exception in the graph task and rethrows it from backward().
      throw std::runtime_error(msg);
    }
    return outputs;  // AccumulateGrad has no outputs; returning them unchanged is the contract
  }

 private:
  fab_grad_ready_fn fn_;
  void *ctx_;
  fab_drop_fn drop_;
  size_t index_;
};

std::string sizes_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}
}  // namespace

// A registered hook: the accumulator is kept alive here because the parameter holds only a
// weak_ptr to it; were it freed after a backward pass, the next forward would create a fresh
// accumulator without the hook.
struct fab_grad_hook {
  std::shared_ptr<Node> accumulator;
  uintptr_t key;
};

extern "C" {

// Adds a post hook to the grad accumulator of leaf `param`. Takes ownership of `ctx` in every case:
// on failure `drop(ctx)` has run before this returns. On success `*out` is a handle to pass to
// fab_remove_grad_ready_hook exactly once.
char *fab_register_grad_ready_hook(at::Tensor *param, size_t index, fab_grad_ready_fn fn, void *ctx,
                                   fab_drop_fn drop, fab_grad_hook **out) {
  *out = nullptr;
  // First thing, so that every exit below drops ctx exactly once (here or with the node).
  std::unique_ptr<GradReadyHook> hook;
  try {
    hook = std::make_unique<GradReadyHook>(fn, ctx, drop, index);
  } catch (...) {
    drop(ctx);
    return dup_message("out of memory creating a grad-ready hook");
  }
  try {
    const at::Tensor &p = *param;
    if (!p.defined()) return dup_message("the tensor is undefined");
    if (!p.requires_grad())
      return dup_message("the tensor does not require grad: only trainable parameters get gradients");
    if (!p.is_leaf())
      return dup_message("the tensor is not a leaf (it has a grad_fn): hooks go on parameters, "
                         "not on results of operations");
    std::shared_ptr<Node> acc = torch::autograd::impl::grad_accumulator(p);
    if (!acc) return dup_message("libtorch returned no grad accumulator for this tensor");
    // If add_post_hook throws, `hook` still owns ctx (vector growth allocates before it moves).
    uintptr_t key = acc->add_post_hook(std::move(hook));
    try {
      *out = new fab_grad_hook{acc, key};
    } catch (...) {
      acc->del_post_hook(key);
      throw;
    }
    return nullptr;
  } catch (const c10::Error &e) {
    return dup_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// Removes the hook (dropping its Rust closure) and releases the accumulator. Must not run while a
// backward pass that reaches this parameter is in flight (the node's hook list is not locked).
void fab_remove_grad_ready_hook(fab_grad_hook *h) {
  if (!h) return;
  try {
    h->accumulator->del_post_hook(h->key);
  } catch (...) {
    // del_post_hook only erases from a vector; nothing to report.
  }
  delete h;
}

// Sets `param.grad` to a tensor sharing `grad`'s storage (NULL: sets it to undefined, like
// `param.grad = None`). Checks what Python's `.grad` setter checks: same sizes, dtype and device.
// The stored tensor is `grad.detach()`: same storage, offset and strides, but not an autograd view,
// so that in-place `detach_()` (tch's `zero_grad`) is allowed on it; PyTorch's own zero_grad avoids
// `detach_()` on DDP bucket views for the same reason ("Can't detach views in-place").
char *fab_set_grad(at::Tensor *param, at::Tensor *grad) {
  try {
    const at::Tensor &p = *param;
    if (!p.defined()) return dup_message("the parameter is undefined");
    if (!grad) {
      p.mutable_grad().reset();
      return nullptr;
    }
    const at::Tensor &g = *grad;
    if (!g.defined()) return dup_message("the gradient tensor is undefined");
    if (!g.sizes().equals(p.sizes()))
      return dup_message("gradient has sizes " + sizes_str(g.sizes()) + " but the parameter has " +
                         sizes_str(p.sizes()));
    if (g.scalar_type() != p.scalar_type())
      return dup_message(std::string("gradient has dtype ") + c10::toString(g.scalar_type()) +
                         " but the parameter has " + c10::toString(p.scalar_type()));
    if (g.device() != p.device())
      return dup_message("gradient is on " + g.device().str() + " but the parameter is on " +
                         p.device().str());
    if (g.layout() != at::kStrided) return dup_message("gradient must be a dense (strided) tensor");
    p.mutable_grad() = g.detach();
    return nullptr;
  } catch (const c10::Error &e) {
    return dup_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

// `torch.autograd.backward([out], [grad])`: backward from `out` seeded with `grad` (a pipeline
// stage's output and the gradient its next stage sent back), accumulating into the leaves' `.grad`
// and firing their grad-ready hooks as `loss.backward()` does.
char *fab_backward_with_grad(at::Tensor *out, at::Tensor *grad) {
  try {
    if (!out || !grad || !out->defined() || !grad->defined()) return dup_message("backward_with_grad: undefined tensor");
    torch::autograd::backward({*out}, {*grad});
    return nullptr;
  } catch (const c10::Error &e) {
    return dup_message(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return dup_message(e.what());
  }
}

}  // extern "C"
