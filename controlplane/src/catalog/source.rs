//! Where declared config comes from, behind one trait: [`Source`]. [`Directory`] watches a
//! directory of YAML manifests (the embedded default, no cluster needed); a Kubernetes
//! source through kube-rs implements the same trait.
//!
//! The directory is polled (a few stat calls every [`POLL_INTERVAL`]), which works the same
//! on every filesystem, including the ConfigMap volumes whose symlink swaps inotify misses; a
//! change is read only once the files stop changing for [`QUIET`], so an editor's burst of
//! writes, or `cp -r` of many files, becomes one update.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::Deserialize as _;

use super::{Declared, Object, Origin, Problem};

/// How often the directory is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the files must stay unchanged before a change is read.
pub const QUIET: Duration = Duration::from_millis(50);
/// Longest a stream of changes can postpone reading them.
pub const MAX_DEBOUNCE: Duration = Duration::from_millis(500);

/// A source of declared objects.
pub trait Source: Send + 'static {
    /// Resolves with everything declared: at once the first time, then whenever it may have
    /// changed.
    fn next(&mut self) -> impl Future<Output = Declared> + Send;
}

/// A directory of YAML manifests (any depth; `*.yaml` and `*.yml`, several documents per
/// file allowed).
#[derive(Debug)]
pub struct Directory {
    root: PathBuf,
    seen: Option<Fingerprint>,
}

/// Per file: path, length, modification time, inode and change time (a rename changes the
/// inode, an in-place write the times), so a same-length edit is seen too.
type Fingerprint = Result<Vec<(PathBuf, u64, Option<SystemTime>, u64, i64)>, String>;

impl Directory {
    /// Watches `root`.
    pub fn new(root: impl Into<PathBuf>) -> Directory {
        Directory {
            root: root.into(),
            seen: None,
        }
    }

    async fn fingerprint(&self) -> Fingerprint {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || fingerprint(&root))
            .await
            .unwrap_or_else(|e| Err(e.to_string()))
    }
}

impl Source for Directory {
    async fn next(&mut self) -> Declared {
        let mut now = self.fingerprint().await;
        if self.seen.is_some() {
            while Some(&now) == self.seen.as_ref() {
                tokio::time::sleep(POLL_INTERVAL).await;
                now = self.fingerprint().await;
            }
            // Changed: wait for it to settle.
            let started = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(QUIET).await;
                let again = self.fingerprint().await;
                if again == now || started.elapsed() >= MAX_DEBOUNCE {
                    now = again;
                    break;
                }
                now = again;
            }
        }
        self.seen = Some(now);
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || load(&root))
            .await
            .unwrap_or_default()
    }
}

/// Collects the manifests under `dir`. Hidden entries (editor lock and swap files,
/// ConfigMap internals) are skipped; an entry that cannot be read is reported in `errors`
/// and skipped, so one unreadable file or directory (a `lost+found`) does not hide the rest.
fn walk(dir: &Path, files: &mut Vec<PathBuf>, errors: &mut Vec<(PathBuf, String)>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            errors.push((dir.to_owned(), error.to_string()));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                errors.push((dir.to_owned(), error.to_string()));
                continue;
            }
        };
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        let manifest = matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml")
        );
        // Follows symlinks: ConfigMap volumes are made of them.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => walk(&path, files, errors),
            Ok(_) if manifest => files.push(path),
            Ok(_) => {}
            Err(error) => errors.push((path, error.to_string())),
        }
    }
}

fn fingerprint(root: &Path) -> Fingerprint {
    let mut files = Vec::new();
    let mut errors = Vec::new();
    walk(root, &mut files, &mut errors);
    if let Some((_, error)) = errors.iter().find(|(path, _)| path == root) {
        return Err(error.clone());
    }
    files.sort();
    Ok(files
        .into_iter()
        .map(|path| {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(&path).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let inode = meta.as_ref().map_or(0, MetadataExt::ino);
            let changed = meta
                .as_ref()
                .map_or(0, |m| m.ctime_nsec() + m.ctime() * 1_000_000_000);
            let modified = meta.and_then(|m| m.modified().ok());
            (path, len, modified, inode, changed)
        })
        .collect())
}

/// Reads and parses every manifest under `root`.
pub fn load(root: &Path) -> Declared {
    let mut declared = Declared::default();
    let mut files = Vec::new();
    let mut errors = Vec::new();
    walk(root, &mut files, &mut errors);
    for (path, error) in errors {
        let path = path.display().to_string();
        declared.problems.push(Problem {
            origin: Origin {
                file: path.clone(),
                document: 0,
            },
            object: None,
            field: String::new(),
            message: format!("reading it: {error}"),
            kept_previous: true,
        });
        declared.broken_files.insert(path);
    }
    files.sort();
    for path in files {
        let file = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_file(&file, &text, &mut declared),
            Err(error) => {
                declared.problems.push(Problem {
                    origin: Origin {
                        file: file.clone(),
                        document: 0,
                    },
                    object: None,
                    field: String::new(),
                    message: format!("reading the file: {error}"),
                    kept_previous: true,
                });
                declared.broken_files.insert(file);
            }
        }
    }
    declared
}

/// Parses the YAML documents of one file into `declared`. A document that does not parse
/// marks the file broken, so the objects it held before keep their previous versions.
pub fn parse_file(file: &str, text: &str, declared: &mut Declared) {
    for (document, yaml) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let origin = Origin {
            file: file.to_owned(),
            document,
        };
        let value = match serde_yaml::Value::deserialize(yaml) {
            Ok(serde_yaml::Value::Null) => continue,
            Ok(value) => value,
            Err(error) => {
                // A syntax error ends the stream: nothing after it can be trusted.
                declared.refuse(
                    origin,
                    None,
                    String::new(),
                    format!("not valid YAML: {error}"),
                );
                return;
            }
        };
        parse_value(origin, value, declared);
    }
}

/// Parses one declared object (a YAML document, or an object the API server sent) into
/// `declared`. One that does not parse marks its origin broken, so what it held before keeps
/// its previous version.
pub(super) fn parse_value(origin: Origin, value: serde_yaml::Value, declared: &mut Declared) {
    let text_of = |key: &str| {
        value
            .get(key)
            .and_then(serde_yaml::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let (api_version, kind) = (text_of("apiVersion"), text_of("kind"));
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(serde_yaml::Value::as_str)
        .map(|name| format!("{kind} {name}"));
    match parse_object(&api_version, &kind, value) {
        Ok(Some(object)) => declared.objects.push((origin, object)),
        // Another kind (a Deployment beside its Service, say): reported, but the file's
        // own objects are read as usual.
        Ok(None) => declared.problems.push(Problem {
            origin,
            object: name,
            field: "kind".into(),
            message: format!(
                "`{api_version}` `{kind}` is not a kind Tern reads (Service, EndpointSlice, Pod, HTTPRoute, GRPCRoute, and tern.dev's Mesh, MTLSPolicy, AuthorizationPolicy, BackendPolicy, RateLimitPolicy); ignored"
            ),
            kept_previous: false,
        }),
        Err((field, message)) => declared.refuse(origin, name, field, message),
    }
}

fn typed<T: serde::de::DeserializeOwned>(
    value: serde_yaml::Value,
) -> Result<Box<T>, (String, String)> {
    serde_path_to_error::deserialize(value)
        .map(Box::new)
        .map_err(|error| {
            let path = error.path().to_string();
            let field = if path == "." { String::new() } else { path };
            (field, error.into_inner().to_string())
        })
}

/// The typed object of a document, or `None` for a kind Tern does not read.
fn parse_object(
    api_version: &str,
    kind: &str,
    value: serde_yaml::Value,
) -> Result<Option<Object>, (String, String)> {
    Ok(Some(match (api_version, kind) {
        ("v1", "Service") => Object::Service(typed(value)?),
        ("v1", "Pod") => Object::Pod(typed(value)?),
        ("discovery.k8s.io/v1", "EndpointSlice") => Object::EndpointSlice(typed(value)?),
        ("gateway.networking.k8s.io/v1" | "gateway.networking.k8s.io/v1beta1", "HTTPRoute") => {
            Object::HttpRoute(typed(value)?)
        }
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => {
            let route: Box<super::gateway::GrpcRoute> = typed(value)?;
            Object::HttpRoute(Box::new(route.into_http_route()?))
        }
        ("tern.dev/v1alpha1", "Mesh") => Object::Mesh(typed(value)?),
        ("tern.dev/v1alpha1", "MTLSPolicy") => Object::MtlsPolicy(typed(value)?),
        ("tern.dev/v1alpha1", "AuthorizationPolicy") => Object::AuthorizationPolicy(typed(value)?),
        ("tern.dev/v1alpha1", "BackendPolicy") => Object::BackendPolicy(typed(value)?),
        ("tern.dev/v1alpha1", "RateLimitPolicy") => Object::RateLimitPolicy(typed(value)?),
        _ => return Ok(None),
    }))
}
