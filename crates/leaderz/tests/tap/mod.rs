//! A tap on a kube client's requests, for tests against the real API server: it counts
//! requests, can run an action before passing one on (to force an interleaving), and
//! can LOSE one's answer — the request is held back and passed on to the API server
//! only when the test says so (a write that lands late, after its caller gave up), while
//! the caller gets a chosen status at once or no answer at all.
#![allow(dead_code, unreachable_pub, missing_docs)]
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::Frame;
use kube::Client;
use kube::client::{Body, ClientBuilder, DynBody};
use tokio::sync::{mpsc, oneshot};
use tower::{BoxError, Layer, Service, ServiceExt};

type Inner = tower::util::BoxService<Request<Body>, Response<Box<DynBody>>, BoxError>;
type Answer = Result<Response<Box<DynBody>>, BoxError>;
type Action = Box<dyn FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// What the caller of a lost request gets.
#[derive(Clone, Copy, Debug)]
pub enum Lost {
    /// No answer: the caller's own timeout ends the call.
    Silence,
    /// This status (a 5xx: the API server may still pass the write on), once the test
    /// calls [`Held::answer`] (or drops the [`Held`]).
    Status(u16),
}

enum Rule {
    Lose(Lost),
    Before(Action),
    Refuse(u16),
}

/// A request whose answer was lost, held back from the API server.
pub struct Held {
    /// `METHOD path`.
    pub what: String,
    go: oneshot::Sender<()>,
    landed: oneshot::Receiver<u16>,
    answer: Option<oneshot::Sender<()>>,
}

impl Held {
    /// With [`Lost::Status`]: the caller gets its status now (not before).
    pub fn answer(&mut self) {
        if let Some(answer) = self.answer.take() {
            let _ = answer.send(());
        }
    }

    /// Sends it on to the API server now; returns the status it answered.
    pub async fn land(self) -> u16 {
        self.go.send(()).unwrap();
        self.landed.await.unwrap()
    }
}

/// The tap's controls (cheap to clone).
#[derive(Clone)]
pub struct Tap {
    rules: Arc<Mutex<Vec<(Method, String, Rule)>>>,
    seen: Arc<Mutex<Vec<String>>>,
    held_tx: mpsc::UnboundedSender<Held>,
    held_rx: Arc<tokio::sync::Mutex<mpsc::UnboundedReceiver<Held>>>,
}

impl Tap {
    /// A client for `config` whose requests go through a new tap.
    pub fn client(config: kube::Config) -> (Client, Tap) {
        let (held_tx, held_rx) = mpsc::unbounded_channel();
        let tap = Tap {
            rules: Arc::default(),
            seen: Arc::default(),
            held_tx,
            held_rx: Arc::new(tokio::sync::Mutex::new(held_rx)),
        };
        let client = ClientBuilder::try_from(config)
            .unwrap()
            .with_layer(&tap)
            .build();
        (client, tap)
    }

    /// Loses the answer of the next `method` request on `path` (no query).
    pub fn lose(&self, method: Method, path: &str, lost: Lost) {
        self.rules
            .lock()
            .unwrap()
            .push((method, path.to_owned(), Rule::Lose(lost)));
    }

    /// Runs `action` before passing the next `method` request on `path` on.
    pub fn before<F, Fut>(&self, method: Method, path: &str, action: F)
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let action: Action = Box::new(move || Box::pin(action()));
        self.rules
            .lock()
            .unwrap()
            .push((method, path.to_owned(), Rule::Before(action)));
    }

    /// Answers every `method` request on `path` from now on with `code`, without passing
    /// it on (RBAC revoked, say).
    pub fn refuse(&self, method: Method, path: &str, code: u16) {
        self.rules
            .lock()
            .unwrap()
            .push((method, path.to_owned(), Rule::Refuse(code)));
    }

    /// The next request whose answer was lost.
    pub async fn held(&self) -> Held {
        self.held_rx.lock().await.recv().await.unwrap()
    }

    /// How many requests `METHOD path?query` started with `prefix`.
    pub fn count(&self, prefix: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.starts_with(prefix)).count()
    }
}

impl Layer<Inner> for Tap {
    type Service = TapService;

    fn layer(&self, inner: Inner) -> TapService {
        TapService {
            tap: self.clone(),
            inner: Arc::new(tokio::sync::Mutex::new(inner)),
        }
    }
}

pub struct TapService {
    tap: Tap,
    inner: Arc<tokio::sync::Mutex<Inner>>,
}

async fn forward(inner: Arc<tokio::sync::Mutex<Inner>>, req: Request<Body>) -> Answer {
    let answer = {
        let mut service = inner.lock().await;
        service.ready().await?.call(req)
    };
    answer.await
}

impl Service<Request<Body>> for TapService {
    type Response = Response<Box<DynBody>>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Answer> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let what = format!(
            "{} {}",
            req.method(),
            req.uri().path_and_query().map_or("", |p| p.as_str())
        );
        self.tap.seen.lock().unwrap().push(what.clone());
        let rule = {
            let mut rules = self.tap.rules.lock().unwrap();
            match rules
                .iter()
                .position(|(m, p, _)| m == req.method() && *p == path)
            {
                Some(i) => match rules[i].2 {
                    Rule::Refuse(code) => Some(Rule::Refuse(code)),
                    _ => Some(rules.remove(i).2),
                },
                None => None,
            }
        };
        let inner = self.inner.clone();
        match rule {
            None => Box::pin(forward(inner, req)),
            Some(Rule::Refuse(code)) => Box::pin(async move { Ok(status(code)) }),
            Some(Rule::Before(action)) => Box::pin(async move {
                action().await;
                forward(inner, req).await
            }),
            Some(Rule::Lose(lost)) => {
                let (go, go_rx) = oneshot::channel();
                let (landed_tx, landed) = oneshot::channel();
                tokio::spawn(async move {
                    if go_rx.await.is_ok() {
                        let status = match forward(inner, req).await {
                            Ok(r) => r.status().as_u16(),
                            Err(_) => 0,
                        };
                        let _ = landed_tx.send(status);
                    }
                });
                let (answer, answered) = oneshot::channel();
                let held = Held {
                    what,
                    go,
                    landed,
                    answer: Some(answer),
                };
                self.tap.held_tx.send(held).unwrap();
                match lost {
                    Lost::Silence => Box::pin(std::future::pending()),
                    Lost::Status(code) => Box::pin(async move {
                        let _ = answered.await;
                        Ok(status(code))
                    }),
                }
            }
        }
    }
}

/// An answer with `code` and a Kubernetes `Status` body.
fn status(code: u16) -> Response<Box<DynBody>> {
    let body = serde_json::json!({
        "kind": "Status", "apiVersion": "v1", "status": "Failure",
        "message": "injected by the test's tap", "reason": "ServiceUnavailable", "code": code,
    });
    let body: Box<DynBody> = Box::new(Once(Some(Bytes::from(body.to_string()))));
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(body)
        .unwrap()
}

/// A body of one chunk.
struct Once(Option<Bytes>);

impl http_body::Body for Once {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }
}
