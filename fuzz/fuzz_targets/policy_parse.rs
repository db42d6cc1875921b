//! Any text given to the policy parser yields a policy or an error with a place, never a
//! panic, and a parsed policy answers every question asked of it without panicking.
#![no_main]

use hydrascale_policy::{parse, Principal};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text) {
        Ok(p) => {
            let who = [
                Principal {
                    user: Some("alice".into()),
                    ..Default::default()
                },
                Principal {
                    tags: vec!["tag:web".into()],
                    ips: vec!["100.64.0.1".parse().expect("ip")],
                    ..Default::default()
                },
            ];
            for a in &who {
                for b in &who {
                    let _ = p.allows(a, b, 22, &[]);
                    let _ = p.connected(a, b);
                }
                let _ = p.attrs_for(a);
                let _ = p.may_own_tag(a, "tag:web");
            }
        }
        Err(e) => assert!(e.pos.line >= 1 && e.pos.col >= 1, "{e}"),
    }
});
