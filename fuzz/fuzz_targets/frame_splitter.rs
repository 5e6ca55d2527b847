#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| pooler::fuzzing::frame_splitter(data));
