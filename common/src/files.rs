//! Files the product writes whose contents may be secret (private keys, model weights).

use std::io::Write as _;
use std::path::Path;

/// Writes `bytes` to `path` (created or truncated, then synced). A `secret` file is
/// readable and writable by its owner only on Unix (mode 0600, and an existing file's
/// mode is narrowed too); another file is created 0644.
pub(crate) fn write_file(path: &Path, bytes: &[u8], secret: bool) -> std::io::Result<()> {
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(if secret { 0o600 } else { 0o644 });
    }
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = secret;
    f.write_all(bytes)?;
    f.sync_all()
}
