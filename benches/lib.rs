//! Criterion benchmarks of Tern's hot paths live beside this file (`cargo bench -p benches`);
//! the crate itself has no code.
