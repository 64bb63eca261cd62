//! One CPU training step of the `tiny` preset (forward, backward, clip, AdamW).
//! Run: `scripts/bench.sh` or `cargo bench -p fabbrica-train --bench train_step`.

use criterion::{criterion_group, criterion_main, Criterion};
use fabbrica_train::bench::BenchState;
use fabbrica_train::Config;

fn tiny_step(c: &mut Criterion) {
    let mut cfg = Config::preset("tiny").expect("tiny preset");
    cfg.run.device = fabbrica_train::config::DeviceChoice::Cpu;
    cfg.model.set_vocab_size(128);
    let (mut st, _) = BenchState::new(&cfg, false).expect("bench state");
    c.bench_function("tiny_train_step_cpu", |b| b.iter(|| st.step().expect("a training step").double_value(&[])));
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = tiny_step
}
criterion_main!(benches);
