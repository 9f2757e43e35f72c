//! The data dir: the last good snapshot (written atomically) and the node id.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use tollgate_shared::Snapshot;

const SNAPSHOT_FILE: &str = "snapshot.json";
const NODE_ID_FILE: &str = "node_id";

/// Writes `snapshot` so a crash leaves either the old file or the new one: temp file, fsync,
/// rename, fsync of the directory.
pub fn save_snapshot(dir: &Path, snapshot: &Snapshot) -> anyhow::Result<()> {
    let temp = dir.join(format!("{SNAPSHOT_FILE}.tmp"));
    let bytes = serde_json::to_vec(snapshot).context("encoding the snapshot")?;
    // The snapshot holds HMAC secrets of JWT issuers: readable by this user only.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(&temp)
        .with_context(|| format!("creating {}", temp.display()))?;
    file.write_all(&bytes).context("writing the snapshot")?;
    file.sync_all().context("syncing the snapshot")?;
    drop(file);
    std::fs::rename(&temp, dir.join(SNAPSHOT_FILE)).context("renaming the snapshot into place")?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .context("syncing the data dir")?;
    Ok(())
}

/// The last snapshot saved, if any.
pub fn load_snapshot(dir: &Path) -> anyhow::Result<Option<Snapshot>> {
    let path = dir.join(SNAPSHOT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .with_context(|| format!("decoding {}", path.display()))?,
        )),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(error).with_context(|| format!("reading {}", path.display())),
    }
}

/// The configured node id, or the one kept in the data dir, or a new one (then kept).
pub fn node_id(dir: &Path, configured: Option<&str>) -> anyhow::Result<String> {
    if let Some(id) = configured {
        return Ok(id.to_string());
    }
    let path = dir.join(NODE_ID_FILE);
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() {
            return Ok(id.to_string());
        }
    }
    let id = format!("dp-{}", uuid::Uuid::new_v4().simple());
    std::fs::write(&path, &id).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_round_trips_and_node_id_is_kept() {
        let dir =
            std::env::temp_dir().join(format!("tg-persist-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(load_snapshot(&dir).expect("no file is fine"), None);
        let snapshot = Snapshot {
            revision: 7,
            ..Snapshot::default()
        };
        save_snapshot(&dir, &snapshot).expect("save");
        assert_eq!(load_snapshot(&dir).expect("load"), Some(snapshot));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(SNAPSHOT_FILE))
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "only the owner may read the snapshot");
        }
        let id = node_id(&dir, None).expect("id");
        assert_eq!(node_id(&dir, None).expect("id"), id);
        assert_eq!(node_id(&dir, Some("mine")).expect("id"), "mine");
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
