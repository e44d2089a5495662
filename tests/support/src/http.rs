/// Sends `request` and returns the response when its status is a success (2xx); otherwise, or
/// when it cannot be sent, panics naming `what` with the error, or the status and the body.
pub async fn send_ok(request: reqwest::RequestBuilder, what: &str) -> reqwest::Response {
    let response = request
        .send()
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        panic!("{what}: {status} {body}");
    }
    response
}
