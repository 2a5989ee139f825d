//! cargo-fuzz: lease-name and label validation never panic; accepted names are inert.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if subid_core::validate_name(&text).is_ok() {
        assert!(text.starts_with(|c: char| c.is_ascii_alphanumeric()));
        assert!(!text.contains('/') && text.len() <= subid_core::NAME_MAX);
    }
    let _ = subid_core::validate_label(&text, &text);
});
