//! Grad-ready hooks and `.grad` as a bucket view, on CPU with a small MLP of raw leaf tensors.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use fabbrica_torch_ext::hooks::{register_grad_ready_hook, set_grad, GradReadyHook, HookError};
use tch::{Device, Kind, Tensor};

/// Three linear layers, used in this order in forward: parameters [w0, b0, w1, b1, w2, b2]
/// (registration order = forward order, as in our GPT). Layer k is parameters 2k and 2k + 1.
fn mlp_params() -> Vec<Tensor> {
    let shapes: [&[i64]; 6] = [&[5, 3], &[5], &[4, 5], &[4], &[2, 4], &[2]];
    shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu)).set_requires_grad(true)).collect()
}

fn input() -> Tensor {
    Tensor::randn([6, 3], (Kind::Float, Device::Cpu))
}

/// x (6, 3) -> (6, 5) -> (6, 4) -> (6, 2) -> scalar.
fn loss(p: &[Tensor], x: &Tensor) -> Tensor {
    let h = x.linear(&p[0], Some(&p[1])).tanh();
    let h = h.linear(&p[2], Some(&p[3])).tanh();
    h.linear(&p[4], Some(&p[5])).pow_tensor_scalar(2).sum(Kind::Float)
}

/// Independent copies of the parameters (same values, own autograd state).
fn copies(p: &[Tensor]) -> Vec<Tensor> {
    p.iter().map(|t| t.detach().copy().set_requires_grad(true)).collect()
}

/// Gradients of a hook-free copy of the model: the reference.
fn reference_grads(p: &[Tensor], x: &Tensor) -> Vec<Vec<f32>> {
    let q = copies(p);
    loss(&q, x).backward();
    q.iter().map(|t| values(&t.grad())).collect()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.detach().contiguous().view(-1)).unwrap()
}

/// What a callback saw: which parameter, on which thread, and its `.grad` at that moment.
#[derive(Clone, Debug)]
struct Event {
    index: usize,
    thread: ThreadId,
    grad: Vec<f32>,
    grad_ptr: usize,
}

type Log = Arc<Mutex<Vec<Event>>>;

/// Registers a hook on every parameter that logs an [`Event`].
fn hook_all(params: &[Tensor], log: &Log) -> Vec<GradReadyHook> {
    params
        .iter()
        .enumerate()
        .map(|(i, p)| {
            // tch::Tensor is Send but not Sync: a Mutex makes the closure Sync.
            let param = Mutex::new(p.shallow_clone());
            let log = log.clone();
            register_grad_ready_hook(p, i, move |index| {
                let g = param.lock().unwrap().grad();
                let e = Event {
                    index,
                    thread: std::thread::current().id(),
                    grad: if g.defined() { values(&g) } else { vec![] },
                    grad_ptr: if g.defined() { g.data_ptr() as usize } else { 0 },
                };
                log.lock().unwrap().push(e);
            })
            .unwrap()
        })
        .collect()
}

fn indices(log: &Log) -> Vec<usize> {
    log.lock().unwrap().iter().map(|e| e.index).collect()
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "{what}[{i}]: {x} vs {y}");
    }
}

#[test]
fn fires_once_per_parameter_with_the_final_grad_last_layer_first_on_the_caller_thread() {
    let p = mlp_params();
    let x = input();
    let expected = reference_grads(&p, &x);
    let log: Log = Arc::default();
    let _hooks = hook_all(&p, &log);

    loss(&p, &x).backward();

    let events = log.lock().unwrap().clone();
    let mut order: Vec<usize> = events.iter().map(|e| e.index).collect();
    // Layer 2 (used last in forward) fires before layer 1, which fires before layer 0. Within a
    // layer, weight and bias become ready together; their relative order is not specified.
    let layer = |i: usize| i / 2;
    assert!(order.windows(2).all(|w| layer(w[0]) >= layer(w[1])), "order {order:?}");
    order.sort();
    assert_eq!(order, vec![0, 1, 2, 3, 4, 5], "exactly once each");
    for e in &events {
        // The callback already sees this pass's gradient in `.grad`, equal to the final one.
        assert_close(&e.grad, &expected[e.index], &format!("grad seen by hook {}", e.index));
        assert_close(&values(&p[e.index].grad()), &e.grad, "final grad");
        // CPU backward runs on the thread that called it.
        assert_eq!(e.thread, std::thread::current().id());
    }
}

#[test]
fn fires_again_on_each_backward_and_sees_the_accumulated_grad() {
    let p = mlp_params();
    let x = input();
    let once = reference_grads(&p, &x);
    let log: Log = Arc::default();
    let _hooks = hook_all(&p, &log);

    // Two micro-steps without zeroing: the graph of the first is freed before the second forward,
    // so the hooks survive only because the handles keep the grad accumulators alive.
    for _ in 0..2 {
        loss(&p, &x).backward();
    }
    let events = log.lock().unwrap().clone();
    assert_eq!(events.len(), 12);
    let mut per_param: HashMap<usize, Vec<Event>> = HashMap::new();
    for e in events {
        per_param.entry(e.index).or_default().push(e);
    }
    for (i, evs) in per_param {
        assert_eq!(evs.len(), 2, "parameter {i}");
        assert_close(&evs[0].grad, &once[i], "first pass");
        let twice: Vec<f32> = once[i].iter().map(|g| 2.0 * g).collect();
        assert_close(&evs[1].grad, &twice, "second pass sees the sum");
    }
}

#[test]
fn dropping_the_handle_stops_callbacks_and_drops_the_closure() {
    let p = mlp_params();
    let x = input();
    let log: Log = Arc::default();
    let mut hooks = hook_all(&p, &log);
    let token = Arc::new(());
    let counter = Arc::new(Mutex::new(0usize));
    let (t, c) = (token.clone(), counter.clone());
    let extra = register_grad_ready_hook(&p[0], 100, move |_| {
        let _keep = &t;
        *c.lock().unwrap() += 1;
    })
    .unwrap();
    assert_eq!(extra.index(), 100);
    assert_eq!(Arc::strong_count(&token), 2, "the hook owns the closure");

    loss(&p, &x).backward();
    assert_eq!(*counter.lock().unwrap(), 1, "two hooks on one parameter both fire");
    drop(extra);
    assert_eq!(Arc::strong_count(&token), 1, "removing the hook dropped the closure");

    // Remove the hooks of layer 2 (indices 4 and 5) only.
    hooks.truncate(4);
    log.lock().unwrap().clear();
    loss(&p, &x).backward();
    let mut fired = indices(&log);
    fired.sort();
    assert_eq!(fired, vec![0, 1, 2, 3]);
    assert_eq!(*counter.lock().unwrap(), 1);

    drop(hooks);
    log.lock().unwrap().clear();
    loss(&p, &x).backward();
    assert!(indices(&log).is_empty());
}

#[test]
fn unused_parameters_do_not_fire() {
    // DDP's `find_unused_parameters` exists because of this: a parameter the loss does not depend
    // on has no accumulator in the graph, so its hook never fires and its bucket never completes.
    let mut p = mlp_params();
    p.push(Tensor::randn([7], (Kind::Float, Device::Cpu)).set_requires_grad(true)); // index 6
    let log: Log = Arc::default();
    let _hooks = hook_all(&p, &log);
    loss(&p, &input()).backward();
    let mut fired = indices(&log);
    fired.sort();
    assert_eq!(fired, vec![0, 1, 2, 3, 4, 5]);
    assert!(!p[6].grad().defined());
}

#[test]
fn a_parameter_used_twice_fires_once_with_the_sum() {
    // Like the tied embedding: w is used at the start and at the end of forward. Its accumulator
    // runs once, after both contributions are summed, so it fires after the parameters used in
    // between.
    let w = Tensor::randn([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let m = Tensor::randn([3, 3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let x = input();
    let f = |w: &Tensor, m: &Tensor| x.matmul(w).tanh().matmul(m).tanh().matmul(&w.tr()).sum(Kind::Float);
    let (wr, mr) = (w.detach().copy().set_requires_grad(true), m.detach().copy().set_requires_grad(true));
    f(&wr, &mr).backward();

    let log: Log = Arc::default();
    let params = [w.shallow_clone(), m.shallow_clone()];
    let _hooks = hook_all(&params, &log);
    f(&w, &m).backward();
    assert_eq!(indices(&log), vec![1, 0]);
    assert_close(&log.lock().unwrap()[1].grad, &values(&wr.grad()), "summed grad of w");
}

#[test]
fn explicit_input_gradients_do_not_fire() {
    // `run_backward` with inputs is torch.autograd.grad: it returns gradients, accumulates nothing.
    let p = mlp_params();
    let log: Log = Arc::default();
    let _hooks = hook_all(&p, &log);
    let g = Tensor::run_backward(&[loss(&p, &input())], &p, false, false);
    assert_eq!(g.len(), 6);
    assert!(indices(&log).is_empty());
    assert!(!p[0].grad().defined());
}

#[test]
fn a_panicking_callback_fails_backward_instead_of_unwinding_into_cpp() {
    let p = mlp_params();
    let x = input();
    let h = register_grad_ready_hook(&p[3], 3, |i| panic!("boom in hook {i}")).unwrap();
    let err = loss(&p, &x).f_backward().unwrap_err().to_string();
    assert!(err.contains("grad-ready hook for parameter 3 panicked: boom in hook 3"), "{err}");
    drop(h);
    // The process and the engine are fine afterwards.
    for t in &p {
        t.shallow_clone().zero_grad();
    }
    loss(&p, &x).backward();
    assert_close(&values(&p[0].grad()), &reference_grads(&p, &x)[0], "after the failure");
}

#[test]
fn registration_errors_say_what_is_wrong() {
    let leaf = Tensor::randn([3], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let non_leaf = &leaf * 2.0;
    match register_grad_ready_hook(&non_leaf, 7, |_| {}) {
        Err(HookError::Register { index: 7, message }) => assert!(message.contains("not a leaf"), "{message}"),
        other => panic!("{other:?}"),
    }
    let frozen = Tensor::randn([3], (Kind::Float, Device::Cpu));
    let e = register_grad_ready_hook(&frozen, 1, |_| {}).unwrap_err();
    assert!(e.to_string().contains("does not require grad"), "{e}");

    let e = set_grad(&leaf, Some(&Tensor::zeros([4], (Kind::Float, Device::Cpu)))).unwrap_err();
    assert_eq!(e.to_string(), "set_grad: gradient has sizes [4] but the parameter has [3]");
    let e = set_grad(&leaf, Some(&Tensor::zeros([3], (Kind::Double, Device::Cpu)))).unwrap_err();
    assert!(e.to_string().contains("dtype"), "{e}");
}

/// Storage for the gradients of all `params`, packed in reverse order (as buckets are), and each
/// parameter's `.grad` set to its view. Returns (bucket, element offset of each parameter).
fn bucketize(params: &[Tensor]) -> (Tensor, Vec<usize>) {
    let total: i64 = params.iter().map(|t| t.numel() as i64).sum();
    let bucket = Tensor::zeros([total], (Kind::Float, Device::Cpu));
    let mut offsets = vec![0; params.len()];
    let mut off = 0usize;
    for (i, p) in params.iter().enumerate().rev() {
        offsets[i] = off;
        let view = bucket.narrow(0, off as i64, p.numel() as i64).view(p.size().as_slice());
        set_grad(p, Some(&view)).unwrap();
        off += p.numel();
    }
    (bucket, offsets)
}

/// The reference gradients laid out as `bucketize` lays them out.
fn packed(grads: &[Vec<f32>], offsets: &[usize], scale: f32) -> Vec<f32> {
    let mut out = vec![0.0; grads.iter().map(|g| g.len()).sum()];
    for (g, &o) in grads.iter().zip(offsets) {
        for (k, v) in g.iter().enumerate() {
            out[o + k] = scale * v;
        }
    }
    out
}

#[test]
fn grad_as_bucket_view_accumulates_in_place() {
    let p = mlp_params();
    let x = input();
    let expected = reference_grads(&p, &x);
    let (bucket, offsets) = bucketize(&p);
    let base = bucket.data_ptr() as usize;
    let log: Log = Arc::default();
    let _hooks = hook_all(&p, &log);

    loss(&p, &x).backward();
    // `.grad` is still the view (autograd added into it; it did not replace the tensor)...
    for (i, t) in p.iter().enumerate() {
        assert_eq!(t.grad().data_ptr() as usize, base + 4 * offsets[i], "parameter {i}");
    }
    // ...so the bucket holds every gradient, and each hook saw its gradient already there.
    assert_close(&values(&bucket), &packed(&expected, &offsets, 1.0), "bucket after one pass");
    for e in log.lock().unwrap().iter() {
        assert_eq!(e.grad_ptr, base + 4 * offsets[e.index]);
    }

    // Accumulation across micro-steps stays in the bucket.
    loss(&p, &x).backward();
    assert_close(&values(&bucket), &packed(&expected, &offsets, 2.0), "bucket after two passes");

    // tch's zero_grad zeroes in place (detach_ + zero_) and keeps the view.
    for t in &p {
        t.shallow_clone().zero_grad();
    }
    assert!(values(&bucket).iter().all(|&v| v == 0.0));
    loss(&p, &x).backward();
    assert_close(&values(&bucket), &packed(&expected, &offsets, 1.0), "bucket after zero_grad");
    for (i, t) in p.iter().enumerate() {
        assert_eq!(t.grad().data_ptr() as usize, base + 4 * offsets[i]);
    }
}

#[test]
fn an_undefined_grad_breaks_the_bucket_link() {
    // After `.grad = None` AccumulateGrad stores a fresh tensor: the bucket is no longer written.
    // (create_graph would break it too, `grad + new` out of place, but tch's `backward` never sets
    // it and `run_backward` with create_graph requires explicit inputs, which do not accumulate.)
    let p = mlp_params();
    let x = input();
    let expected = reference_grads(&p, &x);
    let (bucket, _) = bucketize(&p);
    for t in &p {
        set_grad(t, None).unwrap();
        assert!(!t.grad().defined());
    }
    loss(&p, &x).backward();
    assert!(values(&bucket).iter().all(|&v| v == 0.0));
    let (base, end) = (bucket.data_ptr() as usize, bucket.data_ptr() as usize + 4 * bucket.numel());
    for (t, g) in p.iter().zip(&expected) {
        assert!(!(base..end).contains(&(t.grad().data_ptr() as usize)));
        assert_close(&values(&t.grad()), g, "grads still correct");
    }
}

#[test]
fn cpu_callbacks_run_on_whichever_thread_calls_backward() {
    let p = mlp_params();
    let x = input();
    let log: Log = Arc::default();
    let hooks = hook_all(&p, &log);
    // Parameters, input and hook handles all move to another thread (Tensor and GradReadyHook are Send).
    let worker = std::thread::spawn(move || {
        loss(&p, &x).backward();
        drop(hooks);
        std::thread::current().id()
    });
    let worker_id = worker.join().unwrap();
    let events = log.lock().unwrap().clone();
    assert_eq!(events.len(), 6);
    assert!(events.iter().all(|e| e.thread == worker_id));
}
