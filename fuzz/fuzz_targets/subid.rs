//! cargo-fuzz: the /etc/subuid parser never panics and its entries render back to themselves.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (entries, _) = subid_core::parse_subid(&text);
    for entry in entries {
        let range = entry.range().expect("parsed entries have a valid range");
        let line = subid_core::render_subid_line(&entry.owner, range);
        let (again, bad) = subid_core::parse_subid(&line);
        assert!(bad.is_empty() && again.len() == 1 && again[0].owner == entry.owner);
    }
});
