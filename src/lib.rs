//! mqtls gives every legacy plain-MQTT device its own mutual-TLS identity at the broker.
//!
//! A connection's path through the crate, in order (data flows one way, from accept to copy):
//!
//! 1. [`proxy`] accepts on a listener, admits the connection (connection and per-source limits), and
//!    spawns one task that runs the connection's whole life (`proxy::connection`).
//! 2. [`mqtt`] reads the device's CONNECT packet, bounded in size and time, without changing a byte.
//! 3. [`device`] picks the device entry whose rules (client id, source address, listener) all hold, and
//!    [`rewrite`] rewrites the CONNECT's client id, user name or password when that entry asks for it
//!    (nothing else, and nothing after the CONNECT); no client id another entry claims reaches the broker.
//! 4. `upstream` reaches the broker as that device: `upstream::Broker` is the seam the connection talks
//!    to, and [`Connector`] the real one (resolve, connect in order, TLS handshake with the device's
//!    prebuilt `rustls::ClientConfig` from [`tls`], over `tls::stream`, which holds no buffer while idle).
//! 5. `pipe` copies bytes both ways, honouring half-close and the device's MQTT keep-alive. It knows
//!    neither TLS nor MQTT, only `duplex` streams (read and written from one task).
//!
//! Whatever ends a connection before its session starts is a `refusal`: one reason, counted, logged and
//! answered (a CONNACK in the device's own protocol version where MQTT has one) in one call.
//!
//! Around that path: [`config`] turns the TOML file into a validated [`config::Config`] and [`load`]
//! turns a file into a ready generation; `socket` sets the options both sockets share; [`metrics`]
//! counts what happens (and serves `/metrics`); [`reload`] builds a whole new configuration generation on
//! SIGHUP or when a file changes and swaps it in for new connections; [`daemon`] wires the proxy, the
//! metrics endpoint, the reloader and [`systemd`] together as `mqtls run` runs them.
//!
//! Off that path, for the operator: [`certs`] makes the device identities on disk (`mqtls certs init-ca`,
//! `issue`, `csr`), and [`inventory`] lists the identities there are and what needs attention in them
//! (`mqtls check`, `mqtls certs list`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod certs;
pub mod config;
pub mod daemon;
pub mod device;
mod duplex;
pub mod inventory;
pub mod metrics;
pub mod mqtt;
#[cfg(test)]
mod no_key_in_debug;
mod pipe;
pub mod proxy;
mod refusal;
pub mod reload;
pub mod rewrite;
mod rules;
mod socket;
mod stamp;
pub mod systemd;
#[cfg(test)]
mod test_log;
pub mod tls;
mod upstream;

pub use config::Config;
pub use proxy::{Generation, Proxy};
pub use reload::{load, Loaded};
pub use upstream::Connector;
