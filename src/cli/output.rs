//! Output shared by the admin commands: times as the CLI prints them, the JSON-or-table
//! switch of `-o`, and the owner-only atomic file writes backups go through.

use std::path::PathBuf;

use anyhow::Result;

pub(super) fn fmt_ms(ms: Option<i64>) -> String {
    ms.map(crate::tailcfg::rfc3339)
        .unwrap_or_else(|| "-".into())
}

/// Prints `v` as JSON for `-o json`, or runs `human` for the table/sentence form.
pub(super) fn emit<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce()) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        human();
    }
    Ok(())
}

/// Writes `bytes` to `path` readable by its owner only, via a temporary file and a
/// rename so a crash never leaves half a backup under the final name.
pub(super) fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}
