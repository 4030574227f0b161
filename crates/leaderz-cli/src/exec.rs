//! Whether a command can be executed, decided as `execvp` and shells decide it, so that
//! `leaderz run` refuses a command it could never start before it writes anything.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use nix::unistd::{AccessFlags, eaccess};

use crate::error::{EXIT_CANNOT_EXECUTE, EXIT_NOT_FOUND};
use crate::text::printable;

/// The search path `execvp` uses when `PATH` is unset (glibc and musl).
const DEFAULT_PATH: &str = "/bin:/usr/bin";

/// Why a command cannot be executed. The message is one line; the exit code is a shell's.
#[derive(Debug, thiserror::Error)]
pub(crate) enum NotRunnable {
    /// A path (with a `/`) that names nothing.
    #[error("cannot run `{}`: no such file", printable(.0))]
    NoSuchFile(String),
    /// A bare name found in no `PATH` directory.
    #[error("cannot run `{}`: command not found in PATH", printable(.0))]
    NotInPath(String),
    /// A directory.
    #[error("cannot run `{}`: it is a directory", printable(.0))]
    Directory(String),
    /// A file without execute permission for us (or on a `noexec` mount).
    #[error("cannot run `{}`: permission denied (the file is not executable)", printable(.0))]
    NotExecutable(String),
    /// Found in `PATH` only as something that cannot be executed.
    #[error("cannot run `{}`: found in PATH only as something not executable", printable(.0))]
    NotExecutableInPath(String),
    /// Any other reason the file cannot be examined or started.
    #[error("cannot run `{}`: {error}", printable(.program))]
    Other {
        /// The program.
        program: String,
        /// Why.
        #[source]
        error: io::Error,
    },
}

impl NotRunnable {
    /// 127 for "not found", 126 for "found but cannot be executed", as shells exit.
    pub(crate) fn exit_code(&self) -> u8 {
        match self {
            NotRunnable::NoSuchFile(_) | NotRunnable::NotInPath(_) => EXIT_NOT_FOUND,
            NotRunnable::Other { error, .. } if error.kind() == io::ErrorKind::NotFound => {
                EXIT_NOT_FOUND
            }
            _ => EXIT_CANNOT_EXECUTE,
        }
    }

    /// The error for a failed spawn of `program` (the file changed after it was checked,
    /// or the kernel refused it, e.g. a wrong architecture).
    pub(crate) fn spawn_failed(program: &OsStr, error: io::Error) -> Self {
        NotRunnable::Other {
            program: program.to_string_lossy().into_owned(),
            error,
        }
    }
}

/// Finds `program` as `execvp` would: a name with a `/` is taken as a path, any other is
/// looked up in `$PATH` (an empty entry is the current directory). Succeeds only for a
/// file this process may execute; returns the path found.
pub(crate) fn find(program: &OsStr) -> Result<PathBuf, NotRunnable> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from(DEFAULT_PATH));
    find_in(program, &path)
}

/// [`find`] with an explicit search path.
fn find_in(program: &OsStr, search: &OsStr) -> Result<PathBuf, NotRunnable> {
    let name = || program.to_string_lossy().into_owned();
    if program.is_empty() {
        return Err(NotRunnable::NotInPath(name()));
    }
    if program.as_bytes().contains(&b'/') {
        let path = PathBuf::from(program);
        return match check(&path) {
            Check::Runnable => Ok(path),
            Check::Missing => Err(NotRunnable::NoSuchFile(name())),
            Check::Directory => Err(NotRunnable::Directory(name())),
            Check::NotExecutable => Err(NotRunnable::NotExecutable(name())),
            Check::Error(error) => Err(NotRunnable::Other {
                program: name(),
                error,
            }),
        };
    }
    // execvp goes on past entries that are missing or not executable, and reports
    // "permission denied" at the end if it saw any of the latter.
    let mut denied = false;
    for dir in std::env::split_paths(search) {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".").to_path_buf()
        } else {
            dir
        };
        let candidate = dir.join(program);
        match check(&candidate) {
            Check::Runnable => return Ok(candidate),
            Check::Missing => {}
            Check::Directory | Check::NotExecutable | Check::Error(_) => denied = true,
        }
    }
    if denied {
        Err(NotRunnable::NotExecutableInPath(name()))
    } else {
        Err(NotRunnable::NotInPath(name()))
    }
}

enum Check {
    Runnable,
    Missing,
    Directory,
    NotExecutable,
    Error(io::Error),
}

/// What `execve` of `path` would make of it, short of trying.
fn check(path: &Path) -> Check {
    match std::fs::metadata(path) {
        // A missing component, or a file used as a directory: execve says ENOENT/ENOTDIR.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            Check::Missing
        }
        Err(e) => Check::Error(e),
        Ok(meta) if meta.is_dir() => Check::Directory,
        Ok(meta) if !meta.is_file() => Check::NotExecutable,
        // With the effective ids, as execve checks; also refuses files on noexec mounts.
        Ok(_) => match eaccess(path, AccessFlags::X_OK) {
            Ok(()) => Check::Runnable,
            Err(_) => Check::NotExecutable,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(path: &Path, mode: u32) {
        std::fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn paths_are_checked_as_execve_would() {
        let dir = tempfile::tempdir().unwrap();
        let ok = dir.path().join("ok");
        let plain = dir.path().join("plain");
        script(&ok, 0o755);
        script(&plain, 0o644);
        let look = |p: &Path| find_in(p.as_os_str(), OsStr::new(""));
        assert_eq!(look(&ok).unwrap(), ok);
        let code = |p: &Path| look(p).unwrap_err().exit_code();
        assert_eq!(code(&dir.path().join("missing")), 127);
        assert_eq!(code(&plain.join("below-a-file")), 127);
        assert_eq!(code(dir.path()), 126);
        // Root may execute any file with an execute bit, but not one without.
        assert_eq!(code(&plain), 126);
        assert_eq!(
            look(&dir.path().join("missing")).unwrap_err().to_string(),
            format!(
                "cannot run `{}`: no such file",
                dir.path().join("missing").display()
            )
        );
    }

    #[test]
    fn bare_names_are_looked_up_in_path_in_order() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        script(&a.path().join("tool"), 0o644);
        script(&b.path().join("tool"), 0o755);
        std::fs::create_dir(a.path().join("dir")).unwrap();
        let search = std::env::join_paths([a.path(), b.path()]).unwrap();
        // Not executable in the first directory: execvp goes on to the second.
        assert_eq!(
            find_in(OsStr::new("tool"), &search).unwrap(),
            b.path().join("tool")
        );
        let err = find_in(OsStr::new("nope"), &search).unwrap_err();
        assert_eq!(err.exit_code(), 127);
        assert_eq!(
            err.to_string(),
            "cannot run `nope`: command not found in PATH"
        );
        // Found, but only as a directory: permission denied, as execvp reports it.
        let err = find_in(OsStr::new("dir"), &search).unwrap_err();
        assert_eq!(err.exit_code(), 126);
        assert_eq!(
            find_in(OsStr::new(""), &search).unwrap_err().exit_code(),
            127
        );
        // A real one from the real PATH.
        assert!(find(OsStr::new("sh")).is_ok());
    }

    #[test]
    fn messages_escape_control_characters() {
        let err = find_in(OsStr::new("/no/such\nthing"), OsStr::new("")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "cannot run `/no/such\\nthing`: no such file"
        );
    }
}
