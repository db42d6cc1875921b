//! Harness for the STUN responder: a datagram from anyone, and the answer it gets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::derp::stun::{binding_response, parse_binding_request};

const COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];

/// Target `stun`: a UDP datagram to the STUN port. It is taken for a Binding Request only
/// when it is one (type, cookie, length, attributes, a correct FINGERPRINT), and then the
/// answer, to senders at IPv4, IPv6 and IPv4-mapped addresses, is a Binding Success for
/// the same transaction whose XOR-MAPPED-ADDRESS decodes (as RFC 5389 says, written here
/// from the RFC) to the sender, with a correct FINGERPRINT; it is no request itself (two
/// responders cannot bounce it between them) and at most 52 bytes, so the port amplifies
/// a spoofed request by less than three.
pub fn stun(data: &[u8]) {
    let Some(txid) = parse_binding_request(data) else {
        return;
    };
    assert!(data.len() >= 20 && data.len() & 3 == 0);
    assert_eq!(data[..2], [0, 1], "not a Binding Request");
    assert_eq!(data[4..8], COOKIE);
    assert_eq!(txid[..], data[8..20]);
    assert_eq!(
        usize::from(u16::from_be_bytes([data[2], data[3]])),
        data.len() - 20
    );
    let mut v6 = [0u8; 16];
    v6.copy_from_slice(&data[4..20]);
    let port = u16::from_be_bytes([data[2], data[3]]) ^ u16::from(data[19]);
    for from in [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, data[8])), port),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(v6)), port),
        SocketAddr::new(
            IpAddr::V6(Ipv4Addr::new(203, 0, 113, data[9]).to_ipv6_mapped()),
            port,
        ),
    ] {
        let resp = binding_response(&txid, from);
        assert!(resp.len() <= 52, "{} bytes of answer", resp.len());
        assert_eq!(
            parse_binding_request(&resp),
            None,
            "the answer is a request"
        );
        assert_eq!(
            mapped_address(&resp, &txid),
            SocketAddr::new(from.ip().to_canonical(), from.port())
        );
    }
}

/// The XOR-MAPPED-ADDRESS of a Binding Success for `txid`, its framing and FINGERPRINT
/// checked on the way.
fn mapped_address(resp: &[u8], txid: &[u8; 12]) -> SocketAddr {
    assert_eq!(resp[..2], [0x01, 0x01]);
    assert_eq!(
        usize::from(u16::from_be_bytes([resp[2], resp[3]])),
        resp.len() - 20
    );
    assert_eq!(resp[4..8], COOKIE);
    assert_eq!(&resp[8..20], txid);
    let mut at = 20;
    let mut mapped = None;
    let mut fingerprint = false;
    while at < resp.len() {
        let typ = u16::from_be_bytes([resp[at], resp[at + 1]]);
        let len = usize::from(u16::from_be_bytes([resp[at + 2], resp[at + 3]]));
        let v = &resp[at + 4..at + 4 + len];
        match typ {
            0x0020 => {
                let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
                let pad: Vec<u8> = COOKIE.iter().chain(txid).copied().collect();
                let raw: Vec<u8> = v[4..].iter().zip(&pad).map(|(a, b)| a ^ b).collect();
                let ip = match (v[1], raw.len()) {
                    (1, 4) => IpAddr::from(<[u8; 4]>::try_from(&raw[..]).expect("4")),
                    (2, 16) => IpAddr::from(<[u8; 16]>::try_from(&raw[..]).expect("16")),
                    f => panic!("address family {f:?}"),
                };
                mapped = Some(SocketAddr::new(ip, port));
            }
            0x8028 => {
                assert_eq!(at + 8, resp.len(), "FINGERPRINT is not last");
                let want = crc32(&resp[..at]) ^ 0x5354_554e;
                assert_eq!(u32::from_be_bytes([v[0], v[1], v[2], v[3]]), want);
                fingerprint = true;
            }
            t => panic!("attribute {t:#06x} in the answer"),
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    assert!(fingerprint, "no FINGERPRINT");
    mapped.expect("no XOR-MAPPED-ADDRESS")
}

/// CRC-32 (IEEE 802.3), the reflected form STUN's FINGERPRINT uses.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;
    use hydrascale_raft::fuzzing::stand_in;

    /// Stand-in for `cargo fuzz run stun`.
    #[test]
    fn stun_stand_in() {
        stand_in("stun", 100_000, stun);
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }
}
