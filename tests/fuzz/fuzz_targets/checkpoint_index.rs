#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qpipe_fuzz::targets::checkpoint_index(data));
