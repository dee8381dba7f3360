//! mqtls's integration tests, built as one test binary: one module per area, all sharing the harness in
//! [`common`] (a throwaway PKI, a real Mosquitto, a TLS echo server, MQTT clients, mqtls in-process or as
//! a subprocess), which is compiled once for all of them.
//!
//! The tests of every area run side by side in this one process, so none may rely on process-wide state
//! of its own: each captures the logs of its own thread (`common::proxy::Logs`), names its devices as it
//! likes, and leaves environment variables and the current directory alone (subprocesses get theirs set
//! on their `Command`).

mod common;

mod broker_failures;
mod certs;
mod cli;
mod config;
mod daemon;
mod harness;
mod identity;
mod keepalive;
mod lan;
mod metrics;
mod recipes;
mod refusals;
mod reload;
mod rewrite;
mod routing;
mod secrets;
mod shutdown;
mod stream;
mod systemd;
