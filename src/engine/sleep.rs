//! `--sleep-idle-seconds`: after that long without a command the worker has saved every
//! conversation, and the model and context are unloaded (their memory freed). The next command
//! that needs llama.cpp loads them again; every conversation resumes from the store, exactly.
//! Commands that need no model (shutdown, the resident list, a look at, save or check-out of a
//! conversation, none of which is resident) are answered without waking;
//! `Command::Wake`, sent before tokenizing, does nothing but wake it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use uuid::Uuid;

use super::model_info::{ModelInfo, hash_file};
use super::worker::{Served, Worker, context_params};
use super::{Command, EngineConfig, EngineError, Keeper, Shared};

/// Sleeps until a command needs the model, loads it again and serves until the next sleep;
/// returns when the engine stops.
pub(super) fn sleep_then_serve(
    mut keeper: Box<dyn Keeper>,
    backend: &LlamaBackend,
    config: &EngineConfig,
    commands: &mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    info: &ModelInfo,
) {
    let mut past_deadline = false;
    loop {
        shared.sleeping.store(true, Ordering::SeqCst);
        tracing::info!("asleep: every conversation is saved and the model is unloaded");
        let first = loop {
            match commands.recv() {
                Err(_) => return,
                Ok(Command::Shutdown { reply }) => {
                    // Everything was saved before falling asleep.
                    let _ = reply.send(());
                    return;
                }
                Ok(Command::CancelAll) => past_deadline = true,
                Ok(Command::Resident { reply }) => {
                    let _ = reply.send(Vec::new());
                }
                Ok(Command::DropResident { reply, .. }) => {
                    let _ = reply.send(Ok(()));
                }
                // Nothing is resident asleep: a conversation is read from the store, unless it
                // moved away.
                Ok(Command::Look { session, reply, .. }) => {
                    let _ = reply.send(not_resident(keeper.as_ref(), session));
                }
                Ok(Command::Save { session, reply, .. }) => {
                    let _ = reply.send(not_resident(keeper.as_ref(), session));
                }
                Ok(Command::CheckOut { session, reply, .. }) => {
                    let _ = reply.send(not_resident(keeper.as_ref(), session));
                }
                Ok(command) => break command,
            }
        };
        let started = std::time::Instant::now();
        let model = match load_again(backend, config, info) {
            Ok(model) => model,
            Err(reason) => {
                // The command is dropped unanswered: its caller hears the engine failed.
                tracing::error!(%reason, "could not wake: the model did not load again");
                continue;
            }
        };
        let ctx = match model.new_context(backend, context_params(config)) {
            Ok(ctx) => ctx,
            Err(error) => {
                tracing::error!(%error, "could not wake: no llama.cpp context");
                continue;
            }
        };
        let mut worker = Worker::new(&model, ctx, keeper, shared.clone(), config, info.clone());
        worker.past_deadline = past_deadline;
        shared.sleeping.store(false, Ordering::SeqCst);
        metrics::counter!("kvsnap_wakes_total").increment(1);
        tracing::info!(
            millis = started.elapsed().as_secs_f64() * 1e3,
            "awake: the model is loaded again"
        );
        if !worker.handle(first) {
            return;
        }
        if let Served::Stopped = worker.serve(commands, config.sleep_idle) {
            return;
        }
        past_deadline = worker.past_deadline;
        keeper = worker.into_keeper();
    }
}

/// What a look at, a save of or a check-out of `session` answers asleep: it is not resident
/// (everything was saved before falling asleep), or it moved to another instance.
fn not_resident<T>(keeper: &dyn Keeper, session: Uuid) -> Result<Option<T>, EngineError> {
    match keeper.forwarded_to(session)? {
        Some(target) => Err(EngineError::Moved { session, target }),
        None => Ok(None),
    }
}

/// The model file loaded again, if it is still the file every stored state was made by.
fn load_again(
    backend: &LlamaBackend,
    config: &EngineConfig,
    info: &ModelInfo,
) -> Result<LlamaModel, String> {
    let path = &config.model_path;
    let (hash, _) = hash_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    if hash != info.file_hash {
        return Err(format!(
            "{} changed while the server slept; restart kvsnap to serve the new file",
            path.display()
        ));
    }
    LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
        .map_err(|e| format!("{} did not load: {e}", path.display()))
}
