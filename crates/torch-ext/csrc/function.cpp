// A custom autograd Function (PyTorch's `torch.autograd.Function`) whose forward and backward are
// Rust code: the tensor-parallel region operators (Megatron's copy/reduce/gather/scatter and the
// vocabulary-parallel cross-entropy) are built on it, calling the communicator from Rust.
//
// Forward runs the Rust object's `forward` with grad mode off (nothing inside it is recorded) and
// keeps the object; backward calls its `backward` with the outputs' gradients (undefined ones are
// materialised as zeros, PyTorch's default) and returns one gradient per input (undefined for an
// input that needs none). What forward must remember for backward, the Rust object keeps.
//
// Like shim.cpp, every entry point catches C++ exceptions and returns a malloc'd message (NULL on
// success): an exception must never unwind into Rust.
#include <ATen/ATen.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

extern "C" char *fab_oom_message();  // shim.cpp

namespace {

char *dup_msg(const std::string &what) {
  char *out = static_cast<char *>(std::malloc(what.size() + 1));
  if (!out) return fab_oom_message();
  std::memcpy(out, what.c_str(), what.size() + 1);
  return out;
}

// Rust callback (one for forward, one for backward): reads `n_in` tensors (ownership of each
// `new at::Tensor` passes to Rust), writes up to `cap` tensors (each a `new at::Tensor`, or NULL
// for "none", whose ownership passes to C++) and their count; returns NULL or a malloc'd message.
typedef char *(*fab_fn_call)(void *ctx, at::Tensor **inputs, size_t n_in, at::Tensor **outputs, size_t cap, size_t *n_out);
typedef void (*fab_fn_drop)(void *ctx);

constexpr size_t kMaxTensors = 16;

struct RustFunction final : torch::CustomClassHolder {
  RustFunction(fab_fn_call fwd, fab_fn_call bwd, void *ctx, fab_fn_drop drop) : fwd_(fwd), bwd_(bwd), ctx_(ctx), drop_(drop) {}
  ~RustFunction() override { drop_(ctx_); }
  RustFunction(const RustFunction &) = delete;
  RustFunction &operator=(const RustFunction &) = delete;

  std::vector<at::Tensor> forward(const std::vector<at::Tensor> &ins) { return call(fwd_, ins); }
  std::vector<at::Tensor> backward(const std::vector<at::Tensor> &ins) { return call(bwd_, ins); }

 private:
  std::vector<at::Tensor> call(fab_fn_call fn, const std::vector<at::Tensor> &ins) {
    std::vector<at::Tensor *> raw;
    raw.reserve(ins.size());
    for (const auto &t : ins) raw.push_back(new at::Tensor(t));
    at::Tensor *outs[kMaxTensors] = {nullptr};
    size_t n_out = 0;
    char *err = fn(ctx_, raw.data(), raw.size(), outs, kMaxTensors, &n_out);
    std::vector<at::Tensor> result;
    for (size_t i = 0; i < n_out && i < kMaxTensors; ++i) {
      if (outs[i]) {
        result.push_back(*outs[i]);
        delete outs[i];
      } else {
        result.emplace_back();
      }
    }
    if (err) {
      std::string msg(err);
      std::free(err);
      throw std::runtime_error(msg);
    }
    return result;
  }

  fab_fn_call fwd_, bwd_;
  void *ctx_;
  fab_fn_drop drop_;
};

struct Function : public torch::autograd::Function<Function> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext *ctx, at::TensorList inputs,
                                                c10::intrusive_ptr<RustFunction> fn) {
    std::vector<at::Tensor> ins(inputs.begin(), inputs.end());
    ctx->saved_data["fn"] = c10::IValue::make_capsule(fn);
    ctx->saved_data["n_in"] = static_cast<int64_t>(ins.size());
    auto outs = fn->forward(ins);
    // A non-differentiable output (an integer tensor) must be marked so.
    std::vector<at::Tensor> nondiff;
    for (auto &o : outs) {
      if (o.defined() && !o.is_floating_point()) nondiff.push_back(o);
    }
    if (!nondiff.empty()) ctx->mark_non_differentiable(nondiff);
    return outs;
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto fn = c10::static_intrusive_pointer_cast<RustFunction>(ctx->saved_data["fn"].toCapsule());
    auto n_in = static_cast<size_t>(ctx->saved_data["n_in"].toInt());
    std::vector<at::Tensor> grads;
    {
      // The Rust backward runs tensor ops on gradients: nothing it does is recorded.
      at::AutoGradMode no_grad(false);
      grads = fn->backward(std::vector<at::Tensor>(grad_outputs.begin(), grad_outputs.end()));
    }
    if (grads.size() > n_in) throw std::runtime_error("custom function: backward returned more gradients than the function has inputs");
    torch::autograd::variable_list result(grads.begin(), grads.end());
    while (result.size() < n_in) result.emplace_back();
    result.emplace_back();  // the function object argument
    return result;
  }
};

}  // namespace

extern "C" {

// Applies the Rust function `ctx` to `inputs` as one autograd node. Takes ownership of `ctx` in
// every case. On success writes up to `cap` outputs (`new at::Tensor`, owned by the caller).
char *fab_function_apply(at::Tensor **inputs, size_t n_in, fab_fn_call fwd, fab_fn_call bwd, void *ctx, fab_fn_drop drop,
                         at::Tensor **outputs, size_t cap, size_t *n_out) {
  *n_out = 0;
  c10::intrusive_ptr<RustFunction> holder;
  try {
    holder = c10::make_intrusive<RustFunction>(fwd, bwd, ctx, drop);
  } catch (...) {
    drop(ctx);
    return dup_msg("out of memory creating a custom autograd function");
  }
  try {
    std::vector<at::Tensor> ins;
    for (size_t i = 0; i < n_in; ++i) {
      if (!inputs[i] || !inputs[i]->defined()) return dup_msg("custom function: undefined input tensor");
      ins.push_back(*inputs[i]);
    }
    auto outs = Function::apply(at::TensorList(ins), holder);
    if (outs.size() > cap) return dup_msg("custom function: forward returned more outputs than the caller accepts");
    for (size_t i = 0; i < outs.size(); ++i) outputs[i] = new at::Tensor(outs[i]);
    *n_out = outs.size();
    return nullptr;
  } catch (const c10::Error &e) {
    return dup_msg(e.what_without_backtrace());
  } catch (const std::exception &e) {
    return dup_msg(e.what());
  }
}

}  // extern "C"
