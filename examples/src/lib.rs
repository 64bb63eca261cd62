//! Runnable examples: see `examples/` (`cargo run --release -p fabbrica-examples --example NAME`).
