//! Node keys as clients send them (`nodekey:<hex>`): checked and put in the one form
//! the state stores, so the register and map handlers agree on what a key is.

use super::context::ControlError;

/// The canonical `nodekey:<lowercase hex>` of a client's key, or why it is not one.
pub fn parse_node_key(text: &str) -> Result<String, ControlError> {
    let hex_part = text.strip_prefix("nodekey:").ok_or_else(|| {
        ControlError::BadRequest(format!("node key {text:?} lacks nodekey: prefix"))
    })?;
    let bytes = hex::decode(hex_part)
        .map_err(|_| ControlError::BadRequest("node key is not hex".into()))?;
    if bytes.len() != 32 {
        return Err(ControlError::BadRequest("node key must be 32 bytes".into()));
    }
    Ok(format!("nodekey:{}", hex::encode(bytes)))
}

/// A key the client left empty or all zero: Go's zero value, meaning "none".
pub(crate) fn is_zero_key(k: &str) -> bool {
    k.is_empty()
        || k.split_once(':')
            .is_some_and(|(_, h)| h.bytes().all(|b| b == b'0'))
}
