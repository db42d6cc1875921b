//! What a node is allowed to receive and how its SSH server decides: its packet filter
//! and SSH policy under the tailnet policy, and the `holdAndDelegate` URL of SSH check
//! rules (answered by the control plane's `ssh_check`).

use serde_json::Value;

use super::node::policy;
use super::peers::PeerCache;
use crate::config::Config;
use crate::policy::compile;
use crate::state::{Node, Tailnet};
use crate::tailcfg::PacketFilter;

/// The `holdAndDelegate` URL of check rules. The client fills in the `$` placeholders and
/// sends the request through its Noise session, so only the path matters; it must be an
/// absolute https URL all the same.
pub fn delegate_url(config: &Config) -> String {
    let url = config.server_url();
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    let authority = rest.split('/').next().unwrap_or(rest);
    format!(
        "https://{authority}/machine/ssh/action/$SRC_NODE_ID/to/$DST_NODE_ID?ssh_user=$SSH_USER&local_user=$LOCAL_USER"
    )
}

/// The packet filter and SSH policy of `me` under the current policy, from the rules'
/// sources as `cache` resolved them for `t` (call under the state guard `t` comes from).
pub(super) fn filters(
    t: &Tailnet,
    cache: &PeerCache,
    me: &Node,
    config: &Config,
) -> (PacketFilter, Option<Value>) {
    match policy(t) {
        None => (PacketFilter::allow_all(), None),
        Some(p) => {
            let mut resolved = cache.resolved();
            (
                compile::packet_filter(p, t, me, &mut resolved),
                compile::ssh_policy(p, t, me, &delegate_url(config), &mut resolved),
            )
        }
    }
}
