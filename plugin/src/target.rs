//! `dpd/NAME`, `dpd NAME`, `deviceprocessdeployment.azure.com/NAME`: which deployment is meant.

use crate::Error;

/// Names kubectl would accept for the DeviceProcessDeployment resource.
const TYPES: [&str; 6] = [
    "dpd",
    "deviceprocessdeployment",
    "deviceprocessdeployments",
    "deviceprocessdeployment.azure.com",
    "deviceprocessdeployments.azure.com",
    "deviceprocessdeployments.v1alpha1.azure.com",
];

/// The deployment's name from the command line's `TYPE/NAME` or `TYPE NAME`.
pub fn deployment_name(target: &[String]) -> Result<String, Error> {
    let (kind, name) = match target {
        [one] => one.split_once('/').ok_or_else(|| {
            Error::Target(format!(
                "{one:?}: name the deployment as dpd/NAME (or: dpd NAME)"
            ))
        })?,
        [kind, name] => (kind.as_str(), name.as_str()),
        _ => return Err(Error::Target("name one deployment: dpd/NAME".into())),
    };
    if !TYPES.contains(&kind.to_ascii_lowercase().as_str()) {
        return Err(Error::Target(format!(
            "{kind:?} is not a DeviceProcessDeployment (use dpd/NAME)"
        )));
    }
    if name.is_empty() || name.contains('/') {
        return Err(Error::Target(format!("{name:?} is not a deployment name")));
    }
    Ok(name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(parts: &[&str]) -> Result<String, Error> {
        deployment_name(&parts.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>())
    }

    #[test]
    fn kubectl_forms_name_the_deployment() {
        assert_eq!(parse(&["dpd/bgp"]).ok().as_deref(), Some("bgp"));
        assert_eq!(parse(&["dpd", "bgp"]).ok().as_deref(), Some("bgp"));
        assert_eq!(
            parse(&["deviceprocessdeployment.azure.com/bgp"])
                .ok()
                .as_deref(),
            Some("bgp")
        );
        assert!(parse(&["deployment/bgp"]).is_err());
        assert!(parse(&["bgp"]).is_err());
        assert!(parse(&["dpd/"]).is_err());
    }
}
