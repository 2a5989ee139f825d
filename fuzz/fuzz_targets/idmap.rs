//! cargo-fuzz: id-map parsing never panics, and what parses renders back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(extents) = subid_core::parse_map(&text) {
        let rendered = subid_core::render_map(&extents);
        assert_eq!(subid_core::parse_map(&rendered).ok(), Some(extents.clone()));
        if let Ok(allowed) = subid_core::IdRange::new(1, u32::MAX) {
            let _ = subid_core::validate_extents(&extents, allowed);
        }
    }
});
