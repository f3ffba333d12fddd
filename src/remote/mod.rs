//! Caches across hosts (DESIGN §8, issue 16): a cache's latest snapshot as an OCI artifact in a
//! registry, moved layer by layer with `push` and `pull`.
//!
//! Format: one OCI image manifest per snapshot, tagged `CACHE.SCOPE` (sanitised to tag rules),
//! with `artifactType` and a config blob of type [`ARTIFACT_TYPE`]; its layers are the latest
//! chain bottom-up, each a zstd tar in OCI layer format ([`layer`]), annotated with the layer's
//! name, diffID and commit time. A layer's digests are recorded in `cache-state.json` (the
//! layer record's `remote` key) once computed, so a layer is tarred again only when the
//! registry lacks it, and a pull finds the layers a host already has by digest.
//!
//! Push (read-only on the store but for recording digests) holds the cache's maintenance lock
//! so GC and compaction do not remove a layer being read. Pull, under the maintenance lock:
//! 1. plans, under a short cache lock, which pulled layers match local ones (same digest on
//!    the same parent chain) and which must be downloaded;
//! 2. downloads each missing blob to `lower/<cache>/.tmp-pull-*.blob` (digest verified),
//!    unpacks it into `lower/<cache>/.tmp-pull-*` (nothing written outside it), checks its
//!    diffID, and `syncfs`es once;
//! 3. under the cache lock: renames each into place under a fresh layer name, fsyncs the cache
//!    dir, and writes the state last, with the pulled top as the latest snapshot.
//!
//! A crash or error before 3 leaves only `.tmp-pull-*` leftovers (removed by the next pull or
//! GC); between the renames and the state write, complete layers no state names (for GC). Live
//! sessions keep their explicit `lowers`; the old chain stays until GC finds it unused.

pub mod auth;
pub mod auto;
pub mod layer;
pub mod registry;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use oci_client::manifest::{OciDescriptor, OciImageManifest, OCI_IMAGE_MEDIA_TYPE};
use oci_client::{Reference, RegistryOperation};
use serde::{Deserialize, Serialize};

pub use registry::Access;

use crate::error::{Error, IoContext, Result};
use crate::fsutil::{fsync_dir, remove_tree};
use crate::state::{CacheState, LayerInfo, XattrNs};
use crate::store::Store;

/// The snapshot manifest's `artifactType` and its config blob's media type.
pub const ARTIFACT_TYPE: &str = "application/vnd.cachedriver.snapshot.v1+json";
/// Key of a layer record's registry digests in `cache-state.json`.
pub const STATE_KEY: &str = "remote";
/// Prefix of a pull's temporary files and dirs in `lower/<cache>/`.
pub const TMP_PREFIX: &str = ".tmp-pull-";

const ANN_CACHE: &str = "dev.cachedriver.cache";
const ANN_SCOPE: &str = "dev.cachedriver.scope";
const ANN_LAYERS: &str = "dev.cachedriver.layers";
const ANN_LAYER: &str = "dev.cachedriver.layer";
const ANN_DIFF_ID: &str = "dev.cachedriver.diff_id";
const ANN_COMMITTED: &str = "dev.cachedriver.committed_at";
const ANN_CREATED: &str = "org.opencontainers.image.created";

/// The only scope there is until scopes land.
pub const DEFAULT_SCOPE: &str = "default";

fn rerr(m: impl Into<String>) -> Error {
    Error::Remote(m.into())
}

/// A layer's registry digests, as recorded in its state record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteInfo {
    /// Compressed blob digest.
    pub digest: String,
    /// Uncompressed tar digest.
    pub diff_id: String,
    /// Compressed size.
    pub size: u64,
    /// The blob's media type.
    pub media_type: String,
    /// The last repository (`registry/path`) it was pushed to or pulled from: a source for a
    /// cross-repository mount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
}

fn remote_info(l: &LayerInfo) -> Option<RemoteInfo> {
    l.ext(STATE_KEY)
        .and_then(|v| serde_json::from_value(v.clone()).ok())
}

/// Parses `CACHE[:SCOPE]`: only the default scope exists for now.
pub fn parse_cache_spec(spec: &str) -> Result<(String, String)> {
    let (cache, scope) = match spec.split_once(':') {
        Some((c, s)) => (c, s),
        None => (spec, ""),
    };
    crate::names::validate_cache(cache)?;
    if !scope.is_empty() && scope != DEFAULT_SCOPE {
        return Err(Error::InvalidName(format!(
            "{spec:?}: scopes are not supported yet (use CACHE or CACHE:{DEFAULT_SCOPE})"
        )));
    }
    Ok((cache.to_string(), DEFAULT_SCOPE.to_string()))
}

/// The tag of `cache`'s `scope` snapshot: `CACHE.SCOPE` made to fit
/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn tag_for(cache: &str, scope: &str) -> String {
    let mut t: String = format!("{cache}.{scope}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if !t.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_') {
        t.insert(0, '_');
    }
    t.truncate(128);
    t
}

/// Splits `REPO[:TAG]` into the repository and the tag given, if any (a `:` after the last `/`
/// is a tag; one before it is a port).
pub fn split_repo(repo: &str) -> (String, Option<String>) {
    let last = repo.rfind('/').map_or(0, |i| i + 1);
    match repo[last..].rfind(':') {
        Some(i) => (
            repo[..last + i].to_string(),
            Some(repo[last + i + 1..].to_string()),
        ),
        None => (repo.to_string(), None),
    }
}

fn reference(repo: &str, tag: &str) -> Result<Reference> {
    let s = format!("{repo}:{tag}");
    let r: Reference = s.parse().map_err(|e| {
        rerr(format!(
            "{s:?} is not a registry reference (REGISTRY/PATH[:TAG]): {e}"
        ))
    })?;
    // Without a registry host, "foo/bar" would silently mean Docker Hub: say so instead.
    if !repo
        .split('/')
        .next()
        .is_some_and(|h| h.contains(['.', ':']) || h == "localhost")
    {
        return Err(rerr(format!(
            "{repo:?} names no registry host; write it as HOST[:PORT]/PATH (e.g. 127.0.0.1:5000/caches)"
        )));
    }
    Ok(r)
}

/// A byte-progress bar on a terminal, hidden otherwise (CI logs stay readable).
fn bar(total: u64, what: &'static str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let b = indicatif::ProgressBar::new(total);
    if let Ok(s) = indicatif::ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}",
    ) {
        b.set_style(s.progress_chars("=> "));
    }
    b.set_prefix(what);
    b
}

/// What a push did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PushReport {
    /// `REPO:TAG` written.
    pub reference: String,
    /// The manifest's digest.
    pub manifest_digest: String,
    /// Layers in the snapshot.
    pub layers: usize,
    /// Layer blobs uploaded (digests).
    pub uploaded: Vec<String>,
    /// Layer blobs mounted from another repository of the registry.
    pub mounted: Vec<String>,
    /// Layer blobs tarred here (no digest recorded yet, or the registry lacked them).
    pub exported: usize,
    /// Bytes uploaded.
    pub bytes: u64,
}

/// What a pull did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PullReport {
    /// `REPO:TAG` read.
    pub reference: String,
    /// Layers in the snapshot.
    pub layers: usize,
    /// Layers downloaded (new local names).
    pub downloaded: Vec<String>,
    /// Layers this host already had (local names).
    pub reused: Vec<String>,
    /// Bytes downloaded.
    pub bytes: u64,
    /// The cache's latest layer afterwards.
    pub latest: String,
    /// Whether the cache's state changed.
    pub switched: bool,
}

/// Config blob of a snapshot: what the annotations say, in one JSON document.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SnapshotConfig {
    cache: String,
    scope: String,
    created: String,
    layers: Vec<ConfigLayer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ConfigLayer {
    name: String,
    digest: String,
    diff_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    committed_at: Option<String>,
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| rerr(format!("starting the async runtime: {e}")))
}

/// `cachedriver push CACHE[:SCOPE] REPO` (blocking: runs its own runtime).
pub fn push(store: &Store, spec: &str, repo: &str, access: &Access) -> Result<PushReport> {
    runtime()?.block_on(push_async(store, spec, repo, access))
}

/// `cachedriver pull REPO[:TAG] CACHE[:SCOPE]` (blocking: runs its own runtime).
pub fn pull(store: &Store, repo: &str, spec: &str, access: &Access) -> Result<PullReport> {
    runtime()?.block_on(pull_async(store, repo, spec, access))
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| rerr(format!("a worker thread failed: {e}")))?
}

struct PushLayer {
    name: String,
    committed_at: Option<String>,
    recorded: Option<RemoteInfo>,
}

/// Pushes `spec`'s latest snapshot to `repo` (see the module doc).
pub async fn push_async(
    store: &Store,
    spec: &str,
    repo: &str,
    access: &Access,
) -> Result<PushReport> {
    let (cache, scope) = parse_cache_spec(spec)?;
    crate::gc::check_cache_exists(store, &cache)?;
    let (repo, tag) = split_repo(repo);
    let tag = tag.unwrap_or_else(|| tag_for(&cache, &scope));
    let reference = reference(&repo, &tag)?;
    let repo_id = format!(
        "{}/{}",
        reference.resolve_registry(),
        reference.repository()
    );
    let conn = registry::connect(
        &reference,
        access,
        &[RegistryOperation::Pull, RegistryOperation::Push],
    )
    .await?;
    let conn = Arc::new(conn);

    let store_c = store.clone();
    let cache_c = cache.clone();
    let maint = blocking(move || store_c.lock_maintenance(&cache_c)).await?;
    let state = {
        let _l = store.lock_cache(&cache)?;
        store
            .load_state(&cache)?
            .ok_or_else(|| rerr(format!("cache {cache:?} has no state to push")))?
    };
    let mut chain = state.latest_chain()?;
    chain.reverse();
    let layers: Vec<PushLayer> = chain
        .iter()
        .map(|n| {
            let rec = state.layers.get(n);
            PushLayer {
                name: n.clone(),
                committed_at: rec.and_then(|r| r.committed_at.clone()),
                recorded: rec.and_then(remote_info),
            }
        })
        .collect();

    let tmp = tempfile::Builder::new()
        .prefix(".tmp-push-")
        .tempdir_in(store.cache_dir(&cache))
        .ctx("creating push temp dir", &store.cache_dir(&cache))?;
    let progress = bar(0, "push");
    let report = Arc::new(std::sync::Mutex::new(PushReport::default()));
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let infos: Vec<RemoteInfo> = stream::iter(layers.iter().enumerate())
        .map(|(i, l)| {
            let conn = conn.clone();
            let reference = reference.clone();
            let dir = store.layer_dir(&cache, &l.name);
            let blob = tmp.path().join(format!("{i}.blob"));
            let progress = progress.clone();
            let report = report.clone();
            let repo_id = repo_id.clone();
            async move {
                push_layer(
                    &conn, &reference, &repo_id, l, dir, blob, &progress, &report,
                )
                .await
            }
        })
        .buffered(access.concurrency.max(1))
        .try_collect()
        .await?;
    progress.finish_and_clear();

    // Record digests first: they are true whatever happens to the manifest.
    record_digests(store, &cache, &layers, &infos, &repo_id).await?;
    drop(maint);

    let config = SnapshotConfig {
        cache: cache.clone(),
        scope: scope.clone(),
        created: crate::fsutil::now_rfc3339(),
        layers: layers
            .iter()
            .zip(&infos)
            .map(|(l, i)| ConfigLayer {
                name: l.name.clone(),
                digest: i.digest.clone(),
                diff_id: i.diff_id.clone(),
                committed_at: l.committed_at.clone(),
            })
            .collect(),
    };
    let config_bytes = serde_json::to_vec(&config).map_err(|e| rerr(e.to_string()))?;
    let config_digest = layer::bytes_digest(&config_bytes);
    if !conn
        .client
        .blob_exists(&reference, &config_digest)
        .await
        .map_err(|e| registry::oci_err("checking the config blob", &reference, e))?
    {
        conn.client
            .push_blob(&reference, config_bytes.clone(), &config_digest)
            .await
            .map_err(|e| registry::oci_err("uploading the config blob", &reference, e))?;
    }
    let mut ann = BTreeMap::new();
    ann.insert(ANN_CACHE.to_string(), cache.clone());
    ann.insert(ANN_SCOPE.to_string(), scope.clone());
    ann.insert(ANN_LAYERS.to_string(), chain.join(","));
    ann.insert(ANN_CREATED.to_string(), config.created.clone());
    let manifest = OciImageManifest {
        schema_version: 2,
        media_type: Some(OCI_IMAGE_MEDIA_TYPE.to_string()),
        config: OciDescriptor {
            media_type: ARTIFACT_TYPE.to_string(),
            digest: config_digest,
            size: config_bytes.len() as i64,
            ..OciDescriptor::default()
        },
        layers: layers
            .iter()
            .zip(&infos)
            .map(|(l, i)| {
                let mut a = BTreeMap::new();
                a.insert(ANN_LAYER.to_string(), l.name.clone());
                a.insert(ANN_DIFF_ID.to_string(), i.diff_id.clone());
                if let Some(c) = &l.committed_at {
                    a.insert(ANN_COMMITTED.to_string(), c.clone());
                }
                OciDescriptor {
                    media_type: i.media_type.clone(),
                    digest: i.digest.clone(),
                    size: i.size as i64,
                    annotations: Some(a),
                    ..OciDescriptor::default()
                }
            })
            .collect(),
        artifact_type: Some(ARTIFACT_TYPE.to_string()),
        annotations: Some(ann),
        ..OciImageManifest::default()
    };
    let url = conn
        .client
        .push_manifest(&reference, &manifest.into())
        .await
        .map_err(|e| registry::oci_err("uploading the manifest", &reference, e))?;
    let mut report = report.lock().map(|r| r.clone()).unwrap_or_default();
    report.reference = format!("{repo}:{tag}");
    report.manifest_digest = url.rsplit('/').next().unwrap_or_default().to_string();
    report.layers = layers.len();
    tracing::info!(cache, reference = %report.reference, layers = report.layers,
        uploaded = report.uploaded.len(), mounted = report.mounted.len(), bytes = report.bytes, "pushed");
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
async fn push_layer(
    conn: &registry::Conn,
    reference: &Reference,
    repo_id: &str,
    l: &PushLayer,
    dir: PathBuf,
    blob: PathBuf,
    progress: &indicatif::ProgressBar,
    report: &std::sync::Mutex<PushReport>,
) -> Result<RemoteInfo> {
    let exists = |d: String| async move {
        conn.client
            .blob_exists(reference, &d)
            .await
            .map_err(|e| registry::oci_err("checking a layer blob", reference, e))
    };
    if let Some(r) = &l.recorded {
        if exists(r.digest.clone()).await? {
            tracing::debug!(
                layer = l.name,
                digest = r.digest,
                "the registry has this layer"
            );
            return Ok(RemoteInfo {
                repo: Some(repo_id.to_string()),
                ..r.clone()
            });
        }
        // Cross-repository mount from where it was last seen on the same registry.
        if let Some(src) = r.repo.as_deref().filter(|s| *s != repo_id) {
            if let Some(src_repo) = src.strip_prefix(&format!("{}/", reference.resolve_registry()))
            {
                let src_ref = Reference::with_tag(
                    reference.resolve_registry().to_string(),
                    src_repo.to_string(),
                    "latest".to_string(),
                );
                if conn
                    .client
                    .mount_blob(reference, &src_ref, &r.digest)
                    .await
                    .is_ok()
                    && exists(r.digest.clone()).await?
                {
                    if let Ok(mut rep) = report.lock() {
                        rep.mounted.push(r.digest.clone());
                    }
                    return Ok(RemoteInfo {
                        repo: Some(repo_id.to_string()),
                        ..r.clone()
                    });
                }
            }
        }
    }
    let d = dir.clone();
    let b = blob.clone();
    let info = blocking(move || layer::export_layer(&d, &b)).await?;
    if let Ok(mut rep) = report.lock() {
        rep.exported += 1;
    }
    if let Some(r) = &l.recorded {
        if r.digest != info.digest {
            tracing::warn!(layer = l.name, recorded = r.digest, now = info.digest,
                "a layer tarred again gave another digest (another zstd version?); using the new one");
        }
    }
    let ri = RemoteInfo {
        digest: info.digest.clone(),
        diff_id: info.diff_id.clone(),
        size: info.size,
        media_type: layer::MEDIA_ZSTD.to_string(),
        repo: Some(repo_id.to_string()),
    };
    if !exists(info.digest.clone()).await? {
        progress.inc_length(info.size);
        progress.set_message(l.name.clone());
        // Streamed from the file: a layer of any size costs one buffer of memory.
        let file = tokio::fs::File::open(&blob)
            .await
            .map_err(|e| Error::io("opening layer blob", &blob, e))?;
        let body = futures_util::stream::unfold(file, |mut f| async move {
            use tokio::io::AsyncReadExt;
            let mut buf = vec![0u8; 1 << 20];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(bytes::Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e.into()), f)),
            }
        });
        conn.client
            .push_blob_stream(reference, body, &info.digest, Some(info.size))
            .await
            .map_err(|e| registry::oci_err("uploading a layer blob", reference, e))?;
        progress.inc(info.size);
        if let Ok(mut rep) = report.lock() {
            rep.uploaded.push(info.digest.clone());
            rep.bytes += info.size;
        }
    }
    let _ = tokio::fs::remove_file(&blob).await;
    Ok(ri)
}

async fn record_digests(
    store: &Store,
    cache: &str,
    layers: &[PushLayer],
    infos: &[RemoteInfo],
    _repo: &str,
) -> Result<()> {
    let changed: Vec<(String, RemoteInfo)> = layers
        .iter()
        .zip(infos)
        .filter(|(l, i)| l.recorded.as_ref() != Some(i))
        .map(|(l, i)| (l.name.clone(), i.clone()))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let store = store.clone();
    let cache = cache.to_string();
    blocking(move || {
        let _l = store.lock_cache(&cache)?;
        let Some(mut st) = store.load_state(&cache)? else {
            return Ok(());
        };
        for (name, info) in changed {
            if let Some(rec) = st.layers.get_mut(&name) {
                rec.set_ext(
                    STATE_KEY,
                    serde_json::to_value(&info).map_err(|e| rerr(e.to_string()))?,
                );
            }
        }
        crate::failpoint!("remote::push_before_record");
        store.save_state(&cache, &st)
    })
    .await
}

/// One layer of a pulled manifest.
#[derive(Debug, Clone)]
struct PullLayer {
    name: String,
    desc: OciDescriptor,
    diff_id: Option<String>,
    committed_at: Option<String>,
}

fn check_manifest(m: &OciImageManifest, reference: &str) -> Result<Vec<PullLayer>> {
    let at = m
        .artifact_type
        .as_deref()
        .unwrap_or(m.config.media_type.as_str());
    if at != ARTIFACT_TYPE && m.config.media_type != ARTIFACT_TYPE {
        return Err(rerr(format!(
            "{reference} is not a cachedriver snapshot (its artifact type is {at:?}, not {ARTIFACT_TYPE:?})"
        )));
    }
    if m.layers.is_empty() || m.layers.len() > crate::state::MAX_CHAIN {
        return Err(rerr(format!(
            "{reference}: a snapshot has 1 to {} layers, this one {}",
            crate::state::MAX_CHAIN,
            m.layers.len()
        )));
    }
    let mut out = Vec::new();
    for (i, d) in m.layers.iter().enumerate() {
        if ![layer::MEDIA_ZSTD, layer::MEDIA_GZIP, layer::MEDIA_TAR]
            .contains(&d.media_type.as_str())
        {
            return Err(rerr(format!(
                "{reference}: layer {i} has media type {:?}, which is not an OCI layer tar",
                d.media_type
            )));
        }
        if !d.digest.starts_with("sha256:")
            || d.digest.len() != 71
            || !d.digest[7..].bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(rerr(format!(
                "{reference}: layer {i} has a bad digest {:?}",
                d.digest
            )));
        }
        let ann = d.annotations.clone().unwrap_or_default();
        let name = ann
            .get(ANN_LAYER)
            .filter(|n| crate::names::is_valid_layer(n) && !n.starts_with('.'))
            .cloned()
            .unwrap_or_else(|| format!("r.{}", &d.digest[7..19]));
        out.push(PullLayer {
            name,
            desc: d.clone(),
            diff_id: ann.get(ANN_DIFF_ID).cloned(),
            committed_at: ann.get(ANN_COMMITTED).cloned(),
        });
    }
    Ok(out)
}

/// For each pulled layer (bottom-up), the local layer that already holds it: same digest on the
/// same parent. Stops at the first miss: everything above sits on a new layer.
fn plan(state: Option<&CacheState>, layers: &[PullLayer]) -> Vec<Option<String>> {
    let mut out = vec![None; layers.len()];
    let Some(st) = state else {
        return out;
    };
    let mut parent: Option<String> = None;
    for (i, l) in layers.iter().enumerate() {
        let found = st.layers.iter().find(|(_, rec)| {
            rec.parent == parent && remote_info(rec).is_some_and(|r| r.digest == l.desc.digest)
        });
        match found {
            Some((name, _)) => {
                out[i] = Some(name.clone());
                parent = Some(name.clone());
            }
            None => break,
        }
    }
    out
}

/// Removes `.tmp-pull-*` leftovers of an interrupted pull (caller holds the maintenance lock).
fn remove_leftovers(store: &Store, cache: &str) -> Result<()> {
    let dir = store.cache_dir(cache);
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let n = e.file_name();
        let b = n.as_encoded_bytes();
        if b.starts_with(TMP_PREFIX.as_bytes()) || b.starts_with(b".tmp-push-") {
            tracing::info!(cache, path = %e.path().display(), "removing a leftover of an interrupted push/pull");
            remove_tree(&e.path())?;
        }
    }
    Ok(())
}

/// Pulls `repo[:tag]` into `spec`'s cache (see the module doc).
pub async fn pull_async(
    store: &Store,
    repo: &str,
    spec: &str,
    access: &Access,
) -> Result<PullReport> {
    let (cache, _) = parse_cache_spec(spec)?;
    let store_c = store.clone();
    let cache_c = cache.clone();
    let maint = blocking(move || store_c.lock_maintenance(&cache_c)).await?;
    remove_leftovers(store, &cache)?;
    let state = {
        let _l = store.lock_cache(&cache)?;
        store.load_state(&cache)?
    };
    let fetched = fetch(store, repo, spec, access, state.as_ref()).await?;
    let report = fetched.land(store, true)?;
    drop(maint);
    Ok(report)
}

/// A snapshot downloaded and unpacked into `.tmp-pull-*` dirs, not yet in the cache's state.
/// Dropped without [`Fetched::land`], it removes its dirs.
pub struct Fetched {
    cache: String,
    ns: XattrNs,
    layers: Vec<PullLayer>,
    have: Vec<Option<String>>,
    need: Vec<usize>,
    tmp: Vec<PathBuf>,
    repo_id: String,
    report: PullReport,
    landed: bool,
}

impl Drop for Fetched {
    fn drop(&mut self) {
        if !self.landed {
            for i in &self.need {
                let _ = remove_tree(&self.tmp[*i]);
                let _ = std::fs::remove_file(self.tmp[*i].with_extension("blob"));
            }
        }
    }
}

impl Fetched {
    /// Makes the fetched snapshot the cache's latest (see the module doc, step 3). With `lock`
    /// false the caller already holds the cache lock.
    pub fn land(mut self, store: &Store, lock: bool) -> Result<PullReport> {
        if !self.need.is_empty() {
            layer::sync_tree(&store.cache_dir(&self.cache))?;
        }
        crate::failpoint!("remote::pull_after_sync");
        let tmp = self.tmp.clone();
        let tmp_of = move |i: usize| tmp[i].clone();
        let mut report = std::mem::take(&mut self.report);
        switch(
            store,
            &self.cache,
            self.ns,
            &self.layers,
            &self.have,
            &tmp_of,
            &self.repo_id,
            &mut report,
            lock,
        )?;
        self.landed = true;
        tracing::info!(cache = self.cache, reference = %report.reference, layers = report.layers,
            downloaded = report.downloaded.len(), reused = report.reused.len(), bytes = report.bytes,
            latest = report.latest, "pulled");
        Ok(report)
    }
}

/// Reads `repo[:tag]`'s manifest, plans against `state` (the cache's current state, if any) and
/// downloads and unpacks the layers this host lacks. Changes no state.
pub async fn fetch(
    store: &Store,
    repo: &str,
    spec: &str,
    access: &Access,
    state: Option<&CacheState>,
) -> Result<Fetched> {
    let (cache, scope) = parse_cache_spec(spec)?;
    let (repo, tag) = split_repo(repo);
    let tag = tag.unwrap_or_else(|| tag_for(&cache, &scope));
    let reference = reference(&repo, &tag)?;
    let repo_id = format!(
        "{}/{}",
        reference.resolve_registry(),
        reference.repository()
    );
    let shown = format!("{repo}:{tag}");
    let conn = Arc::new(registry::connect(&reference, access, &[RegistryOperation::Pull]).await?);
    let (manifest, _digest) = conn
        .client
        .pull_image_manifest(&reference, &conn.auth)
        .await
        .map_err(|e| registry::oci_err("reading the snapshot manifest", &reference, e))?;
    let layers = check_manifest(&manifest, &shown)?;
    let ns = state
        .and_then(|s| s.xattr)
        .unwrap_or_else(XattrNs::for_this_process);
    let have = plan(state, &layers);
    let need: Vec<usize> = (0..layers.len()).filter(|i| have[*i].is_none()).collect();
    let total: u64 = need
        .iter()
        .map(|i| layers[*i].desc.size.max(0) as u64)
        .sum();
    let stamp = format!("{}-{}", std::process::id(), unique_suffix());
    let cache_dir = store.cache_dir(&cache);
    std::fs::create_dir_all(&cache_dir).ctx("creating cache dir", &cache_dir)?;
    let tmp: Vec<PathBuf> = (0..layers.len())
        .map(|i| cache_dir.join(format!("{TMP_PREFIX}{stamp}-{i}")))
        .collect();
    let fetched = Fetched {
        cache,
        ns,
        layers,
        have,
        need,
        tmp,
        repo_id,
        report: PullReport {
            reference: shown,
            bytes: total,
            ..PullReport::default()
        },
        landed: false,
    };
    let progress = bar(total, "pull");
    use futures_util::stream::{self, StreamExt, TryStreamExt};
    let res: Result<Vec<()>> = stream::iter(fetched.need.iter().copied())
        .map(|i| {
            let conn = conn.clone();
            let reference = reference.clone();
            let l = fetched.layers[i].clone();
            let dest = fetched.tmp[i].clone();
            let progress = progress.clone();
            async move {
                let blob = dest.with_extension("blob");
                let st = fetch_layer(&conn, &reference, &l, &blob, &dest, ns, &progress).await;
                let _ = tokio::fs::remove_file(&blob).await;
                st.map(drop)
            }
        })
        .buffer_unordered(access.concurrency.max(1))
        .try_collect()
        .await;
    progress.finish_and_clear();
    let mut fetched = fetched;
    fetched.report.layers = fetched.layers.len();
    // On error, dropping `fetched` removes what was unpacked.
    res.map(|_| fetched)
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

async fn fetch_layer(
    conn: &registry::Conn,
    reference: &Reference,
    l: &PullLayer,
    _blob: &Path,
    dest: &Path,
    ns: XattrNs,
    progress: &indicatif::ProgressBar,
) -> Result<layer::ImportStats> {
    use futures_util::StreamExt;
    let what = format!("downloading layer {}", l.name);
    let mut sized = conn
        .client
        .pull_blob_stream(reference, &l.desc)
        .await
        .map_err(|e| registry::oci_err(&what, reference, e))?;
    // Unpacked while it downloads: the bytes go through a bounded channel to a blocking thread.
    // oci-client's stream hashes what arrives and ends in an error on a digest mismatch.
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<bytes::Bytes>>(32);
    let media = l.desc.media_type.clone();
    let d = dest.to_path_buf();
    let unpack = tokio::task::spawn_blocking(move || -> Result<layer::ImportStats> {
        std::fs::create_dir(&d).ctx("creating pull dir", &d)?;
        let reader = ChanReader {
            rx,
            cur: bytes::Bytes::new(),
        };
        layer::import_from(
            std::io::BufReader::with_capacity(1 << 20, reader),
            &media,
            &d,
            ns,
        )
    });
    let mut size = 0u64;
    let mut broken: Option<String> = None;
    while let Some(item) = sized.stream.next().await {
        match item {
            Ok(b) => {
                size += b.len() as u64;
                progress.inc(b.len() as u64);
                if tx.send(Ok(b)).await.is_err() {
                    // The unpacker stopped (its error is reported below).
                    break;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = tx.send(Err(std::io::Error::other(msg.clone()))).await;
                broken = Some(msg);
                break;
            }
        }
    }
    drop(tx);
    let st = unpack
        .await
        .map_err(|e| rerr(format!("the unpacking thread failed: {e}")))?;
    if let Some(e) = broken {
        return Err(rerr(format!(
            "{what} from {reference}: {e} (the transfer broke, or the blob does not match its digest)"
        )));
    }
    let st = st?;
    if size != l.desc.size.max(0) as u64 {
        return Err(rerr(format!(
            "layer {} does not match its digest: expected {} bytes, got {size}",
            l.name, l.desc.size
        )));
    }
    crate::failpoint!("remote::pull_after_download");
    if let Some(want) = &l.diff_id {
        if *want != st.diff_id {
            return Err(rerr(format!(
                "layer {} unpacks to diffID {}, not the {want} its manifest says",
                l.name, st.diff_id
            )));
        }
    }
    crate::failpoint!("remote::pull_after_unpack");
    Ok(st)
}

/// A blocking reader over the chunks the download sends.
struct ChanReader {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<bytes::Bytes>>,
    cur: bytes::Bytes,
}

impl std::io::Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                None => return Ok(0),
                Some(Ok(b)) => self.cur = b,
                Some(Err(e)) => return Err(e),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        Ok(n)
    }
}

/// Under the cache lock: renames the unpacked layers into place and writes the state last.
#[allow(clippy::too_many_arguments)]
fn switch(
    store: &Store,
    cache: &str,
    ns: XattrNs,
    layers: &[PullLayer],
    have: &[Option<String>],
    tmp_of: &dyn Fn(usize) -> PathBuf,
    repo_id: &str,
    report: &mut PullReport,
    lock: bool,
) -> Result<()> {
    let _l = if lock {
        Some(store.lock_cache(cache)?)
    } else {
        None
    };
    let mut st = match store.load_state(cache)? {
        Some(s) => s,
        None => {
            let mut s = CacheState::new(ns);
            // No empty `0` for a cache that starts as a pulled snapshot.
            s.layers.clear();
            s
        }
    };
    if st.xattr.is_some_and(|x| x != ns) {
        return Err(Error::Conflict(format!(
            "cache {cache:?} changed xattr namespace during the pull"
        )));
    }
    let mut parent: Option<String> = None;
    let mut placed: Vec<(String, PathBuf)> = Vec::new();
    let mut records: Vec<(String, LayerInfo)> = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        if let Some(name) = &have[i] {
            // Still there and on the same parent? (the maintenance lock keeps GC away)
            let ok = st.layers.get(name).is_some_and(|r| r.parent == parent)
                && store.layer_dir(cache, name).is_dir();
            if !ok {
                return Err(rerr(format!(
                    "cache {cache:?}: layer {name:?} changed during the pull; try again"
                )));
            }
            report.reused.push(name.clone());
            parent = Some(name.clone());
            continue;
        }
        let taken =
            |n: &str| store.layer_dir(cache, n).exists() || records.iter().any(|(r, _)| r == n);
        let name = st.unique_layer_name(&l.name, taken);
        let dest = store.layer_dir(cache, &name);
        std::fs::rename(tmp_of(i), &dest).ctx("moving a pulled layer into place", &dest)?;
        placed.push((name.clone(), dest));
        crate::failpoint!("remote::pull_after_rename");
        let mut rec = LayerInfo::default();
        rec.parent = parent.clone();
        rec.committed_at = l.committed_at.clone();
        let info = RemoteInfo {
            digest: l.desc.digest.clone(),
            diff_id: l.diff_id.clone().unwrap_or_default(),
            size: l.desc.size.max(0) as u64,
            media_type: l.desc.media_type.clone(),
            repo: Some(repo_id.to_string()),
        };
        rec.set_ext(
            STATE_KEY,
            serde_json::to_value(&info).map_err(|e| rerr(e.to_string()))?,
        );
        records.push((name.clone(), rec));
        report.downloaded.push(name.clone());
        parent = Some(name);
    }
    let top = parent.ok_or_else(|| rerr("empty snapshot"))?;
    report.latest = top.clone();
    if records.is_empty() && st.state.latest == top {
        return Ok(());
    }
    let undo = |placed: &[(String, PathBuf)]| {
        for (_, d) in placed {
            let _ = remove_tree(d);
        }
    };
    let res = (|| -> Result<()> {
        fsync_dir(&store.cache_dir(cache))?;
        crate::failpoint!("remote::pull_before_state");
        for (n, r) in records {
            st.layers.insert(n, r);
        }
        st.state.latest = top.clone();
        st.format = crate::state::FORMAT;
        st.xattr = Some(ns);
        store.save_state(cache, &st)
    })();
    if let Err(e) = res {
        undo(&placed);
        return Err(e);
    }
    crate::failpoint!("remote::pull_after_state");
    report.switched = true;
    Ok(())
}

#[cfg(test)]
mod tests;
