//! The container images, made here without a registry or a daemon.
//!
//! [`build_app_binaries`] builds `leaderz` and `leaderz-example` statically
//! (`-C target-feature=+crt-static` on `x86_64-unknown-linux-gnu`, the only target these
//! machines have), and [`OciImage`] lays files into an OCI image layout archive (index.json,
//! oci-layout, manifest, config, one uncompressed layer) that `ctr images import` takes.
//! [`app_image`] is the same layout as the Dockerfile's: the two binaries in
//! `/usr/local/bin`, a `nonroot` user 65532, `/tmp`, no shell, nothing writable needed.

use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
    process::Stdio,
};

use serde_json::json;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// The Rust target the static binaries are built for.
pub const TARGET: &str = "x86_64-unknown-linux-gnu";
/// `RUSTFLAGS` for the static binaries.
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";
/// Where the binaries go in the image (the Dockerfile uses the same).
pub const BIN_DIR: &str = "/usr/local/bin";
/// The user the app image runs as, `nonroot` (the Dockerfile uses the same).
pub const APP_USER: &str = "65532:65532";
/// The app image, as `kube/deployment.yaml`'s `leaderz:<version>` normalises.
pub const APP_IMAGE: &str = concat!("docker.io/library/leaderz:", env!("CARGO_PKG_VERSION"));
/// The pod sandbox image (containerd's `sandbox_image`).
pub const PAUSE_IMAGE: &str = concat!("localhost/leaderz-pause:", env!("CARGO_PKG_VERSION"));

/// `/etc/passwd` of the app image (the Dockerfile writes the same).
pub const PASSWD: &str = "root:x:0:0:root:/root:/sbin/nologin\n\
                          nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n";
/// `/etc/group` of the app image (the Dockerfile writes the same).
pub const GROUP: &str = "root:x:0:\nnonroot:x:65532:\n";

/// One entry of an image's single layer.
#[derive(Debug, Clone)]
pub struct LayerEntry {
    path: String,
    kind: EntryKind,
    mode: u32,
    owner: u64,
}

#[derive(Debug, Clone)]
enum EntryKind {
    Dir,
    File(Vec<u8>),
}

impl LayerEntry {
    /// A directory (absolute path in the image), owned by root.
    pub fn dir(path: &str, mode: u32) -> Self {
        Self {
            path: path.trim_matches('/').to_owned(),
            kind: EntryKind::Dir,
            mode,
            owner: 0,
        }
    }

    /// A file with `contents`, owned by root.
    pub fn file(path: &str, contents: impl Into<Vec<u8>>, mode: u32) -> Self {
        Self {
            path: path.trim_matches('/').to_owned(),
            kind: EntryKind::File(contents.into()),
            mode,
            owner: 0,
        }
    }

    /// The same entry owned by `uid` (= gid).
    #[must_use]
    pub fn owned_by(mut self, uid: u64) -> Self {
        self.owner = uid;
        self
    }
}

/// An image: one layer of files plus the runtime config.
#[derive(Debug, Clone)]
pub struct OciImage {
    /// Full reference, e.g. `docker.io/library/leaderz:0.1.0`.
    pub name: String,
    /// The layer's entries (parents are added as needed).
    pub entries: Vec<LayerEntry>,
    /// `config.User`.
    pub user: String,
    /// `config.Entrypoint`.
    pub entrypoint: Vec<String>,
}

/// What [`OciImage::write_archive`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// `sha256:<hex>` of the manifest: the image's id in containerd.
    pub manifest_digest: String,
    /// `sha256:<hex>` of the uncompressed layer (the config's `diff_ids`).
    pub layer_digest: String,
}

fn sha256(bytes: &[u8]) -> String {
    let hash = Sha256::digest(bytes);
    let mut hex = String::with_capacity(64);
    for byte in hash {
        hex.push_str(&format!("{byte:02x}"));
    }
    format!("sha256:{hex}")
}

/// A tar header for a deterministic archive: mtime 0, numeric owner, no names.
fn header(
    path: &str,
    kind: tar::EntryType,
    mode: u32,
    size: u64,
    owner: u64,
) -> Result<tar::Header> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_size(size);
    header.set_uid(owner);
    header.set_gid(owner);
    header.set_mtime(0);
    header
        .set_path(path)
        .map_err(Error::io(format!("naming `{path}` in a tar header")))?;
    header.set_cksum();
    Ok(header)
}

fn tar_error(context: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        context: format!("writing {context}"),
        source,
    }
}

impl OciImage {
    /// The uncompressed layer: entries sorted, parents first, reproducible byte for byte.
    pub fn layer(&self) -> Result<Vec<u8>> {
        let mut dirs = BTreeSet::new();
        for entry in &self.entries {
            let mut parent = Path::new(&entry.path).parent();
            while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
                dirs.insert(p.to_string_lossy().into_owned());
                parent = p.parent();
            }
        }
        let mut entries: Vec<LayerEntry> = dirs
            .into_iter()
            .filter(|d| !self.entries.iter().any(|e| &e.path == d))
            .map(|d| LayerEntry::dir(&d, 0o755))
            .chain(self.entries.iter().cloned())
            .collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let mut layer = tar::Builder::new(Vec::new());
        for entry in &entries {
            match &entry.kind {
                EntryKind::Dir => {
                    let path = format!("{}/", entry.path);
                    let h = header(&path, tar::EntryType::Directory, entry.mode, 0, entry.owner)?;
                    layer
                        .append(&h, std::io::empty())
                        .map_err(tar_error("the image layer"))?;
                }
                EntryKind::File(contents) => {
                    let size = contents.len() as u64;
                    let h = header(
                        &entry.path,
                        tar::EntryType::Regular,
                        entry.mode,
                        size,
                        entry.owner,
                    )?;
                    layer
                        .append(&h, contents.as_slice())
                        .map_err(tar_error("the image layer"))?;
                }
            }
        }
        layer.into_inner().map_err(tar_error("the image layer"))
    }

    /// Writes the OCI image layout archive to `out` (atomically: a temporary file, then a
    /// rename).
    pub fn write_archive(&self, out: &Path) -> Result<Written> {
        let layer = self.layer()?;
        let layer_digest = sha256(&layer);
        let (repository, tag) = match self.name.rsplit_once(':') {
            Some((repository, tag)) if !tag.contains('/') => (repository, tag),
            _ => (self.name.as_str(), "latest"),
        };
        let config = json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "User": self.user,
                "Entrypoint": self.entrypoint,
                "Env": ["PATH=/usr/local/bin:/usr/bin:/bin"],
                "WorkingDir": "/",
            },
            "rootfs": { "type": "layers", "diff_ids": [layer_digest] },
            "history": [{ "created_by": "leaderz-cluster image tooling" }],
        })
        .to_string()
        .into_bytes();
        let config_digest = sha256(&config);
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": config_digest,
                "size": config.len(),
            },
            "layers": [{
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": layer_digest,
                "size": layer.len(),
            }],
        })
        .to_string()
        .into_bytes();
        let manifest_digest = sha256(&manifest);
        let index = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": manifest_digest,
                "size": manifest.len(),
                "platform": { "architecture": "amd64", "os": "linux" },
                "annotations": {
                    "io.containerd.image.name": self.name,
                    "org.opencontainers.image.ref.name": tag,
                    "org.opencontainers.image.base.name": repository,
                },
            }],
        })
        .to_string()
        .into_bytes();

        let blob = |digest: &str| format!("blobs/sha256/{}", digest.trim_start_matches("sha256:"));
        let files: [(String, &[u8]); 5] = [
            (
                "oci-layout".to_owned(),
                br#"{"imageLayoutVersion":"1.0.0"}"#,
            ),
            ("index.json".to_owned(), &index),
            (blob(&manifest_digest), &manifest),
            (blob(&config_digest), &config),
            (blob(&layer_digest), &layer),
        ];
        let mut archive = tar::Builder::new(Vec::new());
        for dir in ["blobs/", "blobs/sha256/"] {
            let h = header(dir, tar::EntryType::Directory, 0o755, 0, 0)?;
            archive
                .append(&h, std::io::empty())
                .map_err(tar_error("the image archive"))?;
        }
        for (path, contents) in files {
            let h = header(
                &path,
                tar::EntryType::Regular,
                0o644,
                contents.len() as u64,
                0,
            )?;
            archive
                .append(&h, contents)
                .map_err(tar_error("the image archive"))?;
        }
        let bytes = archive
            .into_inner()
            .map_err(tar_error("the image archive"))?;
        let tmp = out.with_extension("tmp");
        fs::write(&tmp, bytes).map_err(Error::io(format!("writing {}", tmp.display())))?;
        fs::rename(&tmp, out).map_err(Error::io(format!("renaming to {}", out.display())))?;
        Ok(Written {
            manifest_digest,
            layer_digest,
        })
    }
}

/// The app image: `leaderz` and `leaderz-example` in [`BIN_DIR`], user `nonroot` 65532,
/// `/tmp`, entrypoint `leaderz` — the Dockerfile's layout.
pub fn app_image(leaderz: Vec<u8>, example: Vec<u8>) -> OciImage {
    OciImage {
        name: APP_IMAGE.to_owned(),
        entries: vec![
            LayerEntry::file("/etc/passwd", PASSWD, 0o644),
            LayerEntry::file("/etc/group", GROUP, 0o644),
            LayerEntry::dir("/home/nonroot", 0o700).owned_by(65532),
            LayerEntry::dir("/tmp", 0o1777),
            LayerEntry::file(&format!("{BIN_DIR}/leaderz"), leaderz, 0o755),
            LayerEntry::file(&format!("{BIN_DIR}/leaderz-example"), example, 0o755),
        ],
        user: APP_USER.to_owned(),
        entrypoint: vec![format!("{BIN_DIR}/leaderz")],
    }
}

/// The sandbox image: the static `pause` program (built with the node components) as
/// `/pause`, run as 65535 like upstream's.
pub fn pause_image(pause: Vec<u8>) -> OciImage {
    OciImage {
        name: PAUSE_IMAGE.to_owned(),
        entries: vec![LayerEntry::file("/pause", pause, 0o755)],
        user: "65535:65535".to_owned(),
        entrypoint: vec!["/pause".to_owned()],
    }
}

/// Whether an ELF executable is static: it has no program interpreter (`PT_INTERP`).
/// A static-pie binary (what `+crt-static` makes) still has `PT_DYNAMIC`, which is fine.
pub fn is_static_elf(bytes: &[u8]) -> Result<bool, String> {
    const PT_INTERP: u32 = 3;
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".to_owned());
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let phoff = u64::from_le_bytes(bytes[32..40].try_into().map_err(|_| "short header")?);
    let phoff = usize::try_from(phoff).map_err(|_| "program headers out of range")?;
    let (entsize, count) = (usize::from(u16_at(54)), usize::from(u16_at(56)));
    for i in 0..count {
        let at = phoff + i * entsize;
        let Some(kind) = bytes.get(at..at + 4) else {
            return Err("program headers past the end of the file".to_owned());
        };
        if u32::from_le_bytes([kind[0], kind[1], kind[2], kind[3]]) == PT_INTERP {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The workspace root (this crate is `crates/leaderz-cluster`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The cargo target directory of this workspace.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Builds `leaderz` and `leaderz-example` as static release binaries for [`TARGET`]
/// (cargo's own progress goes to stderr; a few minutes the first time, about a second
/// when up to date) and returns their paths, checked to be static.
pub async fn build_app_binaries() -> Result<[PathBuf; 2]> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = tokio::process::Command::new(&cargo);
    // Variables cargo sets for the running crate (`cargo test`, `cargo run`) would reach
    // the build scripts' `rerun-if-env-changed` checks (ring's does) and make every caller
    // rebuild what the previous one built; the nested build gets none of them.
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if name.starts_with("CARGO_PKG_")
            || name.starts_with("CARGO_BIN_EXE_")
            || matches!(
                &*name,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_MANIFEST_LINKS"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_BIN_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            command.env_remove(&*name);
        }
    }
    let status = command
        .current_dir(workspace_root())
        .args(["build", "--release", "--locked", "--target", TARGET])
        .args(["-p", "leaderz-cli", "--bin", "leaderz"])
        .args(["-p", "leaderz-examples", "--bin", "leaderz-example"])
        .env("RUSTFLAGS", STATIC_RUSTFLAGS)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .status()
        .await
        .map_err(Error::io("running cargo build"))?;
    if !status.success() {
        return Err(Error::Build {
            what: "the static release binaries".to_owned(),
            reason: format!("cargo build {status}; its messages above say why"),
        });
    }
    let dir = target_dir().join(TARGET).join("release");
    let paths = [dir.join("leaderz"), dir.join("leaderz-example")];
    for path in &paths {
        let bytes = fs::read(path).map_err(Error::io(format!("reading {}", path.display())))?;
        match is_static_elf(&bytes) {
            Ok(true) => {}
            Ok(false) => {
                return Err(Error::Build {
                    what: path.display().to_string(),
                    reason: "it is dynamically linked; a minimal image has no libc".to_owned(),
                });
            }
            Err(reason) => {
                return Err(Error::Build {
                    what: path.display().to_string(),
                    reason,
                });
            }
        }
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use super::*;

    fn files_of(tar_bytes: &[u8]) -> Vec<(String, u32, u64, Vec<u8>)> {
        let mut archive = tar::Archive::new(tar_bytes);
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                let path = e.path().unwrap().to_string_lossy().into_owned();
                let mode = e.header().mode().unwrap();
                let uid = e.header().uid().unwrap();
                let mut contents = Vec::new();
                e.read_to_end(&mut contents).unwrap();
                (path, mode, uid, contents)
            })
            .collect()
    }

    #[test]
    fn layer_has_parents_first_and_is_reproducible() {
        let image = app_image(b"L".to_vec(), b"E".to_vec());
        let layer = image.layer().unwrap();
        assert_eq!(layer, image.layer().unwrap(), "same input, same bytes");
        let paths: Vec<String> = files_of(&layer).into_iter().map(|f| f.0).collect();
        assert_eq!(
            paths,
            [
                "etc/",
                "etc/group",
                "etc/passwd",
                "home/",
                "home/nonroot/",
                "tmp/",
                "usr/",
                "usr/local/",
                "usr/local/bin/",
                "usr/local/bin/leaderz",
                "usr/local/bin/leaderz-example",
            ]
        );
        let files = files_of(&layer);
        let bin = files
            .iter()
            .find(|f| f.0 == "usr/local/bin/leaderz")
            .unwrap();
        assert_eq!((bin.1, bin.3.as_slice()), (0o755, &b"L"[..]));
        let home = files.iter().find(|f| f.0 == "home/nonroot/").unwrap();
        assert_eq!(home.2, 65532, "nonroot owns its home");
        let passwd = files.iter().find(|f| f.0 == "etc/passwd").unwrap();
        assert!(String::from_utf8_lossy(&passwd.3).contains("nonroot:x:65532:65532"));
    }

    #[test]
    fn archive_is_an_oci_layout_whose_digests_match_its_blobs() {
        let dir = std::env::temp_dir().join(format!("leaderz-oci-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("image.tar");
        let written = pause_image(b"\x7fELF pause".to_vec())
            .write_archive(&out)
            .unwrap();
        let files = files_of(&fs::read(&out).unwrap());
        fs::remove_dir_all(&dir).unwrap();
        let get = |path: &str| {
            files
                .iter()
                .find(|f| f.0 == path)
                .unwrap_or_else(|| panic!("{path} missing"))
                .3
                .clone()
        };
        let blob = |digest: &str| get(&format!("blobs/sha256/{}", &digest[7..]));
        for (path, _, _, contents) in &files {
            if let Some(hex) = path.strip_prefix("blobs/sha256/").filter(|h| !h.is_empty()) {
                assert_eq!(sha256(contents), format!("sha256:{hex}"), "{path}");
            }
        }
        assert_eq!(get("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: serde_json::Value = serde_json::from_slice(&get("index.json")).unwrap();
        let entry = &index["manifests"][0];
        assert_eq!(entry["digest"], written.manifest_digest);
        assert_eq!(
            entry["annotations"]["io.containerd.image.name"],
            PAUSE_IMAGE
        );
        let manifest: serde_json::Value =
            serde_json::from_slice(&blob(&written.manifest_digest)).unwrap();
        assert_eq!(manifest["layers"][0]["digest"], written.layer_digest);
        let config_digest = manifest["config"]["digest"].as_str().unwrap().to_owned();
        let config: serde_json::Value = serde_json::from_slice(&blob(&config_digest)).unwrap();
        assert_eq!(config["rootfs"]["diff_ids"][0], written.layer_digest);
        assert_eq!(config["config"]["Entrypoint"][0], "/pause");
        assert_eq!(config["os"], "linux");
        let layer = blob(&written.layer_digest);
        assert_eq!(files_of(&layer)[0].0, "pause");
    }

    #[test]
    fn static_and_dynamic_elf_files_are_told_apart() {
        // A dynamically linked program on this machine, and a 64-byte header with no
        // program headers at all (static by definition).
        let dynamic = fs::read("/bin/sh").unwrap();
        assert_eq!(is_static_elf(&dynamic), Ok(false));
        let mut header = vec![0u8; 64];
        header[..6].copy_from_slice(b"\x7fELF\x02\x01");
        assert_eq!(is_static_elf(&header), Ok(true));
        assert!(is_static_elf(b"#!/bin/sh\n").is_err());
    }

    /// The Dockerfile is for users with a builder; it must make what this module makes.
    #[test]
    fn dockerfile_makes_the_same_layout() {
        let dockerfile = fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
        let escaped = |s: &str| s.replace('\n', "\\n");
        for needed in [
            format!(r#"RUSTFLAGS="{STATIC_RUSTFLAGS}""#),
            format!("--target {TARGET}"),
            format!("target/{TARGET}/release/leaderz "),
            format!("target/{TARGET}/release/leaderz-example "),
            format!("/rootfs{BIN_DIR}/"),
            format!("printf '{}' > /rootfs/etc/passwd", escaped(PASSWD)),
            format!("printf '{}' > /rootfs/etc/group", escaped(GROUP)),
            "chmod 1777 /rootfs/tmp".to_owned(),
            "chown 65532:65532 /rootfs/home/nonroot".to_owned(),
            "FROM scratch".to_owned(),
            format!("USER {APP_USER}"),
            format!(r#"ENTRYPOINT ["{BIN_DIR}/leaderz"]"#),
        ] {
            assert!(
                dockerfile.contains(&needed),
                "the Dockerfile lacks `{needed}`"
            );
        }
    }

    #[test]
    fn image_names_match_what_kube_manifests_normalise_to() {
        let deployment = fs::read_to_string(workspace_root().join("kube/deployment.yaml")).unwrap();
        let image = deployment
            .lines()
            .find_map(|l| l.trim().strip_prefix("image: "))
            .unwrap();
        assert_eq!(format!("docker.io/library/{image}"), APP_IMAGE);
    }
}
