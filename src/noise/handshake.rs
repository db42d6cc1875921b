//! The server side of the TS2021 Noise IK handshake (controlbase `handshake.go`).

use super::{ControlKey, NoiseError};

/// Initiation: 2-byte version, type 1, 2-byte length 96, then 96 bytes of Noise message.
pub const INITIATION_LEN: usize = 101;
const MSG_TYPE_INITIATION: u8 = 1;
pub(super) const MSG_TYPE_RESPONSE: u8 = 2;
pub(super) const NOISE_PARAMS: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";

/// Result of a successful handshake.
pub struct Accepted {
    /// The 51-byte response message to send to the client.
    pub response: Vec<u8>,
    /// The client's machine public key, learned from the handshake.
    pub machine_key: [u8; 32],
    /// The client's protocol (capability) version from the initiation header.
    pub version: u16,
    /// Key for records from client to server.
    pub rx_key: [u8; 32],
    /// Key for records from server to client.
    pub tx_key: [u8; 32],
}

/// Runs the responder half of IK over one initiation message.
pub fn accept_initiation(key: &ControlKey, init: &[u8]) -> Result<Accepted, NoiseError> {
    if init.len() != INITIATION_LEN {
        return Err(NoiseError::InitiationSize(init.len()));
    }
    let version = u16::from_be_bytes([init[0], init[1]]);
    if init[2] != MSG_TYPE_INITIATION {
        return Err(NoiseError::MessageType(init[2]));
    }
    let len = u16::from_be_bytes([init[3], init[4]]);
    if len != 96 {
        return Err(NoiseError::PayloadLength(len));
    }
    let prologue = format!("Tailscale Control Protocol v{version}");
    let hs_err = |e: snow::Error| NoiseError::Handshake(e.to_string());
    let params = NOISE_PARAMS
        .parse()
        .map_err(|e: snow::Error| NoiseError::Handshake(e.to_string()))?;
    let mut hs = snow::Builder::new(params)
        .local_private_key(key.secret())
        .map_err(hs_err)?
        .prologue(prologue.as_bytes())
        .map_err(hs_err)?
        .build_responder()
        .map_err(hs_err)?;
    let mut payload = [0u8; 64];
    let n = hs.read_message(&init[5..], &mut payload).map_err(hs_err)?;
    if n != 0 {
        return Err(NoiseError::Handshake(format!(
            "initiation carried {n} payload bytes, want 0"
        )));
    }
    let machine_key: [u8; 32] = hs
        .get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or_else(|| NoiseError::Handshake("no client static key".into()))?;
    let mut msg = [0u8; 128];
    let n = hs.write_message(&[], &mut msg).map_err(hs_err)?;
    if n != 48 {
        return Err(NoiseError::Handshake(format!(
            "response is {n} bytes, want 48"
        )));
    }
    let mut response = Vec::with_capacity(51);
    response.push(MSG_TYPE_RESPONSE);
    response.extend_from_slice(&48u16.to_be_bytes());
    response.extend_from_slice(&msg[..48]);
    // Split: the initiator sends with k1, so the server receives with k1 and sends with k2.
    let (k1, k2) = hs.dangerously_get_raw_split();
    Ok(Accepted {
        response,
        machine_key,
        version,
        rx_key: k1,
        tx_key: k2,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A client-side handshake, as the Tailscale client performs it, for tests.
    pub(crate) fn client_initiation(
        server_public: &[u8; 32],
        client_secret: &[u8; 32],
        version: u16,
    ) -> (Vec<u8>, snow::HandshakeState) {
        let prologue = format!("Tailscale Control Protocol v{version}");
        let mut hs = snow::Builder::new(NOISE_PARAMS.parse().expect("params"))
            .local_private_key(client_secret)
            .expect("key")
            .remote_public_key(server_public)
            .expect("remote")
            .prologue(prologue.as_bytes())
            .expect("prologue")
            .build_initiator()
            .expect("initiator");
        let mut buf = [0u8; 128];
        let n = hs.write_message(&[], &mut buf).expect("write");
        assert_eq!(n, 96);
        let mut init = Vec::new();
        init.extend_from_slice(&version.to_be_bytes());
        init.push(1);
        init.extend_from_slice(&96u16.to_be_bytes());
        init.extend_from_slice(&buf[..n]);
        (init, hs)
    }

    #[test]
    fn handshake_roundtrip_and_keys_match() {
        let server = ControlKey::generate();
        let client = ControlKey::generate();
        let (init, mut hs) = client_initiation(server.public(), client.secret(), 142);
        let acc = accept_initiation(&server, &init).expect("accept");
        assert_eq!(acc.version, 142);
        assert_eq!(&acc.machine_key, client.public());
        assert_eq!(acc.response.len(), 51);
        let mut out = [0u8; 64];
        hs.read_message(&acc.response[3..], &mut out)
            .expect("client reads response");
        let (c1, c2) = hs.dangerously_get_raw_split();
        assert_eq!(c1, acc.rx_key);
        assert_eq!(c2, acc.tx_key);
    }

    #[test]
    fn malformed_initiations_are_refused() {
        let server = ControlKey::generate();
        assert!(matches!(
            accept_initiation(&server, &[0u8; 50]),
            Err(NoiseError::InitiationSize(50))
        ));
        let client = ControlKey::generate();
        let (mut init, _) = client_initiation(server.public(), client.secret(), 142);
        init[2] = 3;
        assert!(matches!(
            accept_initiation(&server, &init),
            Err(NoiseError::MessageType(3))
        ));
        // Addressed to another server key: decryption of the static key fails.
        let other = ControlKey::generate();
        let (init, _) = client_initiation(other.public(), client.secret(), 142);
        assert!(matches!(
            accept_initiation(&server, &init),
            Err(NoiseError::Handshake(_))
        ));
        // Flipped bit in the encrypted static key.
        let (mut init, _) = client_initiation(server.public(), client.secret(), 142);
        init[40] ^= 1;
        assert!(accept_initiation(&server, &init).is_err());
    }
}
