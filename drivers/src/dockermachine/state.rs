//! What machinist keeps of a plugin-driven Machine between calls: the driver's config
//! JSON (GetConfigRaw) and its whole store directory (keys included), as one document
//! the controller stores in a Secret owned by the Machine.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// A Secret holds at most 1 MiB; the document is base64 inside JSON, so the store
/// directory may hold about this much.
pub const MAX_STORE_BYTES: u64 = 700 * 1024;

/// Where the instance's life is, as far as machinist knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    /// Create was about to be called, or failed: an instance may or may not exist.
    Creating,
    /// Create returned: the instance exists (or existed).
    Created,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct File {
    pub mode: u32,
    /// Base64.
    pub data: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavedState {
    pub plugin: String,
    pub machine_name: String,
    pub phase: Phase,
    /// The StorePath the config's paths were made under (rewritten on restore).
    pub store_path: String,
    /// GetConfigRaw's JSON.
    pub config: serde_json::Value,
    /// The store directory's files, by path relative to it.
    pub files: BTreeMap<String, File>,
}

impl SavedState {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("serializable")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<SavedState, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("the saved driver state is unreadable: {e}"))
    }

    /// The config, its paths moved from the saved StorePath to `store`.
    pub fn config_for(&self, store: &Path) -> Vec<u8> {
        let mut config = self.config.clone();
        rewrite_prefix(&mut config, &self.store_path, &store.to_string_lossy());
        serde_json::to_vec(&config).expect("serializable")
    }

    /// Writes the saved files into `store`, an empty directory.
    pub fn restore_files(&self, store: &Path) -> Result<(), String> {
        for (relative, file) in &self.files {
            let path = inside(store, relative)?;
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| format!("restoring {relative}: {e}"))?;
            }
            let data = STANDARD.decode(&file.data).map_err(|e| format!("restoring {relative}: {e}"))?;
            std::fs::write(&path, data).map_err(|e| format!("restoring {relative}: {e}"))?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(file.mode & 0o777))
                .map_err(|e| format!("restoring {relative}: {e}"))?;
        }
        Ok(())
    }
}

/// `relative` under `root`, refusing paths that would leave it.
fn inside(root: &Path, relative: &str) -> Result<PathBuf, String> {
    let path = Path::new(relative);
    if path.components().any(|c| !matches!(c, Component::Normal(_))) {
        return Err(format!("the saved driver state names the path {relative:?}, outside its store directory"));
    }
    Ok(root.join(path))
}

/// Every regular file under `store`, by relative path. Fails when they are more than a
/// Secret can hold.
pub fn snapshot_files(store: &Path) -> Result<BTreeMap<String, File>, String> {
    let mut files = BTreeMap::new();
    let mut total = 0u64;
    let mut dirs = vec![store.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("reading {}: {e}", dir.display()))?;
        for entry in entries {
            let entry = entry.map_err(|e| format!("reading {}: {e}", dir.display()))?;
            let kind = entry.file_type().map_err(|e| e.to_string())?;
            let path = entry.path();
            if kind.is_dir() {
                dirs.push(path);
                continue;
            }
            // Symlinks and sockets are not kept: nothing a driver needs again.
            if !kind.is_file() {
                continue;
            }
            let meta = entry.metadata().map_err(|e| e.to_string())?;
            total += meta.len();
            if total > MAX_STORE_BYTES {
                return Err(format!(
                    "the driver's store directory holds more than {} KiB (at {}); machinist keeps it in a Secret, which cannot hold more. Drivers that keep disk images there (local hypervisors) are not supported",
                    MAX_STORE_BYTES / 1024,
                    path.display()
                ));
            }
            let data = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
            let relative = path.strip_prefix(store).expect("under store").to_string_lossy().into_owned();
            files.insert(relative, File { mode: meta.permissions().mode() & 0o777, data: STANDARD.encode(data) });
        }
    }
    Ok(files)
}

fn rewrite_prefix(value: &mut serde_json::Value, from: &str, to: &str) {
    if from.is_empty() || from == to {
        return;
    }
    match value {
        serde_json::Value::String(s) => {
            if let Some(rest) = s.strip_prefix(from)
                && (rest.is_empty() || rest.starts_with('/'))
            {
                *s = format!("{to}{rest}");
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(|i| rewrite_prefix(i, from, to)),
        serde_json::Value::Object(map) => map.values_mut().for_each(|v| rewrite_prefix(v, from, to)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_and_paths_survive_a_move_to_another_store_directory() {
        let a = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(a.path().join("machines/m")).unwrap();
        std::fs::write(a.path().join("machines/m/id_rsa"), b"KEY").unwrap();
        std::fs::set_permissions(a.path().join("machines/m/id_rsa"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let store = a.path().to_string_lossy().into_owned();
        let saved = SavedState {
            plugin: "x".into(),
            machine_name: "m".into(),
            phase: Phase::Created,
            store_path: store.clone(),
            config: serde_json::json!({"StorePath": store, "SSHKeyPath": format!("{store}/machines/m/id_rsa"), "Other": format!("{store}x")}),
            files: snapshot_files(a.path()).unwrap(),
        };
        let saved = SavedState::from_bytes(&saved.to_bytes()).unwrap();
        let b = tempfile::tempdir().unwrap();
        saved.restore_files(b.path()).unwrap();
        let key = b.path().join("machines/m/id_rsa");
        assert_eq!(std::fs::read(&key).unwrap(), b"KEY");
        assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
        let config: serde_json::Value = serde_json::from_slice(&saved.config_for(b.path())).unwrap();
        assert_eq!(config["SSHKeyPath"], key.to_string_lossy().as_ref());
        assert_eq!(config["Other"], format!("{store}x"), "only whole path prefixes move");
    }

    #[test]
    fn a_saved_path_cannot_leave_the_store_directory() {
        let saved = SavedState {
            plugin: "x".into(),
            machine_name: "m".into(),
            phase: Phase::Created,
            store_path: "/s".into(),
            config: serde_json::json!({}),
            files: BTreeMap::from([("../evil".to_string(), File { mode: 0o600, data: String::new() })]),
        };
        let dir = tempfile::tempdir().unwrap();
        assert!(saved.restore_files(dir.path()).is_err());
    }

    #[test]
    fn a_store_too_big_for_a_secret_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.img"), vec![0u8; MAX_STORE_BYTES as usize + 1]).unwrap();
        assert!(snapshot_files(dir.path()).unwrap_err().contains("not supported"));
    }
}
