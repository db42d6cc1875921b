//! Address allocation from the tailnet's prefixes (by default 100.64.0.0/10 and
//! fd7a:115c:a1e0::/48).
//!
//! A node gets the lowest free offset in the IPv4 prefix and the IPv6 address with the same
//! offset, so its two addresses are easy to match up. Free addresses are found from the set
//! of live nodes, so an address is never held by two nodes and the scan is deterministic.
//! The prefixes travel in the registration command, so every replica allocates alike.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, Ipv6Addr};

use super::types::Prefixes;

/// Tailscale's own service addresses (Quad100 and its sibling) in the CGNAT range.
const RESERVED: [Ipv4Addr; 2] = [
    Ipv4Addr::new(100, 100, 100, 100),
    Ipv4Addr::new(100, 100, 100, 101),
];

/// Lowest usable address pair in `prefixes` not in `used4`/`used6`; `None` when full.
pub fn allocate(
    prefixes: &Prefixes,
    used4: &BTreeSet<Ipv4Addr>,
    used6: &BTreeSet<Ipv6Addr>,
) -> Option<(Ipv4Addr, Ipv6Addr)> {
    allocate_from(prefixes, used4, used6, 1).map(|(a, b, _)| (a, b))
}

/// [`allocate`] for a caller that knows every offset below `from` is taken, so the search
/// starts there; also returns the offset found.
pub fn allocate_from(
    prefixes: &Prefixes,
    used4: &BTreeSet<Ipv4Addr>,
    used6: &BTreeSet<Ipv6Addr>,
    from: u64,
) -> Option<(Ipv4Addr, Ipv6Addr, u64)> {
    let base4 = u32::from(prefixes.v4.network());
    let base6 = u128::from(prefixes.v6.network());
    // Offset 0 is the network address and the last IPv4 offset the broadcast address.
    let last4 = (1u64 << (32 - u32::from(prefixes.v4.prefix_len()))) - 2;
    let bits6 = 128 - u32::from(prefixes.v6.prefix_len());
    let last6 = if bits6 >= 64 {
        u64::MAX
    } else {
        (1u64 << bits6) - 1
    };
    let last = last4.min(last6);
    (from.max(1)..=last).find_map(|off| {
        let a = Ipv4Addr::from(base4.wrapping_add(u32::try_from(off).ok()?));
        let b = Ipv6Addr::from(base6.wrapping_add(u128::from(off)));
        (!RESERVED.contains(&a) && !used4.contains(&a) && !used6.contains(&b))
            .then_some((a, b, off))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lowest_free_and_reserved_skipped() {
        let p = Prefixes::default();
        let mut used = BTreeSet::new();
        let none6 = BTreeSet::new();
        let (a, b) = allocate(&p, &used, &none6).expect("free");
        assert_eq!(a, Ipv4Addr::new(100, 64, 0, 1));
        assert_eq!(b, "fd7a:115c:a1e0::1".parse::<Ipv6Addr>().expect("v6"));
        used.extend([1u8, 2, 4].map(|i| Ipv4Addr::new(100, 64, 0, i)));
        assert_eq!(
            allocate(&p, &used, &none6).expect("free").0,
            Ipv4Addr::new(100, 64, 0, 3)
        );
        let quad100 = u32::from(Ipv4Addr::new(100, 100, 100, 100));
        let used: BTreeSet<Ipv4Addr> = (u32::from(Ipv4Addr::new(100, 64, 0, 1))..quad100)
            .map(Ipv4Addr::from)
            .collect();
        assert_eq!(
            allocate(&p, &used, &none6).expect("free").0,
            Ipv4Addr::new(100, 100, 100, 102)
        );
    }

    #[test]
    fn configured_prefixes_are_honoured_and_fill_up() {
        let p = Prefixes {
            v4: "100.80.0.0/30".parse().expect("v4"),
            v6: "fd7a:115c:a1e0:ab::/64".parse().expect("v6"),
        };
        let mut used4 = BTreeSet::new();
        let mut used6 = BTreeSet::new();
        let (a, b) = allocate(&p, &used4, &used6).expect("free");
        assert_eq!(a, Ipv4Addr::new(100, 80, 0, 1));
        assert_eq!(b, "fd7a:115c:a1e0:ab::1".parse::<Ipv6Addr>().expect("v6"));
        // An IPv6 address still held (e.g. from before a prefix change) is not reused.
        used6.insert(b);
        let (a, _) = allocate(&p, &used4, &used6).expect("free");
        assert_eq!(a, Ipv4Addr::new(100, 80, 0, 2));
        used4.insert(a);
        used4.insert(Ipv4Addr::new(100, 80, 0, 1));
        // A /30 has two usable addresses.
        assert_eq!(allocate(&p, &used4, &BTreeSet::new()), None);
    }
}
