//! Streamed uploads (PROTOCOL.md section 9), independent of the transport that carries the
//! bytes: a file under `--upload-dir` written as the bytes arrive (so memory stays at one
//! chunk whatever the size), its SHA-256 computed on the way, renamed into place on
//! completion, resumable from its offset for an hour after an interruption.
//!
//! Each upload has a record, `meta/<id>.json` (org, name, size, sender; once complete its
//! SHA-256), written before its first byte and again at completion, so a restarted node knows
//! its uploads: an interrupted one resumes from the bytes in `partial/<id>`, a complete one
//! still shows (and counts against its org's limits).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::model::OrgId;

/// How long an interrupted upload can be resumed.
pub const RESUMABLE_FOR: Duration = Duration::from_secs(3600);

/// Where uploads go and how large they may be.
#[derive(Debug, Clone)]
pub struct UploadConfig {
    pub dir: PathBuf,
    /// Largest upload, in bytes.
    pub max_bytes: u64,
    /// Bytes of uploads (stored and in progress) one org may hold.
    pub max_org_bytes: u64,
    /// Uploads (stored and in progress) one org may hold.
    pub max_org_uploads: usize,
}

/// What `meta/<id>.json` holds.
#[derive(serde::Serialize, serde::Deserialize)]
struct Record {
    id: String,
    org: String,
    name: String,
    size: u64,
    from: String,
    /// Set once complete.
    sha256: Option<String>,
}

/// Why an upload cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("{0}")]
    TooLarge(String),
    #[error("upload {id} is at offset {received}, not {offset}")]
    Offset {
        id: String,
        received: u64,
        offset: u64,
    },
    #[error("no such upload")]
    NotFound,
    #[error("upload {0} is being written by another request")]
    Busy(String),
    #[error("upload ended at {received} of {size} bytes")]
    Incomplete { received: u64, size: u64 },
    #[error("{0}")]
    Invalid(String),
    #[error("upload storage: {0}")]
    Io(#[from] std::io::Error),
}

/// What `GET /v1/uploads/{id}` shows.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct UploadView {
    pub id: String,
    pub org: String,
    pub name: String,
    pub received: u64,
    pub size: u64,
    pub state: &'static str,
    pub sha256: Option<String>,
    #[serde(skip)]
    pub from: String,
}

struct Entry {
    view: UploadView,
    /// A request is writing it now.
    active: bool,
    touched: Instant,
}

/// The uploads of this node.
pub struct Uploads {
    cfg: UploadConfig,
    entries: Mutex<HashMap<String, Entry>>,
}

impl Uploads {
    /// Opens the directory and the uploads recorded there by an earlier run.
    pub fn new(cfg: UploadConfig) -> std::io::Result<Arc<Self>> {
        for sub in ["partial", "done", "meta"] {
            std::fs::create_dir_all(cfg.dir.join(sub))?;
        }
        let uploads = Uploads {
            cfg,
            entries: Mutex::new(HashMap::new()),
        };
        let loaded = uploads.load()?;
        if loaded > 0 {
            tracing::info!(uploads = loaded, "uploads found in the upload directory");
        }
        Ok(Arc::new(uploads))
    }

    /// Reads `meta/`: records whose file is gone (or unreadable records) are removed.
    fn load(&self) -> std::io::Result<usize> {
        let mut entries = self.entries.lock();
        for item in std::fs::read_dir(self.cfg.dir.join("meta"))? {
            let path = item?.path();
            if path.extension().is_none_or(|e| e != "json") {
                let _ = std::fs::remove_file(&path); // a record write cut short
                continue;
            }
            let record: Option<Record> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let Some(r) = record else {
                tracing::warn!(path = %path.display(), "unreadable upload record removed");
                let _ = std::fs::remove_file(&path);
                continue;
            };
            let (file, state) = match r.sha256 {
                Some(_) => (self.done(&r.id), "done"),
                None => (self.partial(&r.id), "receiving"),
            };
            let Ok(len) = std::fs::metadata(&file).map(|m| m.len()) else {
                let _ = std::fs::remove_file(&path);
                continue;
            };
            entries.insert(
                r.id.clone(),
                Entry {
                    view: UploadView {
                        id: r.id,
                        org: r.org,
                        name: r.name,
                        // Bytes written before a crash are on disk: the resume point.
                        received: len.min(r.size),
                        size: r.size,
                        state,
                        sha256: r.sha256,
                        from: r.from,
                    },
                    active: false,
                    touched: Instant::now(),
                },
            );
        }
        Ok(entries.len())
    }

    fn partial(&self, id: &str) -> PathBuf {
        self.cfg.dir.join("partial").join(id)
    }

    fn done(&self, id: &str) -> PathBuf {
        self.cfg.dir.join("done").join(id)
    }

    fn meta(&self, id: &str) -> PathBuf {
        self.cfg.dir.join("meta").join(format!("{id}.json"))
    }

    /// Writes an upload's record (temporary file, then rename).
    async fn save(&self, view: &UploadView) -> std::io::Result<()> {
        let record = Record {
            id: view.id.clone(),
            org: view.org.clone(),
            name: view.name.clone(),
            size: view.size,
            from: view.from.clone(),
            sha256: view.sha256.clone(),
        };
        let tmp = self.cfg.dir.join("meta").join(format!("{}.tmp", view.id));
        tokio::fs::write(
            &tmp,
            serde_json::to_vec(&record).map_err(std::io::Error::other)?,
        )
        .await?;
        tokio::fs::rename(&tmp, self.meta(&view.id)).await
    }

    /// Starts a new upload (`id` chosen by the client or, when `None`, by the server), or
    /// resumes an interrupted one at `offset` (which must be where it stopped).
    pub async fn begin(
        self: &Arc<Self>,
        org: &OrgId,
        name: &str,
        size: Option<u64>,
        from: &str,
        id: Option<&str>,
        offset: u64,
    ) -> Result<UploadWriter, UploadError> {
        check_name(name)?;
        if let Some(id) = id {
            check_id(id)?;
        }
        let existing = id.and_then(|id| {
            self.entries
                .lock()
                .get(id)
                .map(|e| (e.view.clone(), e.active))
        });
        match existing {
            Some((view, active)) => {
                if view.org != org.as_str() || view.from != from {
                    return Err(UploadError::NotFound);
                }
                if view.state != "receiving" {
                    return Err(UploadError::Invalid(format!(
                        "upload {} is {}",
                        view.id, view.state
                    )));
                }
                if active {
                    return Err(UploadError::Busy(view.id));
                }
                if offset != view.received {
                    return Err(UploadError::Offset {
                        id: view.id,
                        received: view.received,
                        offset,
                    });
                }
                if size.is_some_and(|s| s != view.size) {
                    return Err(UploadError::Invalid(
                        "the size differs from the upload's".into(),
                    ));
                }
                // The hash so far, from the bytes already on disk.
                let path = self.partial(&view.id);
                let mut hasher = Sha256::new();
                let mut f = tokio::fs::File::open(&path).await?;
                let mut buf = vec![0u8; 64 * 1024];
                let mut left = view.received;
                while left > 0 {
                    let want = buf.len().min(left as usize);
                    let n = f.read(&mut buf[..want]).await?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    left -= n as u64;
                }
                let file = tokio::fs::OpenOptions::new()
                    .append(true)
                    .open(&path)
                    .await?;
                // Bytes past the last counted offset (written when the request broke off)
                // are dropped: the client sends them again.
                file.set_len(view.received).await?;
                self.set_active(&view.id, true);
                Ok(UploadWriter {
                    uploads: self.clone(),
                    id: view.id,
                    file,
                    hasher,
                    received: view.received,
                    size: view.size,
                    since_update: 0,
                })
            }
            None => {
                if offset != 0 {
                    return Err(UploadError::NotFound);
                }
                let size = size.ok_or_else(|| {
                    UploadError::Invalid("the size of a new upload is needed".into())
                })?;
                if size > self.cfg.max_bytes {
                    return Err(UploadError::TooLarge(format!(
                        "upload of {size} bytes over the limit of {}",
                        self.cfg.max_bytes
                    )));
                }
                let id = id.map_or_else(random_id, str::to_owned);
                {
                    let mut entries = self.entries.lock();
                    let (held, count) = entries
                        .values()
                        .filter(|e| e.view.org == org.as_str() && e.view.state != "failed")
                        .fold((0, 0), |(b, n), e| (b + e.view.size, n + 1));
                    if count >= self.cfg.max_org_uploads {
                        return Err(UploadError::TooLarge(format!(
                            "org {org} holds {count} uploads, the limit"
                        )));
                    }
                    if held + size > self.cfg.max_org_bytes {
                        return Err(UploadError::TooLarge(format!(
                            "org {org} would hold {} bytes of uploads, over the limit of {}",
                            held + size,
                            self.cfg.max_org_bytes
                        )));
                    }
                    entries.insert(
                        id.clone(),
                        Entry {
                            view: UploadView {
                                id: id.clone(),
                                org: org.to_string(),
                                name: name.to_string(),
                                received: 0,
                                size,
                                state: "receiving",
                                sha256: None,
                                from: from.to_string(),
                            },
                            active: true,
                            touched: Instant::now(),
                        },
                    );
                }
                let view = self.status(&id).expect("inserted above");
                let created = async {
                    let file = tokio::fs::File::create(self.partial(&id)).await?;
                    self.save(&view).await?;
                    Ok::<_, std::io::Error>(file)
                };
                let file = match created.await {
                    Ok(f) => f,
                    Err(e) => {
                        self.entries.lock().remove(&id);
                        let _ = tokio::fs::remove_file(self.partial(&id)).await;
                        return Err(e.into());
                    }
                };
                Ok(UploadWriter {
                    uploads: self.clone(),
                    id,
                    file,
                    hasher: Sha256::new(),
                    received: 0,
                    size,
                    since_update: 0,
                })
            }
        }
    }

    fn set_active(&self, id: &str, active: bool) {
        if let Some(e) = self.entries.lock().get_mut(id) {
            e.active = active;
            e.touched = Instant::now();
        }
    }

    /// An upload's state, for its org only.
    /// The directory uploads are written to.
    pub fn dir(&self) -> &std::path::Path {
        &self.cfg.dir
    }

    pub fn status(&self, id: &str) -> Option<UploadView> {
        self.entries.lock().get(id).map(|e| e.view.clone())
    }

    /// Forgets (and deletes) uploads interrupted longer than [`RESUMABLE_FOR`] ago.
    pub fn sweep(&self) {
        let old: Vec<String> = self
            .entries
            .lock()
            .iter()
            .filter(|(_, e)| {
                !e.active && e.view.state == "receiving" && e.touched.elapsed() > RESUMABLE_FOR
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            let _ = std::fs::remove_file(self.meta(&id));
            let _ = std::fs::remove_file(self.partial(&id));
            self.entries.lock().remove(&id);
        }
    }
}

fn check_name(name: &str) -> Result<(), UploadError> {
    if name.is_empty()
        || name.len() > 255
        || name.contains(['/', '\\'])
        || name.contains(char::is_control)
    {
        return Err(UploadError::Invalid(
            "name: 1 to 255 bytes without / \\ or control characters".into(),
        ));
    }
    Ok(())
}

fn check_id(id: &str) -> Result<(), UploadError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !ok {
        return Err(UploadError::Invalid(
            "upload id: 1 to 64 of [A-Za-z0-9_-]".into(),
        ));
    }
    Ok(())
}

/// What an HTTP upload request names, from its untrusted query and headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UploadRequest {
    pub name: String,
    pub id: Option<String>,
    pub offset: u64,
    /// `Content-Length`: the size of a new upload, the rest of a resumed one.
    pub length: Option<u64>,
}

impl UploadRequest {
    /// Parses `name` (query) and the `Upload-Id`, `Upload-Offset` and `Content-Length` header
    /// values; a malformed one is `Invalid` (400).
    pub fn parse(
        name: Option<&str>,
        id: Option<&[u8]>,
        offset: Option<&[u8]>,
        length: Option<&[u8]>,
    ) -> Result<Self, UploadError> {
        let number = |what: &str, v: Option<&[u8]>| -> Result<Option<u64>, UploadError> {
            v.map(|v| {
                std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| UploadError::Invalid(format!("bad {what}")))
            })
            .transpose()
        };
        let name = name.unwrap_or_default();
        check_name(name)?;
        let id = match id {
            Some(raw) => {
                let id = std::str::from_utf8(raw)
                    .map_err(|_| UploadError::Invalid("bad upload-id".into()))?;
                check_id(id)?;
                Some(id.to_string())
            }
            None => None,
        };
        Ok(UploadRequest {
            name: name.to_string(),
            id,
            offset: number("upload-offset", offset)?.unwrap_or(0),
            length: number("content-length", length)?,
        })
    }
}

fn random_id() -> String {
    use rand::distr::{Alphanumeric, SampleString};
    Alphanumeric.sample_string(&mut rand::rng(), 20)
}

/// Writes one upload's bytes; dropped unfinished, the upload stays resumable.
pub struct UploadWriter {
    uploads: Arc<Uploads>,
    id: String,
    file: tokio::fs::File,
    hasher: Sha256,
    received: u64,
    size: u64,
    since_update: u64,
}

impl UploadWriter {
    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn received(&self) -> u64 {
        self.received
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Appends bytes (beyond the declared size: refused, nothing written).
    pub async fn write(&mut self, chunk: &[u8]) -> Result<(), UploadError> {
        if self.received + chunk.len() as u64 > self.size {
            return Err(UploadError::TooLarge(format!(
                "more bytes than the declared {}",
                self.size
            )));
        }
        self.file.write_all(chunk).await?;
        self.hasher.update(chunk);
        self.received += chunk.len() as u64;
        self.since_update += chunk.len() as u64;
        // The shared view (progress reads) is refreshed every 64 KiB and at the end.
        if self.since_update >= 64 * 1024 || self.received == self.size {
            self.since_update = 0;
            self.flush_view().await?;
        }
        Ok(())
    }

    /// Makes the bytes so far count: written to the file and shown in progress reads.
    async fn flush_view(&mut self) -> Result<(), UploadError> {
        self.file.flush().await?;
        if let Some(e) = self.uploads.entries.lock().get_mut(&self.id) {
            e.view.received = self.received;
            e.touched = Instant::now();
        }
        Ok(())
    }

    /// Completes the upload once every byte is there: synced, renamed into place, hashed.
    pub async fn finish(mut self) -> Result<UploadView, UploadError> {
        self.flush_view().await?;
        if self.received != self.size {
            return Err(UploadError::Incomplete {
                received: self.received,
                size: self.size,
            });
        }
        self.file.sync_all().await?;
        let done = self.uploads.done(&self.id);
        tokio::fs::rename(self.uploads.partial(&self.id), &done).await?;
        let sha = hex(&self.hasher.clone().finalize());
        let view = {
            let mut entries = self.uploads.entries.lock();
            let e = entries.get_mut(&self.id).ok_or(UploadError::NotFound)?;
            e.view.state = "done";
            e.view.sha256 = Some(sha);
            e.active = false;
            e.view.clone()
        };
        // The file is complete; a lost record write would only make it unknown after a
        // restart, so it is logged rather than failing the upload.
        if let Err(e) = self.uploads.save(&view).await {
            tracing::warn!(id = %view.id, error = %e, "upload record not updated");
        }
        Ok(view)
    }
}

impl Drop for UploadWriter {
    fn drop(&mut self) {
        // `received` in the view stays at the last flushed offset: the resume point.
        if let Some(e) = self.uploads.entries.lock().get_mut(&self.id) {
            e.active = false;
            e.touched = Instant::now();
        }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
