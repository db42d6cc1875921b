//! The tailnet policy: parsed and checked by the `hydrascale-policy` crate (re-exported
//! here), compiled into each node's map by [`compile`].

pub mod compile;

pub use hydrascale_policy::*;
