//! Request counts from the apiserver's audit log: what the real kube-apiserver served, by user,
//! verb, resource and namespace.

use std::collections::HashSet;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::Deserialize;

/// Audit verbs that change something.
pub const WRITE_VERBS: [&str; 5] = ["create", "update", "patch", "delete", "deletecollection"];

/// One request the apiserver served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiRequest {
    /// Authenticated username, e.g. `system:serviceaccount:ns:apollo-gateway`.
    pub user: String,
    /// Audit verb: get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// API group ("" for core).
    pub group: String,
    /// Resource plural ("" for non-resource URLs).
    pub resource: String,
    /// Subresource ("" for the main resource).
    pub subresource: String,
    /// Namespace ("" for cluster-scoped requests).
    pub namespace: String,
    /// Object name, when the request named one.
    pub name: String,
    /// HTTP status code of the answer (0 when the log has none).
    pub code: u16,
    /// The request URI.
    pub uri: String,
}

impl ApiRequest {
    /// Whether the verb changes something.
    pub fn is_write(&self) -> bool {
        WRITE_VERBS.contains(&self.verb.as_str())
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Event {
    #[serde(rename = "auditID")]
    audit_id: String,
    stage: String,
    verb: String,
    #[serde(default)]
    request_uri: String,
    user: User,
    #[serde(default)]
    object_ref: Option<ObjectRef>,
    #[serde(default)]
    response_status: Option<ResponseStatus>,
}

#[derive(Deserialize)]
struct User {
    #[serde(default)]
    username: String,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct ObjectRef {
    #[serde(default)]
    resource: String,
    #[serde(default)]
    namespace: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    api_group: String,
    #[serde(default)]
    subresource: String,
}

#[derive(Deserialize)]
struct ResponseStatus {
    #[serde(default)]
    code: u16,
}

/// A reader of the audit log that remembers where it is: each call parses only what was
/// appended since. A request is counted once (a watch logs ResponseStarted and, when it ends,
/// ResponseComplete; both carry the same auditID).
pub struct AuditLog {
    path: PathBuf,
    state: Mutex<State>,
}

struct State {
    offset: u64,
    partial: Vec<u8>,
    seen: HashSet<String>,
    requests: Vec<ApiRequest>,
}

impl AuditLog {
    /// Counts requests logged from now on.
    pub fn from_end(path: &Path) -> Self {
        let offset = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        Self {
            path: path.to_owned(),
            state: Mutex::new(State {
                offset,
                partial: Vec::new(),
                seen: HashSet::new(),
                requests: Vec::new(),
            }),
        }
    }

    /// Counts every request in the log.
    pub fn from_start(path: &Path) -> Self {
        let log = Self::from_end(path);
        log.state.lock().unwrap_or_else(|e| e.into_inner()).offset = 0;
        log
    }

    /// Every request logged since this reader started or was last reset.
    pub fn requests(&self) -> Vec<ApiRequest> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.read_more(&self.path);
        state.requests.clone()
    }

    /// Forgets what was counted so far (requests logged later are counted).
    pub fn reset(&self) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.read_more(&self.path);
        state.requests.clear();
    }
}

impl State {
    fn read_more(&mut self, path: &Path) {
        let Ok(mut file) = std::fs::File::open(path) else {
            return;
        };
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        if len < self.offset {
            // A new log (the control plane restarted in the same directory): start over.
            self.offset = 0;
            self.partial.clear();
        }
        if file.seek(SeekFrom::Start(self.offset)).is_err() {
            return;
        }
        let mut fresh = Vec::new();
        let Ok(n) = file.read_to_end(&mut fresh) else {
            return;
        };
        self.offset += n as u64;
        self.partial.extend_from_slice(&fresh);
        // Only complete lines; a line being written stays for the next call.
        let Some(last_newline) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=last_newline).collect();
        for line in complete.split(|b| *b == b'\n') {
            if line.is_empty() {
                continue;
            }
            let Ok(event) = serde_json::from_slice::<Event>(line) else {
                continue;
            };
            if event.stage == "RequestReceived" || !self.seen.insert(event.audit_id.clone()) {
                continue;
            }
            let object = event.object_ref.unwrap_or_default();
            self.requests.push(ApiRequest {
                user: event.user.username,
                verb: event.verb,
                group: object.api_group,
                resource: object.resource,
                subresource: object.subresource,
                namespace: object.namespace,
                name: object.name,
                code: event.response_status.map(|s| s.code).unwrap_or(0),
                uri: event.request_uri,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(id: &str, stage: &str, verb: &str, resource: &str) -> String {
        format!(
            r#"{{"auditID":"{id}","stage":"{stage}","verb":"{verb}","requestURI":"/x","user":{{"username":"u"}},"objectRef":{{"resource":"{resource}","namespace":"ns","apiGroup":"azure.com","subresource":"status"}},"responseStatus":{{"code":200}}}}"#
        )
    }

    #[test]
    fn counts_each_request_once_and_only_complete_lines() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("audit.log");
        let mut file = std::fs::File::create(&path).expect("create");
        writeln!(file, "{}", line("a", "ResponseStarted", "watch", "leases")).expect("write");
        writeln!(file, "{}", line("a", "ResponseComplete", "watch", "leases")).expect("write");
        writeln!(
            file,
            "{}",
            line("b", "ResponseComplete", "patch", "deviceprocesses")
        )
        .expect("write");
        write!(file, "{}", &line("c", "ResponseComplete", "get", "x")[..20]).expect("write");
        let log = AuditLog::from_start(&path);
        let requests = log.requests();
        assert_eq!(requests.len(), 2, "{requests:?}");
        assert_eq!(requests[1].verb, "patch");
        assert_eq!(requests[1].subresource, "status");
        assert!(requests[1].is_write());
        assert!(!requests[0].is_write());
        writeln!(file, "{}", &line("c", "ResponseComplete", "get", "x")[20..]).expect("write");
        assert_eq!(log.requests().len(), 3);
        log.reset();
        assert!(log.requests().is_empty());
        writeln!(
            file,
            "{}",
            line("d", "ResponseComplete", "create", "events")
        )
        .expect("write");
        assert_eq!(log.requests().len(), 1);
    }
}
