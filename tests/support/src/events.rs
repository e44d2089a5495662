use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams};

/// The events.k8s.io/v1 Events listed by `api` with reason `reason` about an object named
/// `name`, and of kind `kind` when one is given. Panics when the list fails.
pub async fn events_about(
    api: &Api<Event>,
    name: &str,
    kind: Option<&str>,
    reason: &str,
) -> Vec<Event> {
    api.list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            let regarding = e.regarding.as_ref();
            e.reason.as_deref() == Some(reason)
                && regarding.and_then(|r| r.name.as_deref()) == Some(name)
                && kind.is_none_or(|kind| regarding.and_then(|r| r.kind.as_deref()) == Some(kind))
        })
        .collect()
}
