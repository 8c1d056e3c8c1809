//! A small real file system for storage-fault tests: a `tmpfs` mounted on a temporary
//! directory, which can be filled up or remounted read-only.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cluster::run;
use crate::error::{HarnessError, Result};

/// A `tmpfs` of a fixed size, unmounted (and its directory removed) on drop.
///
/// Mounting needs root (CAP_SYS_ADMIN), as the CI machine runs the suite; elsewhere
/// [`SmallFs::mount`] fails with an error that says so, it never skips.
#[derive(Debug)]
pub struct SmallFs {
    dir: tempfile::TempDir,
    filler: PathBuf,
}

impl SmallFs {
    /// Mount a `tmpfs` of `bytes` on a fresh temporary directory.
    pub fn mount(bytes: u64) -> Result<Self> {
        let dir =
            tempfile::tempdir().map_err(|source| HarnessError::Io { what: "creating a mount point".into(), source })?;
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"]).arg(dir.path());
        run(&mut cmd).map_err(|e| {
            HarnessError::InvalidParameter(format!(
                "cannot mount a tmpfs for the storage-fault tests (run the suite as root, as CI does): {e}"
            ))
        })?;
        let filler = dir.path().join(".filler");
        Ok(Self { dir, filler })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Take every free byte with a filler file, so that the next write fails with ENOSPC.
    pub fn fill(&self) -> Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&self.filler)
            .map_err(|source| HarnessError::Io { what: "creating the filler file".into(), source })?;
        let block = vec![0u8; 64 * 1024];
        loop {
            match file.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC: full
                Err(source) => return Err(HarnessError::Io { what: "filling the file system".into(), source }),
            }
        }
        // Smaller writes take the last partial block.
        for size in [4096usize, 512, 1] {
            while file.write(&block[..size]).is_ok_and(|n| n > 0) {}
        }
        Ok(())
    }

    /// Remove the filler: the space is free again.
    pub fn free(&self) -> Result<()> {
        std::fs::remove_file(&self.filler)
            .map_err(|source| HarnessError::Io { what: "removing the filler file".into(), source })
    }

    /// Remount read-only (`true`) or read-write (`false`).
    pub fn set_read_only(&self, read_only: bool) -> Result<()> {
        let mode = if read_only { "remount,ro" } else { "remount,rw" };
        let mut cmd = Command::new("mount");
        cmd.args(["-o", mode]).arg(self.dir.path());
        run(&mut cmd)
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}
