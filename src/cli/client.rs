//! The admin API connection of the admin commands: where it goes (--admin-addr, the
//! local admin socket, --api-key), the API key on every call, and how a failed call reads.

use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::admin::proto::admin_service_client::AdminServiceClient;

/// Where the admin commands find the admin API: the global flags that name it.
pub(super) struct Target {
    pub(super) config: Option<PathBuf>,
    pub(super) admin_addr: Option<String>,
    pub(super) api_key: Option<String>,
}

/// Adds the API key, if any, to every admin call.
#[derive(Clone)]
pub(super) struct ApiKeyHeader(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for ApiKeyHeader {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

pub(super) type AdminClient = AdminServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ApiKeyHeader>,
>;

/// Connects to the admin API named by --admin-addr, or by default the local admin socket
/// (no key needed), or TCP on loopback when only an API key is given.
pub(super) async fn connect(to: &Target) -> Result<AdminClient> {
    let target = match (&to.admin_addr, &to.api_key) {
        (Some(a), _) => a.clone(),
        (None, Some(_)) => "http://127.0.0.1:50443".into(),
        (None, None) => {
            let cfg = crate::config::Config::load(to.config.as_deref())?;
            format!("unix:{}", cfg.data_dir.join("admin.sock").display())
        }
    };
    let channel = if let Some(path) = target.strip_prefix("unix:") {
        let path = PathBuf::from(path);
        let dial = path.clone();
        // The URI is required by the API and unused: the connector dials the socket.
        tonic::transport::Endpoint::from_static("http://admin.socket")
            .connect_with_connector(tower::service_fn(move |_| {
                let dial = dial.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(dial).await?,
                    ))
                }
            }))
            .await
            .with_context(|| {
                format!(
                    "cannot reach the admin socket {}; is `hydrascale serve` running with this config (--config / HYDRASCALE_CONFIG), and are you its user? For a remote replica pass --admin-addr http://HOST:PORT and --api-key",
                    path.display()
                )
            })?
    } else {
        tonic::transport::Endpoint::from_shared(target.clone())
            .with_context(|| format!("--admin-addr {target:?} is not a URL like http://HOST:PORT or unix:PATH"))?
            .connect()
            .await
            .with_context(|| {
                format!("cannot reach the admin API at {target}; is `hydrascale serve` running? (set --admin-addr)")
            })?
    };
    let header = to
        .api_key
        .as_deref()
        .map(|k| format!("Bearer {}", k.trim()).parse())
        .transpose()
        .context("the API key holds characters an HTTP header cannot carry")?;
    // Node lists and backups of large tailnets exceed tonic's 4 MiB default.
    Ok(
        AdminServiceClient::with_interceptor(channel, ApiKeyHeader(header))
            .max_decoding_message_size(usize::MAX),
    )
}

/// An admin call's failure as the user sees it. The server's statuses already say what
/// happened and what to do (`admin::raft_status` and the state errors); a status tonic
/// made itself, from a transport error, means the call got no answer at all.
pub(super) fn grpc_error(e: tonic::Status) -> anyhow::Error {
    let mut cause = std::error::Error::source(&e);
    if cause.is_none() {
        return anyhow::anyhow!("{}", e.message());
    }
    let mut causes = vec![e.message().to_string()];
    while let Some(c) = cause {
        let text = c.to_string();
        if !causes.iter().any(|seen| seen.contains(&text)) {
            causes.push(text);
        }
        cause = c.source();
    }
    anyhow::anyhow!(
        "the admin API gave no answer ({}): is the replica still running? Retry, or ask another replica (--admin-addr, or --config of another replica)",
        causes.join(": ")
    )
}
