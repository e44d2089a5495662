//! Request budgets of the device API: what one replica serves at once.
//!
//! Two budgets, so that neither kind of request can starve the other:
//! - **requests**: reports, connects and desired documents answered at once. Each holds a permit
//!   only while it is being served (milliseconds).
//! - **long polls**: desired requests held until the document changes (up to a minute). A long
//!   poll gives its request permit back when it starts waiting and takes a long-poll permit
//!   instead; besides, one device may hold at most a few at once (a reconnecting agent briefly
//!   has two), so a single device token cannot take the replica's whole long-poll budget.
//!
//! Above a budget a request is answered at once: 503 `overloaded` with `Retry-After` for a full
//! budget, 429 `too_many_long_polls` for a device over its own cap. Nothing waits for a permit.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::api::errors::ApiError;
use crate::metrics::{Metrics, ShedLabels};

/// The budgets' sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests served at once, long polls apart.
    pub requests: usize,
    /// Long polls held at once.
    pub long_polls: usize,
    /// Long polls one device may hold at once.
    pub long_polls_per_device: u32,
}

/// The budgets of one replica.
pub struct Budgets {
    requests: Arc<Semaphore>,
    long_polls: Arc<Semaphore>,
    per_device: Arc<Mutex<HashMap<String, u32>>>,
    per_device_cap: u32,
    metrics: Metrics,
}

/// A request permit (see [`Budgets::request`]).
pub struct RequestPermit(#[allow(dead_code)] OwnedSemaphorePermit);

/// A held long poll: its share of the replica's budget and of its device's cap.
pub struct LongPollPermit {
    _permit: OwnedSemaphorePermit,
    device: String,
    per_device: Arc<Mutex<HashMap<String, u32>>>,
}

impl Drop for LongPollPermit {
    fn drop(&mut self) {
        let mut held = self.per_device.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = held.get_mut(&self.device) {
            *n -= 1;
            if *n == 0 {
                held.remove(&self.device);
            }
        }
    }
}

impl Budgets {
    /// Budgets of the given sizes (each at least 1).
    pub fn new(limits: Limits, metrics: Metrics) -> Self {
        Self {
            requests: Arc::new(Semaphore::new(limits.requests.max(1))),
            long_polls: Arc::new(Semaphore::new(limits.long_polls.max(1))),
            per_device: Arc::default(),
            per_device_cap: limits.long_polls_per_device.max(1),
            metrics,
        }
    }

    fn shed(&self, budget: &'static str) {
        self.metrics
            .requests_shed
            .get_or_create(&ShedLabels { budget })
            .inc();
    }

    /// A permit to serve one request now, or 503 when the replica serves as many as it may.
    pub fn request(&self) -> Result<RequestPermit, ApiError> {
        match self.requests.clone().try_acquire_owned() {
            Ok(permit) => Ok(RequestPermit(permit)),
            Err(_) => {
                self.shed("requests");
                Err(overloaded("too many concurrent requests"))
            }
        }
    }

    /// A permit to hold a long poll of `device`: 429 when the device already holds its cap, 503
    /// when the replica holds as many long polls as it may.
    pub fn long_poll(&self, device: &str) -> Result<LongPollPermit, ApiError> {
        {
            let mut held = self.per_device.lock().unwrap_or_else(|e| e.into_inner());
            let n = held.entry(device.to_owned()).or_insert(0);
            if *n >= self.per_device_cap {
                drop(held);
                self.shed("device_long_polls");
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_long_polls",
                    format!(
                        "this device already holds {} long polls; wait for one to end",
                        self.per_device_cap
                    ),
                )
                .retry_after(1));
            }
            *n += 1;
        }
        // From here the device's count includes this poll: the permit's drop gives it back.
        let slot = |permit| LongPollPermit {
            _permit: permit,
            device: device.to_owned(),
            per_device: self.per_device.clone(),
        };
        match self.long_polls.clone().try_acquire_owned() {
            Ok(permit) => Ok(slot(permit)),
            Err(_) => {
                let mut held = self.per_device.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(n) = held.get_mut(device) {
                    *n -= 1;
                    if *n == 0 {
                        held.remove(device);
                    }
                }
                drop(held);
                self.shed("long_polls");
                Err(overloaded("too many long polls held"))
            }
        }
    }

    /// Devices holding at least one long poll (tests).
    pub fn devices_polling(&self) -> usize {
        self.per_device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

fn overloaded(message: &str) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message).retry_after(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budgets(requests: usize, long_polls: usize, per_device: u32) -> Budgets {
        Budgets::new(
            Limits {
                requests,
                long_polls,
                long_polls_per_device: per_device,
            },
            Metrics::unregistered(),
        )
    }

    #[test]
    fn one_device_cannot_hold_more_than_its_cap_and_others_still_can() {
        let b = budgets(4, 10, 2);
        let one = b.long_poll("a").expect("first");
        let two = b.long_poll("a").expect("second");
        let third = b.long_poll("a").err().expect("over the cap");
        assert_eq!(third.status(), StatusCode::TOO_MANY_REQUESTS);
        let other = b.long_poll("b").expect("another device");
        drop(one);
        let again = b.long_poll("a").expect("a slot came back");
        drop((two, other, again));
        assert_eq!(b.devices_polling(), 0, "counts are forgotten");
    }

    #[test]
    fn a_full_long_poll_budget_leaves_the_request_budget_alone() {
        let b = budgets(1, 2, 5);
        let _x = b.long_poll("x").expect("x");
        let _y = b.long_poll("y").expect("y");
        assert_eq!(
            b.long_poll("z").err().expect("full").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(b.devices_polling(), 2, "the refused poll left no count");
        let permit = b.request().expect("reports still served");
        assert_eq!(
            b.request().err().expect("one at a time").status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        drop(permit);
        b.request().expect("permit back");
    }
}
