//! The bundle's `config.json`: read as a typed OCI spec (`oci-spec`), changed as JSON.
//!
//! The edits (user namespace, mappings, root path, bind sources, one sysctl) are made on the
//! document as parsed JSON, not by writing the typed spec back: a field the `oci-spec` version
//! does not know, or a default it fills in, would otherwise change what the runtime is told.
//! The original bytes are kept so an undone create can put them back.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};
use serde_json::{Value, json};

use crate::error::{Result, RuncError};

/// The sysctl Docker sets to `0 2147483647`, which a namespace that maps fewer gids refuses
/// (`EINVAL`: the range must be mapped; Documentation/networking/ip-sysctl.rst).
pub const PING_GROUP_RANGE: &str = "net.ipv4.ping_group_range";

/// A bind mount of the spec whose source is a host path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BindMount {
    /// Its index in `mounts`.
    pub index: usize,
    /// Absolute (a relative source is taken from the bundle directory, as runc does).
    pub source: PathBuf,
    /// `rbind`: with the submounts under the source.
    pub recursive: bool,
}

/// A bundle's `config.json`, loaded.
#[derive(Debug)]
pub struct Bundle {
    pub dir: PathBuf,
    path: PathBuf,
    original: Vec<u8>,
    value: Value,
    spec: Spec,
}

impl Bundle {
    /// Reads `<dir>/config.json`.
    pub fn load(dir: &Path) -> Result<Bundle> {
        let path = dir.join("config.json");
        let original = std::fs::read(&path).map_err(|e| RuncError::io("read", &path, e))?;
        let value: Value = serde_json::from_slice(&original).map_err(|e| RuncError::Spec {
            bundle: dir.to_path_buf(),
            reason: format!("not JSON: {e}"),
        })?;
        let spec: Spec = serde_json::from_value(value.clone()).map_err(|e| RuncError::Spec {
            bundle: dir.to_path_buf(),
            reason: format!("not an OCI runtime spec: {e}"),
        })?;
        if !value.is_object() {
            return Err(RuncError::Spec {
                bundle: dir.to_path_buf(),
                reason: "not a JSON object".into(),
            });
        }
        Ok(Bundle {
            dir: dir.to_path_buf(),
            path,
            original,
            value,
            spec,
        })
    }

    fn refuse(&self, reason: impl Into<String>) -> RuncError {
        RuncError::Spec {
            bundle: self.dir.clone(),
            reason: reason.into(),
        }
    }

    /// The root filesystem's path, absolute.
    pub fn root_path(&self) -> Result<PathBuf> {
        let root = self
            .spec
            .root()
            .as_ref()
            .ok_or_else(|| self.refuse("no root"))?;
        let path = root.path();
        if path.as_os_str().is_empty() {
            return Err(self.refuse("root.path is empty"));
        }
        Ok(if path.is_absolute() {
            path.clone()
        } else {
            self.dir.join(path)
        })
    }

    /// Refuses a spec that has a user namespace or id mappings of its own already (dockerd
    /// with `--userns-remap`): the wrapper gives each container one of its own.
    pub fn check_no_user_namespace(&self) -> Result<()> {
        let Some(linux) = self.spec.linux() else {
            return Ok(());
        };
        let has_user = linux
            .namespaces()
            .iter()
            .flatten()
            .any(|ns| ns.typ() == LinuxNamespaceType::User);
        let has_maps = linux.uid_mappings().as_ref().is_some_and(|m| !m.is_empty())
            || linux.gid_mappings().as_ref().is_some_and(|m| !m.is_empty());
        if has_user || has_maps {
            return Err(self.refuse(
                "it has a user namespace or id mappings already (dockerd --userns-remap?); \
                 subid-runc gives every container a namespace of its own: turn the remapping off",
            ));
        }
        Ok(())
    }

    /// Bind mounts (`type` bind, or a `bind`/`rbind` option) with their sources.
    pub fn bind_mounts(&self) -> Vec<BindMount> {
        let mut binds = Vec::new();
        for (index, mount) in self.spec.mounts().iter().flatten().enumerate() {
            let options = mount.options().clone().unwrap_or_default();
            let is_bind = mount.typ().as_deref() == Some("bind")
                || options.iter().any(|o| o == "bind" || o == "rbind");
            let Some(source) = mount.source() else {
                continue;
            };
            if !is_bind {
                continue;
            }
            let source = if source.is_absolute() {
                source.clone()
            } else {
                self.dir.join(source)
            };
            binds.push(BindMount {
                index,
                source,
                recursive: options.iter().any(|o| o == "rbind"),
            });
        }
        binds
    }

    /// `linux` of the document, made if missing.
    fn linux(&mut self) -> &mut serde_json::Map<String, Value> {
        let doc = self.value.as_object_mut().expect("checked at load");
        let linux = doc.entry("linux").or_insert_with(|| json!({}));
        if !linux.is_object() {
            *linux = json!({});
        }
        linux.as_object_mut().expect("made an object above")
    }

    /// Puts the container in a user namespace: the one pinned at `join` or, without, a new one
    /// (made by the runtime with the mappings of [`Bundle::set_mappings`]).
    pub fn set_user_namespace(&mut self, join: Option<&Path>) {
        let entry = match join {
            Some(path) => json!({ "type": "user", "path": path }),
            None => json!({ "type": "user" }),
        };
        let linux = self.linux();
        let namespaces = linux.entry("namespaces").or_insert_with(|| json!([]));
        if !namespaces.is_array() {
            *namespaces = json!([]);
        }
        let list = namespaces.as_array_mut().expect("made an array above");
        list.retain(|ns| ns.get("type").and_then(Value::as_str) != Some("user"));
        list.push(entry);
    }

    /// `linux.uidMappings`/`gidMappings`: the lease's single extent `0 <base> <size>`. Also in
    /// join mode: runc 1.1 refuses a user namespace without them (`User namespaces enabled, but
    /// no uid mappings found`), and joining does not write them.
    pub fn set_mappings(&mut self, uid_base: u32, gid_base: u32, size: u32) {
        let linux = self.linux();
        linux.insert(
            "uidMappings".into(),
            json!([{ "containerID": 0, "hostID": uid_base, "size": size }]),
        );
        linux.insert(
            "gidMappings".into(),
            json!([{ "containerID": 0, "hostID": gid_base, "size": size }]),
        );
    }

    /// Clamps the sysctls a namespace of `size` ids refuses; returns `(key, was, now)` of each
    /// change.
    pub fn clamp_sysctls(&mut self, size: u32) -> Vec<(String, String, String)> {
        let mut changed = Vec::new();
        let linux = self.linux();
        let Some(sysctl) = linux.get_mut("sysctl").and_then(Value::as_object_mut) else {
            return changed;
        };
        if let Some(value) = sysctl.get_mut(PING_GROUP_RANGE)
            && let Some(text) = value.as_str()
            && let Some(clamped) = clamp_ping_group_range(text, size)
            && clamped != text
        {
            changed.push((
                PING_GROUP_RANGE.to_string(),
                text.to_string(),
                clamped.clone(),
            ));
            *value = Value::String(clamped);
        }
        changed
    }

    /// Points `root.path` at `path`.
    pub fn set_root_path(&mut self, path: &Path) {
        let doc = self.value.as_object_mut().expect("checked at load");
        let root = doc.entry("root").or_insert_with(|| json!({}));
        if let Some(root) = root.as_object_mut() {
            root.insert("path".into(), json!(path));
        }
    }

    /// Points the source of `mounts[index]` at `path`.
    pub fn set_mount_source(&mut self, index: usize, path: &Path) {
        if let Some(mount) = self
            .value
            .get_mut("mounts")
            .and_then(Value::as_array_mut)
            .and_then(|m| m.get_mut(index))
            .and_then(Value::as_object_mut)
        {
            mount.insert("source".into(), json!(path));
        }
    }

    /// Adds `options` to those of `mounts[index]` that it lacks.
    pub fn add_mount_options(&mut self, index: usize, options: &[&str]) {
        let Some(mount) = self
            .value
            .get_mut("mounts")
            .and_then(Value::as_array_mut)
            .and_then(|m| m.get_mut(index))
            .and_then(Value::as_object_mut)
        else {
            return;
        };
        let list = mount.entry("options").or_insert_with(|| json!([]));
        if !list.is_array() {
            *list = json!([]);
        }
        let list = list.as_array_mut().expect("made an array above");
        for option in options {
            if !list.iter().any(|o| o.as_str() == Some(option)) {
                list.push(json!(option));
            }
        }
    }

    /// Records which lease the container runs on, for whoever reads the bundle.
    pub fn annotate(&mut self, pairs: &BTreeMap<&str, String>) {
        let doc = self.value.as_object_mut().expect("checked at load");
        let annotations = doc.entry("annotations").or_insert_with(|| json!({}));
        if !annotations.is_object() {
            *annotations = json!({});
        }
        if let Some(map) = annotations.as_object_mut() {
            for (k, v) in pairs {
                map.insert((*k).to_string(), json!(v));
            }
        }
    }

    /// Writes the changed document (a temp file renamed over `config.json`).
    pub fn save(&self) -> Result<()> {
        let bytes = serde_json::to_vec(&self.value).map_err(|e| self.refuse(e.to_string()))?;
        write_replace(&self.path, &bytes)
    }

    /// What puts the original bytes back (an undone create leaves the bundle as it found it).
    pub fn original(&self) -> Original {
        Original {
            path: self.path.clone(),
            bytes: self.original.clone(),
        }
    }

    /// The document as it would be saved (tests).
    #[cfg(test)]
    pub fn value(&self) -> &Value {
        &self.value
    }
}

/// A bundle's `config.json` as it was before the wrapper changed it.
#[derive(Debug, Clone)]
pub struct Original {
    path: PathBuf,
    bytes: Vec<u8>,
}

impl Original {
    /// Writes the original bytes back.
    pub fn restore(&self) -> Result<()> {
        write_replace(&self.path, &self.bytes)
    }
}

/// `lo hi` clamped to the gids `0..size` that the namespace maps; `None` when unreadable.
pub fn clamp_ping_group_range(text: &str, size: u32) -> Option<String> {
    let mut parts = text.split_whitespace().map(str::parse::<u64>);
    let (Some(Ok(lo)), Some(Ok(hi)), None) = (parts.next(), parts.next(), parts.next()) else {
        return None;
    };
    let top = u64::from(size.checked_sub(1)?);
    let hi = hi.min(top);
    let lo = lo.min(hi);
    Some(format!("{lo} {hi}"))
}

fn write_replace(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.subid-runc");
    std::fs::write(&tmp, bytes).map_err(|e| RuncError::io("write", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| RuncError::io("rename", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCKER: &str = r#"{
      "ociVersion": "1.0.2-dev",
      "process": {"user": {"uid": 0, "gid": 0}, "args": ["id"], "cwd": "/"},
      "root": {"path": "/var/lib/docker/overlay2/abc/merged"},
      "hostname": "abc",
      "mounts": [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid"]},
        {"destination": "/etc/hosts", "type": "bind",
         "source": "/var/lib/docker/containers/abc/hosts", "options": ["rbind", "rprivate"]},
        {"destination": "/data", "source": "vol", "options": ["bind"]}
      ],
      "linux": {
        "sysctl": {"net.ipv4.ip_unprivileged_port_start": "0",
                   "net.ipv4.ping_group_range": "0 2147483647"},
        "namespaces": [{"type": "mount"}, {"type": "network"}],
        "aFieldOciSpecDoesNotKnow": {"kept": true}
      }
    }"#;

    fn bundle(text: &str) -> (tempfile::TempDir, Bundle) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), text).unwrap();
        let b = Bundle::load(dir.path()).unwrap();
        (dir, b)
    }

    #[test]
    fn reads_root_and_binds() {
        let (dir, b) = bundle(DOCKER);
        assert_eq!(
            b.root_path().unwrap(),
            PathBuf::from("/var/lib/docker/overlay2/abc/merged")
        );
        b.check_no_user_namespace().unwrap();
        assert_eq!(
            b.bind_mounts(),
            vec![
                BindMount {
                    index: 2,
                    source: "/var/lib/docker/containers/abc/hosts".into(),
                    recursive: true
                },
                BindMount {
                    index: 3,
                    source: dir.path().join("vol"),
                    recursive: false
                },
            ]
        );
    }

    #[test]
    fn edits_keep_what_they_do_not_touch_and_can_be_undone() {
        let (dir, mut b) = bundle(DOCKER);
        b.set_user_namespace(Some(Path::new("/run/subidd/ns/docker-abc/user")));
        b.set_mappings(1_879_048_192, 1_879_048_192, 65536);
        let changed = b.clamp_sysctls(65536);
        assert_eq!(
            changed,
            vec![(
                PING_GROUP_RANGE.to_string(),
                "0 2147483647".to_string(),
                "0 65535".to_string()
            )]
        );
        b.set_root_path(Path::new("/run/subid-runc/c/abc/rootfs"));
        b.set_mount_source(2, Path::new("/run/subid-runc/c/abc/m/2"));
        b.add_mount_options(2, &["nosuid", "rbind"]);
        b.add_mount_options(0, &["nodev"]);
        b.save().unwrap();
        let saved: Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        assert_eq!(saved["root"]["path"], "/run/subid-runc/c/abc/rootfs");
        assert_eq!(saved["mounts"][2]["source"], "/run/subid-runc/c/abc/m/2");
        assert_eq!(
            saved["mounts"][2]["options"],
            json!(["rbind", "rprivate", "nosuid"])
        );
        assert_eq!(saved["mounts"][0]["options"], json!(["nodev"]));
        assert_eq!(saved["linux"]["aFieldOciSpecDoesNotKnow"]["kept"], true);
        assert_eq!(saved["linux"]["sysctl"][PING_GROUP_RANGE], "0 65535");
        assert_eq!(
            saved["linux"]["namespaces"][2],
            json!({"type": "user", "path": "/run/subidd/ns/docker-abc/user"})
        );
        assert_eq!(saved["linux"]["uidMappings"][0]["hostID"], 1_879_048_192);
        // Saved again with a new namespace: one user entry, not two.
        b.set_user_namespace(None);
        let users = b.value()["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|n| n["type"] == "user")
            .count();
        assert_eq!(users, 1);
        b.original().restore().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join("config.json")).unwrap(),
            DOCKER
        );
    }

    #[test]
    fn a_remapped_spec_is_refused() {
        let text = DOCKER.replace(
            r#"[{"type": "mount"}, {"type": "network"}]"#,
            r#"[{"type": "user"}]"#,
        );
        let (_dir, b) = bundle(&text);
        assert!(b.check_no_user_namespace().is_err());
    }

    #[test]
    fn a_config_that_is_no_spec_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for text in ["[1]", "{", r#"{"mounts": 3}"#] {
            std::fs::write(dir.path().join("config.json"), text).unwrap();
            assert!(
                matches!(Bundle::load(dir.path()), Err(RuncError::Spec { .. })),
                "{text}"
            );
        }
    }

    #[test]
    fn ping_group_range_is_clamped_to_the_mapped_gids() {
        assert_eq!(
            clamp_ping_group_range("0 2147483647", 65536).as_deref(),
            Some("0 65535")
        );
        assert_eq!(
            clamp_ping_group_range("100 200", 65536).as_deref(),
            Some("100 200")
        );
        assert_eq!(
            clamp_ping_group_range("70000 80000", 65536).as_deref(),
            Some("65535 65535")
        );
        assert_eq!(clamp_ping_group_range("1", 65536), None);
        assert_eq!(clamp_ping_group_range("a b", 65536), None);
    }
}
