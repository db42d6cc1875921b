//! The control server's static Noise key (the "machine key" of the server).
//!
//! All replicas of a cluster must present the same key so a load balancer may send a
//! client anywhere; it is stored as `privkey:<hex>` in `<data_dir>/control.key`.

use std::path::Path;

use rand_core::{OsRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};

use super::NoiseError;

#[derive(Clone)]
pub struct ControlKey {
    secret: [u8; 32],
    public: [u8; 32],
}

impl std::fmt::Debug for ControlKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ControlKey({})", self.public_text())
    }
}

impl ControlKey {
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let public = PublicKey::from(&StaticSecret::from(secret)).to_bytes();
        Self { secret, public }
    }

    pub fn generate() -> Self {
        let mut s = [0u8; 32];
        OsRng.fill_bytes(&mut s);
        Self::from_secret(s)
    }

    /// Loads the key from `path`, creating it (mode 0600) if it does not exist yet.
    pub fn load_or_create(path: &Path) -> Result<Self, NoiseError> {
        let err = |message: String| NoiseError::KeyFile {
            path: path.display().to_string(),
            message,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(text.trim()).map_err(err),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = Self::generate();
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
                }
                write_private(path, &format!("{}\n", key.private_text()))
                    .map_err(|e| err(e.to_string()))?;
                Ok(key)
            }
            Err(e) => Err(err(e.to_string())),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let hex_part = text
            .strip_prefix("privkey:")
            .ok_or("expected privkey:<64 hex characters>")?;
        let bytes = hex::decode(hex_part).map_err(|e| format!("bad hex: {e}"))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|_| "expected 32 bytes (64 hex characters)".to_string())?;
        Ok(Self::from_secret(secret))
    }

    /// `privkey:<hex>`, the form `parse` reads and the key file holds.
    pub fn private_text(&self) -> String {
        format!("privkey:{}", hex::encode(self.secret))
    }

    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    /// `mkey:<hex>`, as `/key` presents it.
    pub fn public_text(&self) -> String {
        format!("mkey:{}", hex::encode(self.public))
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_persists() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("control.key");
        let a = ControlKey::load_or_create(&p).expect("create");
        let b = ControlKey::load_or_create(&p).expect("load");
        assert_eq!(a.public(), b.public());
        assert!(a.public_text().starts_with("mkey:"));
        assert!(ControlKey::parse("privkey:zz").is_err());
    }
}
