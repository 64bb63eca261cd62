//! Custom autograd functions in Rust: gradients equal libtorch's own for the same computation,
//! identity outputs and integer outputs work, and a failing backward fails `f_backward`.

use std::sync::Mutex;

use fabbrica_torch_ext::function::{apply, Function};
use tch::{Kind, Tensor};

/// y = k·x², keeping x for backward.
struct ScaledSquare {
    k: f64,
    saved: Mutex<Option<Tensor>>,
}

impl Function for ScaledSquare {
    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        *self.saved.lock().unwrap() = Some(inputs[0].shallow_clone());
        Ok(vec![inputs[0].square() * self.k])
    }
    fn backward(&self, grads: &[Tensor]) -> Result<Vec<Tensor>, String> {
        let x = self.saved.lock().unwrap().take().ok_or("backward ran twice")?;
        Ok(vec![&grads[0] * &x * (2.0 * self.k)])
    }
}

#[test]
fn gradients_flow_through_a_rust_backward() {
    let x = Tensor::from_slice(&[1.0f32, -2.0, 3.5]).set_requires_grad(true);
    let w = Tensor::from_slice(&[0.5f32, 1.5, -1.0]);
    let y = apply(&[&x], ScaledSquare { k: 3.0, saved: Mutex::new(None) }).unwrap().remove(0);
    assert!(y.requires_grad());
    (&y * &w).sum(Kind::Float).backward();
    let expect = x.detach() * 6.0 * &w;
    assert!(x.grad().allclose(&expect, 1e-6, 1e-6, false), "{:?} vs {:?}", x.grad(), expect);
    // The forward's values are libtorch's own.
    assert!(y.detach().allclose(&(x.detach().square() * 3.0), 0.0, 0.0, false));
}

/// Identity forward, doubling backward (Megatron's `copy_to` region with a world of 2 whose peer
/// holds the same gradient), and a second, integer output.
struct IdentityDoubling;

impl Function for IdentityDoubling {
    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![inputs[0].shallow_clone(), inputs[1].argmax(0, false)])
    }
    fn backward(&self, grads: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![&grads[0] * 2.0, Tensor::new()])
    }
}

#[test]
fn an_input_returned_unchanged_and_an_integer_output_are_allowed() {
    let x = Tensor::from_slice(&[1.0f32, 2.0]).set_requires_grad(true);
    let other = Tensor::from_slice(&[3.0f32, 1.0]).set_requires_grad(true);
    let outs = apply(&[&x, &other], IdentityDoubling).unwrap();
    assert_eq!(outs.len(), 2);
    assert_eq!(outs[1].kind(), Kind::Int64);
    assert!(!outs[1].requires_grad());
    outs[0].sum(Kind::Float).backward();
    assert_eq!(Vec::<f32>::try_from(x.grad()).unwrap(), vec![2.0, 2.0]);
    assert!(!other.grad().defined(), "no gradient was returned for the second input");
}

struct FailingBackward;

impl Function for FailingBackward {
    fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Ok(vec![&inputs[0] * 1.0])
    }
    fn backward(&self, _grads: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Err("all-reduce over tp0 failed: peer gone".into())
    }
}

struct FailingForward;

impl Function for FailingForward {
    fn forward(&self, _inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
        Err("forward refused".into())
    }
    fn backward(&self, _grads: &[Tensor]) -> Result<Vec<Tensor>, String> {
        unreachable!()
    }
}

#[test]
fn failures_are_errors_with_their_message() {
    let x = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
    let y = apply(&[&x], FailingBackward).unwrap().remove(0);
    let err = y.sum(Kind::Float).f_backward().unwrap_err().to_string();
    assert!(err.contains("all-reduce over tp0 failed: peer gone"), "{err}");
    let err = apply(&[&x], FailingForward).unwrap_err();
    assert!(err.contains("forward refused"), "{err}");
}

#[test]
fn the_function_object_is_dropped_once_the_graph_is_gone() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
    struct Holder(#[allow(dead_code)] Counted);
    impl Function for Holder {
        fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, String> {
            Ok(vec![&inputs[0] * 2.0])
        }
        fn backward(&self, grads: &[Tensor]) -> Result<Vec<Tensor>, String> {
            Ok(vec![&grads[0] * 2.0])
        }
    }
    let drops = Arc::new(AtomicUsize::new(0));
    {
        let x = Tensor::from_slice(&[1.0f32]).set_requires_grad(true);
        let y = apply(&[&x], Holder(Counted(drops.clone()))).unwrap().remove(0);
        assert_eq!(drops.load(Ordering::SeqCst), 0);
        drop(y);
    }
    assert_eq!(drops.load(Ordering::SeqCst), 1);
}
