//! Start-up and shutdown of `kvsnap serve`.
//!
//! Order matters: the model loads first, and only then does the port open, so a client that can
//! connect can be served. On SIGINT/SIGTERM the listener stops accepting, running streams get
//! `shutdown_grace_secs` to finish, then the engine cancels whatever is left.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusBuilder;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::engine::EngineHandle;
use crate::http::{AppState, router};
use crate::sessions::{Conversations, Fleet, StoreKeeper};
use crate::store::Store;
use crate::store::remote::Remote;

/// Runs the daemon until a shutdown signal; errors carry a sentence for the person at the shell.
pub async fn serve(config: Config) -> anyhow::Result<()> {
    tracing::info!(config = ?config, "effective configuration");
    // Before llama.cpp runs: a host without the profile's instructions gets a sentence, not
    // SIGILL on the first decode.
    if let Some(reason) = crate::compute::host_mismatch() {
        anyhow::bail!(reason);
    }
    tracing::info!(
        compute_profile = crate::compute::THIS_BUILD,
        target_cpu = crate::compute::TARGET_CPU,
        "compute profile"
    );
    let metrics = PrometheusBuilder::new()
        .install_recorder()
        .context("cannot set up the metrics recorder")?;

    let keys = match &config.encryption_key_file {
        Some(path) => {
            let keys = crate::keys::Keys::load(path)?;
            tracing::info!(key_file = %path.display(), current_key = keys.ring().current(), "encryption at rest is on");
            Some(keys)
        }
        None => None,
    };
    let data_path = config.data_path.clone();
    let faults = std::env::var_os("KVSNAP_STORAGE_FAULTS").map(std::path::PathBuf::from);
    let store_keys = keys.clone();
    let store = tokio::task::spawn_blocking(move || match (faults, store_keys) {
        // Test support: every call on the store's file may be made to fail (see
        // `store::faults`); never set in production.
        (Some(control), keys) => {
            tracing::warn!(control = %control.display(), "storage faults are injected on demand (test support)");
            let schedule = crate::store::faults::Schedule::new();
            crate::store::faults::follow_control_file(control, schedule.clone());
            Store::open_with_faults(&data_path, schedule, keys)
        }
        (None, Some(keys)) => Store::open_sealed(&data_path, keys),
        (None, None) => Store::open(&data_path),
    })
        .await
        .context("the store opener stopped unexpectedly")??;
    let store = Arc::new(store);
    // Made once and kept in the store: fleet leases and the audit trail name the instance by it.
    let instance = store.instance_id()?;
    tracing::info!(path = %config.data_path.display(), "store open");

    let engine_config = config.engine();
    tracing::info!(model = %engine_config.model_path.display(), "loading model");
    let fleet = match &config.remote {
        Some(url) => {
            let mut remote = Remote::open(url, &config.remote_settings)?;
            if let Some(keys) = &keys {
                remote = remote.sealed_with(keys.clone());
            }
            tracing::info!(
                remote = %url, durability = ?config.remote_durability,
                "conversations are shared through the bucket"
            );
            let lease = Duration::from_secs(config.lease_seconds);
            Some(Fleet::start(
                remote,
                store.clone(),
                config.remote_durability,
                lease,
            )?)
        }
        None => None,
    };
    store.set_budget(config.store_budget);
    let keeper = StoreKeeper::start(
        store.clone(),
        config.persist,
        fleet.clone(),
        config.keep_unnamed,
    )
    .context("cannot start the writer thread")?;
    let engine =
        tokio::task::spawn_blocking(move || EngineHandle::start(engine_config, Box::new(keeper)))
            .await
            .context("the model loader stopped unexpectedly")??;
    let info = engine.info();
    tracing::info!(
        model = %info.id, architecture = %info.architecture, n_ctx = info.n_ctx,
        per_sequence = info.n_ctx_per_sequence, parallel = info.parallel, n_swa = info.n_swa,
        "model loaded"
    );

    // Installed before the port is announced: a SIGTERM that arrives the moment after "listening"
    // must start a graceful shutdown, not meet the default disposition and kill the process.
    let signals = ShutdownSignals::install()?;
    let listeners = bind_all(&config.listen_addrs()).await?;
    let local = listeners[0].local_addr()?;
    if let Some(fleet) = &fleet {
        let advertised = config.advertise_url.clone().unwrap_or_else(|| {
            let host = match local.ip() {
                ip if ip.is_unspecified() => std::net::IpAddr::from([127, 0, 0, 1]),
                ip => ip,
            };
            format!("http://{}", std::net::SocketAddr::new(host, local.port()))
        });
        fleet.set_url(advertised);
    }
    for listener in &listeners[1..] {
        tracing::info!(local = %listener.local_addr()?, "listening");
    }
    // The log line first: whoever sees the stdout line may read the log at once and must find it.
    tracing::info!(%local, "listening");
    // One line on stdout that scripts and tests wait for.
    println!("kvsnap listening on http://{local}");

    let shutting_down = Arc::new(AtomicBool::new(false));
    let rekeys = crate::sessions::Rekeys::new(store.clone(), fleet.clone());
    let conversations = Arc::new(Conversations::new(
        engine.clone(),
        store.clone(),
        fleet.clone(),
        config.max_conversations_per_key,
        config.keep_unnamed,
        config.persist,
    ));
    let migrator = Arc::new(crate::migrate::Migrator::new(
        conversations.clone(),
        store.clone(),
        instance,
        config.migrator_options(),
        fleet.clone(),
    ));
    let state = AppState {
        conversations,
        rekeys,
        migrator,
        store,
        slot_dir: config.slot_save_path.clone().map(Arc::new),
        engine: engine.clone(),
        metrics,
        shutting_down: shutting_down.clone(),
        fleet,
        options: Arc::new(crate::http::ServerOptions::from_config(&config)),
        totals: Arc::default(),
        uploads: Arc::new(tokio::sync::Semaphore::new(crate::http::UPLOADS_AT_ONCE)),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let migrator = state.migrator.clone();
    let app = router(state, &config);
    let grace = Duration::from_secs(config.shutdown_grace_secs);
    let signal_engine = engine.clone();
    let signal_migrator = migrator.clone();
    // One signal stops every listener.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        signals.wait().await;
        tracing::info!(
            grace_secs = grace.as_secs(),
            "shutting down: no new connections"
        );
        shutting_down.store(true, Ordering::SeqCst);
        // Bulk moves finish the conversation they are sending and start no other, while the
        // open connections drain.
        signal_migrator.jobs.stop_starting();
        let _ = stop.send(true);
        tokio::time::sleep(grace).await;
        tracing::warn!("shutdown deadline passed: cancelling the requests still running");
        signal_engine.cancel_all();
    });
    let mut servers = tokio::task::JoinSet::new();
    // One count for every listening address.
    let connections = Arc::new(tokio::sync::Semaphore::new(config.max_connections));
    for listener in listeners {
        servers.spawn(serve_http1(
            listener,
            app.clone(),
            stopped.clone(),
            grace,
            connections.clone(),
        ));
    }
    while let Some(result) = servers.join_next().await {
        result.context("an HTTP listener stopped unexpectedly")?;
    }
    // The conversation a bulk move is sending may still be on its way.
    migrator.jobs.wind_down(CLOSE_AFTER_GRACE).await;
    engine.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

/// How long a client may take to send a request's headers. Without a limit, one connection that
/// sent half a header line kept a graceful shutdown waiting forever.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(20);

/// After the grace period and the engine's cancellation, how long connections still get to
/// close before the daemon stops waiting for them and saves its conversations: a client that
/// neither reads nor sends must not hold a shutdown until a supervisor's SIGKILL.
const CLOSE_AFTER_GRACE: Duration = Duration::from_secs(5);

/// Serves `app` on `listener` until `stopped` turns true, then lets the open connections finish
/// their requests for at most `grace` and `CLOSE_AFTER_GRACE`. HTTP/1.1, with header names in
/// llama-server's Title-Case: clients that read headers into a case-sensitive map (llama.cpp's
/// own tests do) find `Access-Control-Allow-Origin` where they look for it.
async fn serve_http1(
    listener: TcpListener,
    app: axum::Router,
    mut stopped: watch::Receiver<bool>,
    grace: Duration,
    connections: Arc<tokio::sync::Semaphore>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        // A place for the next connection first: at `max_connections` the kernel's backlog
        // holds new clients until one closes.
        let place = tokio::select! {
            place = connections.clone().acquire_owned() => match place {
                Ok(place) => place,
                Err(_) => break,
            },
            () = stop_signalled(&mut stopped) => break,
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(%error, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = stop_signalled(&mut stopped) => break,
        };
        // Streamed tokens leave at once rather than waiting for more bytes to fill a packet.
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let connection = hyper::server::conn::http1::Builder::new()
            .title_case_headers(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection closed with an error");
            }
            drop(place);
        });
    }
    drop(listener);
    if tokio::time::timeout(grace + CLOSE_AFTER_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the shutdown deadline: closing them");
    }
}

async fn stop_signalled(stopped: &mut watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Binds every address; with port 0, the later addresses take the port the first one got, so
/// one port serves them all.
async fn bind_all(addrs: &[std::net::SocketAddr]) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners: Vec<TcpListener> = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let mut addr = addr;
        if let Some(first) = listeners.first() {
            addr.set_port(first.local_addr()?.port());
        }
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!(
                "cannot listen on {addr}; is another server using that port? choose one with --port"
            )
        })?;
        listeners.push(listener);
    }
    Ok(listeners)
}

/// SIGINT and SIGTERM, registered with the OS as soon as this is made (a future such as
/// `tokio::signal::ctrl_c()` would only register when first polled).
struct ShutdownSignals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl ShutdownSignals {
    fn install() -> anyhow::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())
                    .context("cannot install the SIGINT handler")?,
                terminate: signal(SignalKind::terminate())
                    .context("cannot install the SIGTERM handler")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Self {})
    }

    async fn wait(mut self) {
        #[cfg(unix)]
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}
