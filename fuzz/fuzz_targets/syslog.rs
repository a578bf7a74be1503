//! See `reflex::fuzzing::syslog`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| reflex::fuzzing::syslog(data));
