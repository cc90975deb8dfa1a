#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qpipe_fuzz::targets::saved_model(data));
