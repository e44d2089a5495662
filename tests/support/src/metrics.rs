//! Reading what an admin `/metrics` endpoint answers: the Prometheus / OpenMetrics text format.
//!
//! A sample line is `name{label="value",...} value [timestamp]` (the braces are absent when a
//! sample has no labels); lines starting with `#` (`# HELP`, `# TYPE`, `# EOF`) are not samples.
//! Label values may contain `{`, `}` and `,` (route templates do), so labels are split with
//! quotes and escapes in mind.
//!
//! Tests look samples up by exact metric name plus label filters written the way the exposition
//! writes a label pair, e.g. `r#"code="304""#`:
//!
//! ```
//! use apollo_test_support::metrics;
//! let text = "# TYPE http_requests_total counter\n\
//!             http_requests_total{route=\"/v1/{device}\",code=\"200\"} 7\n\
//!             http_requests_total{route=\"/v1/{device}\",code=\"304\"} 3\n";
//! assert_eq!(metrics::value(text, "http_requests_total", &[]), Some(10.0));
//! assert_eq!(metrics::value(text, "http_requests_total", &[r#"code="304""#]), Some(3.0));
//! assert_eq!(metrics::value(text, "http_requests", &[]), None);
//! ```

/// One sample line of an exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample<'a> {
    /// Metric name as exported, suffix included (e.g. `apollo_gateway_resyncs_total`).
    pub name: &'a str,
    /// Label pairs exactly as written, e.g. `code="304"`; empty for an unlabelled sample.
    pub labels: Vec<&'a str>,
    /// The sample value.
    pub value: f64,
}

/// Every sample of `text`, in order. Comment lines, blank lines and lines that do not parse as
/// a sample are skipped.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(parse_sample)
}

/// Sum of the samples named exactly `name` that carry every label pair of `label_filters`
/// (each written as in the exposition, e.g. `r#"result="ok""#`); `None` when no sample matches.
///
/// With no filters this is the metric's total over all label sets; with a filter for every label
/// it is the value of that one sample.
pub fn value(text: &str, name: &str, label_filters: &[&str]) -> Option<f64> {
    let mut matching = samples(text)
        .filter(|s| s.name == name && label_filters.iter().all(|f| s.labels.contains(f)))
        .map(|s| s.value)
        .peekable();
    matching.peek()?;
    Some(matching.sum())
}

/// `GET url` (an admin `/metrics` endpoint) and the body text, whatever the status.
pub async fn fetch(http: &reqwest::Client, url: &str) -> reqwest::Result<String> {
    http.get(url).send().await?.text().await
}

/// [`fetch`]es `url` and returns [`value`]`(name, label_filters)`, 0 when no sample matches
/// (a counter or labelled family that was never incremented is not exported). Panics when the
/// endpoint cannot be read.
pub async fn scrape(http: &reqwest::Client, url: &str, name: &str, label_filters: &[&str]) -> f64 {
    let text = fetch(http, url)
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    value(&text, name, label_filters).unwrap_or(0.0)
}

/// Parses `name{labels} value [timestamp]`; `None` for comments and anything else.
fn parse_sample(line: &str) -> Option<Sample<'_>> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let (labels, rest) = match line[name_end..].strip_prefix('{') {
        Some(inside) => {
            let (labels, len) = split_labels(inside)?;
            (labels, &inside[len + 1..])
        }
        None => (Vec::new(), &line[name_end..]),
    };
    let value = rest.split_whitespace().next()?.parse().ok()?;
    Some(Sample {
        name,
        labels,
        value,
    })
}

/// Splits the text after a sample's `{` into its label pairs, up to the closing `}` (which is
/// not inside a quoted value); returns the pairs and the byte offset of that `}`.
fn split_labels(inside: &str) -> Option<(Vec<&str>, usize)> {
    fn push<'a>(pairs: &mut Vec<&'a str>, pair: &'a str) {
        let pair = pair.trim();
        if !pair.is_empty() {
            pairs.push(pair);
        }
    }
    let mut pairs = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in inside.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                push(&mut pairs, &inside[start..i]);
                start = i + 1;
            }
            '}' if !quoted => {
                push(&mut pairs, &inside[start..i]);
                return Some((pairs, i));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP apollo_gateway_http_requests Device API requests by route and status code.
# TYPE apollo_gateway_http_requests counter
apollo_gateway_http_requests_total{route="/v1/devices/{device}/desired",code="200"} 12
apollo_gateway_http_requests_total{route="/v1/devices/{device}/desired",code="304"} 100
apollo_gateway_http_requests_total{route="/v1/devices/{device}/report",code="200"} 1000
# TYPE apollo_gateway_long_poll_waiters gauge
apollo_gateway_long_poll_waiters 2
apollo_gateway_resyncs_total 3
apollo_gateway_resyncs_total_created 1700000000.5
odd{note="a, \"quoted\" } brace",code="1"} 4.5 1700000000
# EOF
"#;

    #[test]
    fn parses_names_labels_and_values() {
        let samples: Vec<Sample<'_>> = samples(TEXT).collect();
        assert_eq!(samples.len(), 7);
        assert_eq!(
            samples[1],
            Sample {
                name: "apollo_gateway_http_requests_total",
                labels: vec![r#"route="/v1/devices/{device}/desired""#, r#"code="304""#],
                value: 100.0,
            }
        );
        assert_eq!(samples[3].labels, Vec::<&str>::new());
        assert_eq!(
            samples[6].labels,
            [r#"note="a, \"quoted\" } brace""#, r#"code="1""#]
        );
        assert_eq!(samples[6].value, 4.5, "the timestamp is not the value");
    }

    #[test]
    fn value_sums_the_samples_matching_name_and_every_filter() {
        let requests = "apollo_gateway_http_requests_total";
        let desired = r#"route="/v1/devices/{device}/desired""#;
        assert_eq!(value(TEXT, requests, &[]), Some(1112.0));
        assert_eq!(value(TEXT, requests, &[desired]), Some(112.0));
        assert_eq!(
            value(TEXT, requests, &[desired, r#"code="304""#]),
            Some(100.0)
        );
        assert_eq!(value(TEXT, requests, &[r#"code="500""#]), None);
        assert_eq!(
            value(TEXT, "apollo_gateway_long_poll_waiters", &[]),
            Some(2.0)
        );
        assert_eq!(value(TEXT, "odd", &[r#"code="1""#]), Some(4.5));
    }

    #[test]
    fn names_match_exactly_not_by_prefix() {
        assert_eq!(value(TEXT, "apollo_gateway_resyncs_total", &[]), Some(3.0));
        assert_eq!(value(TEXT, "apollo_gateway_resyncs", &[]), None);
        assert_eq!(value(TEXT, "apollo_gateway_http_requests", &[]), None);
    }

    #[test]
    fn a_filter_matches_a_whole_label_pair_only() {
        let requests = "apollo_gateway_http_requests_total";
        assert_eq!(value(TEXT, requests, &[r#"code="30""#]), None);
        assert_eq!(value(TEXT, requests, &["code"]), None);
    }
}
