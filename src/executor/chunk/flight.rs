//! One round trip's requests on one connection, sent in order without waiting for answers
//! (tokio-postgres pipelines requests polled together): each goes through [`Flight::send`],
//! polled in order (`tokio::join!(biased; …)`). A request that fails before it was sent — a
//! parameter the driver refuses, a connection already closed — stops every request behind it in
//! the flight from being sent: a `COMMIT` must never go out without the statements before it.
//! Knows nothing of what the requests are.

use std::cell::Cell;
use std::future::Future;
use std::task::Poll;

/// One round trip's requests.
#[derive(Default)]
pub(super) struct Flight {
    /// A request of this flight failed before it could be sent.
    broken: Cell<bool>,
}

impl Flight {
    /// Sends `request` behind the requests of this flight polled before it; None when it was not
    /// sent because one of those could not be.
    pub(super) async fn send<T, E>(
        &self,
        request: impl Future<Output = Result<T, E>>,
    ) -> Option<Result<T, E>> {
        if self.broken.get() {
            return None;
        }
        let mut request = std::pin::pin!(request);
        let mut first = true;
        let answer = std::future::poll_fn(|cx| {
            let polled = request.as_mut().poll(cx);
            // An answer cannot arrive before the request went out: a failure at the first poll
            // means it never did.
            if std::mem::take(&mut first) && matches!(polled, Poll::Ready(Err(_))) {
                self.broken.set(true);
            }
            polled
        })
        .await;
        Some(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request failing at its first poll stops the ones behind it; one that fails later (an
    /// answer from the server) does not.
    #[test]
    fn a_request_not_sent_stops_the_requests_behind_it() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let flight = Flight::default();
            let (a, b, c) = tokio::join!(
                biased;
                flight.send(async { Ok::<_, ()>(1) }),
                flight.send(async { Err::<i32, _>(()) }),
                flight.send(async { Ok::<_, ()>(3) }),
            );
            assert_eq!((a, b, c), (Some(Ok(1)), Some(Err(())), None));

            let flight = Flight::default();
            let later = async {
                tokio::task::yield_now().await;
                Err::<i32, _>(())
            };
            let (a, b) = tokio::join!(
                biased;
                flight.send(later),
                flight.send(async { Ok::<_, ()>(2) }),
            );
            assert_eq!((a, b), (Some(Err(())), Some(Ok(2))));
        });
    }
}
