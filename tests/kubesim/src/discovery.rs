//! Legacy JSON discovery (`/api`, `/apis`, `/apis/{g}/{v}`) and the minimal `/openapi/v3` that lets
//! `kubectl apply` use server-side field validation instead of downloading an OpenAPI v2 schema.

use std::collections::BTreeMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::Arc;

use serde_json::{json, Value};

use crate::kinds::KindInfo;

/// Kubernetes version ordering: GA before beta before alpha, higher numbers first.
fn version_priority(version: &str) -> (u8, u64, u64) {
    let Some(rest) = version.strip_prefix('v') else {
        return (0, 0, 0);
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let major: u64 = digits.parse().unwrap_or(0);
    let suffix = &rest[digits.len()..];
    if suffix.is_empty() {
        return (3, major, 0);
    }
    let (level, number) = if let Some(n) = suffix.strip_prefix("beta") {
        (2, n)
    } else if let Some(n) = suffix.strip_prefix("alpha") {
        (1, n)
    } else {
        return (0, 0, 0);
    };
    (level, major, number.parse().unwrap_or(0))
}

/// Groups with their versions, most preferred first.
fn groups(kinds: &[Arc<KindInfo>]) -> BTreeMap<String, Vec<String>> {
    let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for kind in kinds {
        let versions = groups.entry(kind.group.clone()).or_default();
        if !versions.contains(&kind.version) {
            versions.push(kind.version.clone());
        }
    }
    for versions in groups.values_mut() {
        versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
    }
    groups
}

pub fn api_versions(server_address: &str) -> Value {
    json!({
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}],
    })
}

fn group_entry(name: &str, versions: &[String]) -> Value {
    let listed: Vec<Value> = versions
        .iter()
        .map(|v| json!({"groupVersion": format!("{name}/{v}"), "version": v}))
        .collect();
    let preferred = listed.first().cloned().unwrap_or(Value::Null);
    json!({"name": name, "versions": listed, "preferredVersion": preferred})
}

pub fn api_group_list(kinds: &[Arc<KindInfo>]) -> Value {
    let groups: Vec<Value> = groups(kinds)
        .iter()
        .filter(|(name, _)| !name.is_empty())
        .map(|(name, versions)| group_entry(name, versions))
        .collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

pub fn api_group(kinds: &[Arc<KindInfo>], group: &str) -> Option<Value> {
    let groups = groups(kinds);
    let versions = groups.get(group).filter(|_| !group.is_empty())?;
    let mut entry = group_entry(group, versions);
    entry["kind"] = json!("APIGroup");
    entry["apiVersion"] = json!("v1");
    Some(entry)
}

const ALL_VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const SUBRESOURCE_VERBS: &[&str] = &["get", "patch", "update"];

/// The `APIResourceList` for one group/version, or None when nothing is served there.
pub fn api_resource_list(kinds: &[Arc<KindInfo>], group: &str, version: &str) -> Option<Value> {
    let mut resources = Vec::new();
    for kind in kinds
        .iter()
        .filter(|k| k.group == group && k.version == version)
    {
        let mut main = json!({
            "name": kind.plural,
            "singularName": kind.singular,
            "namespaced": kind.namespaced,
            "kind": kind.kind,
            "verbs": ALL_VERBS,
        });
        if !kind.short_names.is_empty() {
            main["shortNames"] = json!(kind.short_names);
        }
        if !kind.categories.is_empty() {
            main["categories"] = json!(kind.categories);
        }
        resources.push(main);
        if kind.status_subresource {
            resources.push(json!({
                "name": format!("{}/status", kind.plural),
                "singularName": "",
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": SUBRESOURCE_VERBS,
            }));
        }
        if kind.scale.is_some() {
            resources.push(json!({
                "name": format!("{}/scale", kind.plural),
                "singularName": "",
                "namespaced": kind.namespaced,
                "group": "autoscaling",
                "version": "v1",
                "kind": "Scale",
                "verbs": SUBRESOURCE_VERBS,
            }));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(
        json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    )
}

/// `api/v1` or `apis/{group}/{version}`: how OpenAPI v3 names a group/version.
fn openapi_path(group: &str, version: &str) -> String {
    if group.is_empty() {
        format!("api/{version}")
    } else {
        format!("apis/{group}/{version}")
    }
}

fn document_hash(kinds: &[&Arc<KindInfo>]) -> String {
    let mut hasher = DefaultHasher::new();
    for kind in kinds {
        kind.kind.hash(&mut hasher);
        kind.plural.hash(&mut hasher);
        kind.namespaced.hash(&mut hasher);
    }
    format!("{:016X}", hasher.finish())
}

/// `GET /openapi/v3`: one entry per served group/version.
pub fn openapi_index(kinds: &[Arc<KindInfo>]) -> Value {
    let mut paths = serde_json::Map::new();
    for (group, versions) in groups(kinds) {
        for version in versions {
            let members: Vec<&Arc<KindInfo>> = kinds
                .iter()
                .filter(|k| k.group == group && k.version == version)
                .collect();
            let path = openapi_path(&group, &version);
            let url = format!("/openapi/v3/{path}?hash={}", document_hash(&members));
            paths.insert(path, json!({"serverRelativeURL": url}));
        }
    }
    json!({"paths": paths})
}

/// The OpenAPI v3 document for one group/version: a PATCH operation per kind that declares the
/// `fieldValidation` parameter, which is all `kubectl`'s field-validation check looks for. The
/// patch content types deliberately omit strategic merge, so `kubectl apply` builds its patches
/// from its compiled-in types (built-ins) or as JSON merge patches (custom resources).
pub fn openapi_document(kinds: &[Arc<KindInfo>], path: &str) -> Option<Value> {
    let members: Vec<&Arc<KindInfo>> = kinds
        .iter()
        .filter(|k| openapi_path(&k.group, &k.version) == path)
        .collect();
    if members.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    for kind in &members {
        let prefix = if kind.group.is_empty() {
            format!("/api/{}", kind.version)
        } else {
            format!("/apis/{}/{}", kind.group, kind.version)
        };
        let item_path = if kind.namespaced {
            format!("{prefix}/namespaces/{{namespace}}/{}/{{name}}", kind.plural)
        } else {
            format!("{prefix}/{}/{{name}}", kind.plural)
        };
        let query = |name: &str| json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}});
        let content = json!({
            "application/json-patch+json": {"schema": {"type": "object"}},
            "application/merge-patch+json": {"schema": {"type": "object"}},
            "application/apply-patch+yaml": {"schema": {"type": "object"}},
        });
        paths.insert(
            item_path,
            json!({
                "patch": {
                    "operationId": format!("patch{}", kind.kind),
                    "parameters": [query("dryRun"), query("fieldManager"), query("fieldValidation"), query("force")],
                    "requestBody": {"content": content, "required": true},
                    "responses": {"200": {"description": "OK"}},
                    "x-kubernetes-action": "patch",
                    "x-kubernetes-group-version-kind": {"group": kind.group, "version": kind.version, "kind": kind.kind},
                }
            }),
        );
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes (kubesim)", "version": crate::SERVER_GIT_VERSION},
        "paths": paths,
        "components": {"schemas": {}},
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::built_in_kinds;

    #[test]
    fn versions_sort_like_kubernetes() {
        let mut versions = vec!["v1alpha1", "v2beta1", "v1", "v1beta2", "v2"];
        versions.sort_by_key(|v| std::cmp::Reverse(version_priority(v)));
        assert_eq!(versions, vec!["v2", "v1", "v2beta1", "v1beta2", "v1alpha1"]);
    }

    #[test]
    fn statefulset_scale_is_announced_as_autoscaling_v1() {
        let kinds: Vec<Arc<KindInfo>> = built_in_kinds().into_iter().map(Arc::new).collect();
        let list = api_resource_list(&kinds, "apps", "v1").expect("apps/v1");
        let scale = list["resources"]
            .as_array()
            .expect("resources")
            .iter()
            .find(|r| r["name"] == "statefulsets/scale")
            .expect("scale entry");
        assert_eq!(
            (scale["group"].as_str(), scale["kind"].as_str()),
            (Some("autoscaling"), Some("Scale"))
        );
        let index = openapi_index(&kinds);
        assert!(index["paths"]["apis/apps/v1"]["serverRelativeURL"]
            .as_str()
            .is_some_and(|u| u.starts_with("/openapi/v3/apis/apps/v1?hash=")));
        let document = openapi_document(&kinds, "api/v1").expect("core document");
        let patch = &document["paths"]["/api/v1/namespaces/{namespace}/configmaps/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"]["kind"],
            "ConfigMap"
        );
    }
}
