//! Fuzzes event decoding and `Engine::apply` with a realistic config: every input is a stream
//! of `\n`-separated messages; the invariants are in `harness.rs`.

#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    harness::run(data);
});
