//! The `hydrascale` binary: everything lives in the library so tests can start real servers in-process.

fn main() -> anyhow::Result<()> {
    hydrascale::cli::main_entry()
}
