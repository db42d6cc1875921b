//! STUN responder (RFC 5389) for netcheck: answers Binding Requests with the
//! source address as XOR-MAPPED-ADDRESS and drops everything else silently,
//! so the port cannot be used to reflect arbitrary traffic.

use std::net::{IpAddr, SocketAddr};

use tokio::net::UdpSocket;
use tokio::sync::watch;

const HEADER_LEN: usize = 20;
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const BINDING_REQUEST: u16 = 0x0001;
const BINDING_SUCCESS: u16 = 0x0101;
const ATTR_XOR_MAPPED_ADDRESS: u16 = 0x0020;
const ATTR_FINGERPRINT: u16 = 0x8028;
const FINGERPRINT_XOR: u32 = 0x5354_554e;

/// Serves STUN on `socket` until `shutdown` becomes true or its sender is
/// dropped. Receive errors (e.g. ICMP-induced ECONNREFUSED) are not fatal.
pub async fn run_stun(socket: UdpSocket, mut shutdown: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 2048];
    loop {
        if *shutdown.borrow() {
            return;
        }
        let (n, from) = tokio::select! {
            r = socket.recv_from(&mut buf) => match r {
                Ok(v) => v,
                Err(e) => {
                    tracing::trace!(error = %e, "stun recv");
                    continue;
                }
            },
            r = shutdown.changed() => {
                if r.is_err() {
                    return;
                }
                continue;
            }
        };
        if let Some(txid) = parse_binding_request(&buf[..n]) {
            let resp = binding_response(&txid, from);
            if let Err(e) = socket.send_to(&resp, from).await {
                tracing::trace!(error = %e, %from, "stun send");
            }
        }
    }
}

/// Returns the transaction id of a well-formed Binding Request. SOFTWARE
/// and FINGERPRINT are optional, but a FINGERPRINT that is present must be
/// correct and last.
pub fn parse_binding_request(b: &[u8]) -> Option<[u8; 12]> {
    if b.len() < HEADER_LEN || b[0] & 0xc0 != 0 {
        return None;
    }
    let typ = u16::from_be_bytes([b[0], b[1]]);
    let len = u16::from_be_bytes([b[2], b[3]]) as usize;
    if typ != BINDING_REQUEST
        || b[4..8] != MAGIC_COOKIE
        || len != b.len() - HEADER_LEN
        || len & 3 != 0
    {
        return None;
    }
    let mut off = HEADER_LEN;
    while off < b.len() {
        let hdr = b.get(off..off + 4)?;
        let at = u16::from_be_bytes([hdr[0], hdr[1]]);
        let alen = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
        let val = b.get(off + 4..off + 4 + alen)?;
        let next = off + 4 + alen.div_ceil(4) * 4;
        if at == ATTR_FINGERPRINT {
            if alen != 4 || next != b.len() {
                return None;
            }
            let want = crc32(&b[..off]) ^ FINGERPRINT_XOR;
            if u32::from_be_bytes([val[0], val[1], val[2], val[3]]) != want {
                return None;
            }
        }
        off = next;
    }
    if off != b.len() {
        return None;
    }
    let mut txid = [0u8; 12];
    txid.copy_from_slice(&b[8..20]);
    Some(txid)
}

/// Binding Success with XOR-MAPPED-ADDRESS and FINGERPRINT.
pub fn binding_response(txid: &[u8; 12], from: SocketAddr) -> Vec<u8> {
    // Dual-stack sockets report IPv4 clients as ::ffff:a.b.c.d; clients
    // expect to see their IPv4 address.
    let ip = from.ip().to_canonical();
    let port = from.port() ^ 0x2112;
    let mut xaddr = Vec::with_capacity(20);
    xaddr.push(0);
    match ip {
        IpAddr::V4(v4) => {
            xaddr.push(0x01);
            xaddr.extend_from_slice(&port.to_be_bytes());
            xaddr.extend(v4.octets().iter().zip(MAGIC_COOKIE).map(|(a, c)| a ^ c));
        }
        IpAddr::V6(v6) => {
            xaddr.push(0x02);
            xaddr.extend_from_slice(&port.to_be_bytes());
            let pad = MAGIC_COOKIE.iter().chain(txid.iter());
            xaddr.extend(v6.octets().iter().zip(pad).map(|(a, c)| a ^ c));
        }
    }
    let body_len = 4 + xaddr.len() + 8;
    let mut m = Vec::with_capacity(HEADER_LEN + body_len);
    m.extend_from_slice(&BINDING_SUCCESS.to_be_bytes());
    m.extend_from_slice(&(body_len as u16).to_be_bytes());
    m.extend_from_slice(&MAGIC_COOKIE);
    m.extend_from_slice(txid);
    m.extend_from_slice(&ATTR_XOR_MAPPED_ADDRESS.to_be_bytes());
    m.extend_from_slice(&(xaddr.len() as u16).to_be_bytes());
    m.extend_from_slice(&xaddr);
    // The length field already counts the fingerprint, as RFC 5389 §15.5 requires.
    let fp = crc32(&m) ^ FINGERPRINT_XOR;
    m.extend_from_slice(&ATTR_FINGERPRINT.to_be_bytes());
    m.extend_from_slice(&4u16.to_be_bytes());
    m.extend_from_slice(&fp.to_be_bytes());
    m
}

/// CRC-32 (IEEE), bitwise: STUN messages are tiny, a table is not worth it.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request shaped like Tailscale's: SOFTWARE "tailnode" + FINGERPRINT.
    fn tailscale_request(txid: [u8; 12]) -> Vec<u8> {
        let mut m = vec![0x00, 0x01, 0x00, 0x14];
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&txid);
        m.extend_from_slice(&[0x80, 0x22, 0x00, 0x08]);
        m.extend_from_slice(b"tailnode");
        let fp = crc32(&m) ^ FINGERPRINT_XOR;
        m.extend_from_slice(&[0x80, 0x28, 0x00, 0x04]);
        m.extend_from_slice(&fp.to_be_bytes());
        m
    }

    fn parse_xor_mapped(resp: &[u8]) -> SocketAddr {
        assert_eq!(&resp[0..2], &[0x01, 0x01]);
        assert_eq!(
            u16::from_be_bytes([resp[2], resp[3]]) as usize,
            resp.len() - 20
        );
        assert_eq!(&resp[20..22], &[0x00, 0x20]);
        let alen = u16::from_be_bytes([resp[22], resp[23]]) as usize;
        let v = &resp[24..24 + alen];
        let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
        let mut pad = MAGIC_COOKIE.to_vec();
        pad.extend_from_slice(&resp[8..20]);
        let raw: Vec<u8> = v[4..].iter().zip(&pad).map(|(a, b)| a ^ b).collect();
        let ip = match v[1] {
            1 => IpAddr::from(<[u8; 4]>::try_from(&raw[..]).unwrap()),
            2 => IpAddr::from(<[u8; 16]>::try_from(&raw[..]).unwrap()),
            f => panic!("family {f}"),
        };
        SocketAddr::new(ip, port)
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn accepts_with_and_without_attributes() {
        let txid = *b"abcdefghijkl";
        assert_eq!(parse_binding_request(&tailscale_request(txid)), Some(txid));
        let mut bare = vec![0x00, 0x01, 0x00, 0x00];
        bare.extend_from_slice(&MAGIC_COOKIE);
        bare.extend_from_slice(&txid);
        assert_eq!(parse_binding_request(&bare), Some(txid));
    }

    #[test]
    fn rejects_garbage() {
        let txid = [7u8; 12];
        let good = tailscale_request(txid);
        let mut bad_fp = good.clone();
        *bad_fp.last_mut().unwrap() ^= 1;
        let mut bad_cookie = good.clone();
        bad_cookie[4] = 0;
        let mut response_type = good.clone();
        response_type[1] = 0x01;
        response_type[0] = 0x01;
        let mut bad_len = good.clone();
        bad_len[3] = 0x10;
        for m in [
            bad_fp,
            bad_cookie,
            response_type,
            bad_len,
            good[..19].to_vec(),
        ] {
            assert_eq!(parse_binding_request(&m), None);
        }
        assert_eq!(parse_binding_request(b"GET / HTTP/1.1\r\n\r\nxxxxxx"), None);
    }

    #[test]
    fn response_v4_and_v6() {
        let txid = [9u8; 12];
        for from in [
            "192.0.2.7:41641",
            "[2001:db8::42]:3478",
            "[::ffff:10.1.2.3]:5",
        ] {
            let from: SocketAddr = from.parse().unwrap();
            let resp = binding_response(&txid, from);
            let got = parse_xor_mapped(&resp);
            assert_eq!(got, SocketAddr::new(from.ip().to_canonical(), from.port()));
            assert_eq!(&resp[8..20], &txid);
            let n = resp.len();
            assert_eq!(&resp[n - 8..n - 4], &[0x80, 0x28, 0x00, 0x04]);
            let fp = u32::from_be_bytes(resp[n - 4..].try_into().unwrap());
            assert_eq!(fp, crc32(&resp[..n - 8]) ^ FINGERPRINT_XOR);
        }
    }

    #[tokio::test]
    async fn serves_over_udp_and_stops() {
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(run_stun(server, rx));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.send_to(b"junk", addr).await.unwrap();
        let txid = *b"0123456789ab";
        client
            .send_to(&tailscale_request(txid), addr)
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let (n, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.recv_from(&mut buf),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(&buf[8..20], &txid);
        assert_eq!(parse_xor_mapped(&buf[..n]), client.local_addr().unwrap());
        tx.send(true).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(5), task)
            .await
            .unwrap()
            .unwrap();
    }
}
