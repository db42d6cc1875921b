//! The map plane: what every map stream sends its node, rendered from the applied state.
//!
//! `node` renders one node (`tailcfg.Node`, capabilities, primary routes, DNS), `peers`
//! keeps every node rendered once per change for all streams of the replica, `stream`
//! turns that into one stream's full map or delta, `filters` gives a node its packet
//! filter and SSH policy, `shared_frames` compresses messages with the runs of peers that
//! streams send alike made once, and `derp_map` builds the DERP map. The HTTP side (the
//! `/machine/map` long poll, its limits and sessions) is `control::map`; this module
//! knows nothing of it.

mod derp_map;
mod filters;
mod node;
pub mod peers;
pub mod shared_frames;
pub mod stream;

pub use derp_map::{derp_map, load_extra_regions, local_replica};
pub use filters::delegate_url;
pub use node::{node_json, primary_routes, Primaries};
pub use peers::PeerCache;
pub use stream::{Resync, StreamView};
