//! `/proc/self/mountinfo` (proc(5)): which mount sits on a path, its filesystem and super
//! options (an overlay's layers), and the mounts under a directory.

use std::path::{Path, PathBuf};

use crate::error::{Result, RuncError};

/// One line of mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    pub id: u64,
    pub parent: u64,
    /// Where in its filesystem the mount is rooted.
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub fstype: String,
    pub source: String,
    /// Per-superblock options, unescaped, in order (`lowerdir=...`, `upperdir=...`).
    pub super_options: Vec<String>,
}

impl MountEntry {
    /// The value of super option `key` (`key=value`).
    pub fn option(&self, key: &str) -> Option<&str> {
        self.super_options
            .iter()
            .find_map(|o| o.strip_prefix(key)?.strip_prefix('='))
    }
}

/// Reads this process's mount table.
pub fn read() -> Result<Vec<MountEntry>> {
    let path = "/proc/self/mountinfo";
    let text = std::fs::read_to_string(path).map_err(|e| RuncError::io("read", path, e))?;
    Ok(parse(&text))
}

/// Parses mountinfo text; lines it cannot read are skipped.
pub fn parse(text: &str) -> Vec<MountEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MountEntry> {
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let id = left.next()?.parse().ok()?;
    let parent = left.next()?.parse().ok()?;
    let _dev = left.next()?;
    let root = PathBuf::from(unescape(left.next()?));
    let mount_point = PathBuf::from(unescape(left.next()?));
    let mut right = right.split(' ');
    let fstype = unescape(right.next()?);
    let source = unescape(right.next()?);
    // Commas inside an option's value are escaped (seq_show_option), so a plain split works.
    let super_options = right
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|o| !o.is_empty())
        .map(unescape)
        .collect();
    Some(MountEntry {
        id,
        parent,
        root,
        mount_point,
        fstype,
        source,
        super_options,
    })
}

/// Undoes the kernel's octal escapes (`\040` space, `\011` tab, `\012` newline, `\134`
/// backslash, `\054` comma); anything else is kept as it is.
pub fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..=i + 3]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let n = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(n);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The topmost mount on `path` (the last one listed there), if any.
pub fn top_at<'a>(entries: &'a [MountEntry], path: &Path) -> Option<&'a MountEntry> {
    entries.iter().rev().find(|e| e.mount_point == path)
}

/// The mount points strictly under `dir`, deepest (and latest) first: the order to detach them.
pub fn under(entries: &[MountEntry], dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<(usize, usize, PathBuf)> = entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.mount_point != dir && e.mount_point.starts_with(dir))
        .map(|(i, e)| (e.mount_point.components().count(), i, e.mount_point.clone()))
        .collect();
    found.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)));
    found.into_iter().map(|(_, _, p)| p).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
45 27 254:0 /var/lib/docker /var/lib/docker rw,relatime shared:1 - ext4 /dev/vda rw
49 45 0:40 / /var/lib/docker/overlay2/abc/merged rw,relatime shared:2 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/S4G:/var/lib/docker/overlay2/l/7LK,upperdir=/var/lib/docker/overlay2/abc/diff,workdir=/var/lib/docker/overlay2/abc/work
50 27 0:41 / /run/subid-runc/c/abc/rootfs rw - overlay overlay rw,lowerdir=l/S4G,upperdir=abc/diff,workdir=abc/work
51 50 0:42 / /run/subid-runc/c/abc/rootfs/x rw - tmpfs tmpfs rw
52 27 0:43 / /run/subid-runc/c/abc/m/3 rw - ext4 /dev/vda rw
53 27 0:44 /a\\040b /mnt/with\\040space rw - ext4 /dev/vda rw,opt=a\\054b
54 49 0:41 / /var/lib/docker/overlay2/abc/merged rw - overlay overlay rw,lowerdir=l/S4G
";

    #[test]
    fn finds_the_top_mount_and_its_layers() {
        let entries = parse(TEXT);
        assert_eq!(entries.len(), 8);
        let top = top_at(&entries, Path::new("/var/lib/docker/overlay2/abc/merged")).unwrap();
        assert_eq!(top.id, 54);
        let docker = entries.iter().find(|e| e.id == 49).unwrap();
        assert_eq!(docker.fstype, "overlay");
        assert_eq!(
            docker.option("lowerdir"),
            Some("/var/lib/docker/overlay2/l/S4G:/var/lib/docker/overlay2/l/7LK")
        );
        assert_eq!(
            docker.option("upperdir"),
            Some("/var/lib/docker/overlay2/abc/diff")
        );
        assert_eq!(docker.option("index"), None);
        assert!(top_at(&entries, Path::new("/nowhere")).is_none());
    }

    #[test]
    fn unescapes_octal_fields() {
        let entries = parse(TEXT);
        let e = entries.iter().find(|e| e.id == 53).unwrap();
        assert_eq!(e.mount_point, PathBuf::from("/mnt/with space"));
        assert_eq!(e.root, PathBuf::from("/a b"));
        assert_eq!(e.option("opt"), Some("a,b"));
        assert_eq!(unescape("x\\134y"), "x\\y");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn lists_mounts_under_a_directory_deepest_first() {
        let entries = parse(TEXT);
        assert_eq!(
            under(&entries, Path::new("/run/subid-runc/c/abc")),
            vec![
                // Equally deep: the later mount first.
                PathBuf::from("/run/subid-runc/c/abc/m/3"),
                PathBuf::from("/run/subid-runc/c/abc/rootfs/x"),
                PathBuf::from("/run/subid-runc/c/abc/rootfs"),
            ]
        );
        assert!(under(&entries, Path::new("/run/subid-runc/c/abcd")).is_empty());
    }
}
