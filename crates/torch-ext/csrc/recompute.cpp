// Activation recompute (PyTorch's reentrant `torch.utils.checkpoint`) as a C++ autograd Function
// whose forward calls back into Rust. Forward runs the Rust closure without recording a graph and
// keeps only its inputs; backward runs the closure again with grad enabled, under the RNG state
// and autocast settings the forward saw (so dropout draws the same masks and the same ops run in
// the same dtypes), then runs a nested backward from the recomputed outputs, which accumulates
// into the parameters' `.grad` (firing their grad-ready hooks as usual) and returns the inputs'
// gradients to the outer pass.
//
// Like shim.cpp, every entry point catches C++ exceptions and returns a malloc'd message (NULL on
// success): an exception must never unwind into Rust.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/ivalue.h>
#include <torch/csrc/autograd/autograd.h>
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

// Rust callback: runs the closure on `n_in` inputs (ownership of each `new at::Tensor` passes to
// Rust), writes up to `cap` outputs (each a `new at::Tensor` whose ownership passes to C++) and
// their count; returns NULL or a malloc'd message (a panic caught on the Rust side).
typedef char *(*fab_recompute_fn)(void *ctx, at::Tensor **inputs, size_t n_in, at::Tensor **outputs, size_t cap, size_t *n_out);
typedef void (*fab_drop_fn)(void *ctx);

constexpr size_t kMaxOutputs = 16;

// Owns the Rust closure; dropped (exactly once) with the last reference: the graph node's saved
// data after backward, or the caller's handle if the graph is never used.
struct RustFn final : torch::CustomClassHolder {
  RustFn(fab_recompute_fn fn, void *ctx, fab_drop_fn drop) : fn_(fn), ctx_(ctx), drop_(drop) {}
  ~RustFn() override { drop_(ctx_); }
  RustFn(const RustFn &) = delete;
  RustFn &operator=(const RustFn &) = delete;

  std::vector<at::Tensor> call(const std::vector<at::Tensor> &ins) {
    std::vector<at::Tensor *> raw;
    raw.reserve(ins.size());
    for (const auto &t : ins) raw.push_back(new at::Tensor(t));
    at::Tensor *outs[kMaxOutputs] = {nullptr};
    size_t n_out = 0;
    char *err = fn_(ctx_, raw.data(), raw.size(), outs, kMaxOutputs, &n_out);
    std::vector<at::Tensor> result;
    for (size_t i = 0; i < n_out && i < kMaxOutputs; ++i) {
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

 private:
  fab_recompute_fn fn_;
  void *ctx_;
  fab_drop_fn drop_;
};

// The RNG streams dropout may draw from: the CPU generator, and the CUDA generator of the inputs'
// device when they are on one.
std::vector<at::Generator> generators(const std::vector<at::Tensor> &inputs) {
  std::vector<at::Generator> gens{at::globalContext().defaultGenerator(at::kCPU)};
  for (const auto &t : inputs) {
    if (t.defined() && t.is_cuda()) {
      gens.push_back(at::globalContext().defaultGenerator(t.device()));
      break;
    }
  }
  return gens;
}

struct AutocastState {
  bool cpu, cuda;
  at::ScalarType cpu_dtype, cuda_dtype;
  static AutocastState now() {
    return {at::autocast::is_autocast_enabled(at::kCPU), at::autocast::is_autocast_enabled(at::kCUDA),
            at::autocast::get_autocast_dtype(at::kCPU), at::autocast::get_autocast_dtype(at::kCUDA)};
  }
  void apply() const {
    at::autocast::set_autocast_enabled(at::kCPU, cpu);
    at::autocast::set_autocast_enabled(at::kCUDA, cuda);
    at::autocast::set_autocast_dtype(at::kCPU, cpu_dtype);
    at::autocast::set_autocast_dtype(at::kCUDA, cuda_dtype);
  }
};

struct Recompute : public torch::autograd::Function<Recompute> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext *ctx, at::TensorList inputs,
                                                c10::intrusive_ptr<RustFn> fn) {
    std::vector<at::Tensor> ins(inputs.begin(), inputs.end());
    std::vector<at::Tensor> states;
    for (auto &g : generators(ins)) states.push_back(g.get_state());
    auto ac = AutocastState::now();
    ctx->save_for_backward(ins);
    ctx->saved_data["fn"] = c10::IValue::make_capsule(fn);
    ctx->saved_data["rng"] = c10::IValue(states);
    ctx->saved_data["ac"] = c10::IValue(std::vector<int64_t>{ac.cpu, ac.cuda, static_cast<int64_t>(ac.cpu_dtype),
                                                             static_cast<int64_t>(ac.cuda_dtype)});
    // Function::forward runs with grad mode off: no graph is recorded, nothing but the inputs is kept.
    return fn->call(ins);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                 torch::autograd::variable_list grad_outputs) {
    auto saved = ctx->get_saved_variables();
    auto fn = c10::static_intrusive_pointer_cast<RustFn>(ctx->saved_data["fn"].toCapsule());
    auto states = ctx->saved_data["rng"].toTensorVector();
    auto acv = ctx->saved_data["ac"].toIntVector();
    std::vector<at::Tensor> detached;
    for (size_t i = 0; i < saved.size(); ++i) {
      auto d = saved[i].detach();
      d.requires_grad_(ctx->needs_input_grad(i) && d.is_floating_point());
      detached.push_back(d);
    }
    // Recompute under the forward's RNG state and autocast settings; restore both afterwards.
    auto gens = generators(detached);
    std::vector<at::Tensor> now;
    for (auto &g : gens) now.push_back(g.get_state());
    auto ac_now = AutocastState::now();
    AutocastState ac_then{acv[0] != 0, acv[1] != 0, static_cast<at::ScalarType>(acv[2]), static_cast<at::ScalarType>(acv[3])};
    std::vector<at::Tensor> outs;
    {
      for (size_t i = 0; i < gens.size() && i < states.size(); ++i) gens[i].set_state(states[i]);
      ac_then.apply();
      at::autocast::increment_nesting();
      try {
        at::AutoGradMode grad(true);
        outs = fn->call(detached);
      } catch (...) {
        if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
        ac_now.apply();
        for (size_t i = 0; i < gens.size(); ++i) gens[i].set_state(now[i]);
        throw;
      }
      // Casts cached during the recompute must not outlive it: the weights change at the next step.
      if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
      ac_now.apply();
      for (size_t i = 0; i < gens.size(); ++i) gens[i].set_state(now[i]);
    }
    std::vector<at::Tensor> roots, grads;
    for (size_t i = 0; i < outs.size() && i < grad_outputs.size(); ++i) {
      if (outs[i].defined() && outs[i].requires_grad() && grad_outputs[i].defined()) {
        roots.push_back(outs[i]);
        grads.push_back(grad_outputs[i]);
      }
    }
    if (!roots.empty()) torch::autograd::backward(roots, grads);
    torch::autograd::variable_list result;
    for (auto &d : detached) result.push_back(d.requires_grad() ? d.grad() : at::Tensor());
    result.emplace_back();  // the closure argument
    return result;
  }
};

}  // namespace

extern "C" {

// Runs `fn` on `inputs` as one recomputed region. Takes ownership of `ctx` in every case. On
// success writes up to `cap` outputs (`new at::Tensor`, owned by the caller) and their count.
char *fab_recompute(at::Tensor **inputs, size_t n_in, fab_recompute_fn fn, void *ctx, fab_drop_fn drop, at::Tensor **outputs,
                    size_t cap, size_t *n_out) {
  *n_out = 0;
  c10::intrusive_ptr<RustFn> holder;
  try {
    holder = c10::make_intrusive<RustFn>(fn, ctx, drop);
  } catch (...) {
    drop(ctx);
    return dup_msg("out of memory creating a recompute region");
  }
  try {
    std::vector<at::Tensor> ins;
    for (size_t i = 0; i < n_in; ++i) {
      if (!inputs[i] || !inputs[i]->defined()) return dup_msg("recompute: undefined input tensor");
      ins.push_back(*inputs[i]);
    }
    auto outs = Recompute::apply(at::TensorList(ins), holder);
    if (outs.size() > cap) return dup_msg("recompute: the region returned more outputs than the caller accepts");
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
