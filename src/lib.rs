//! mqtls gives every legacy plain-MQTT device its own mutual-TLS identity at the broker.
//!
//! A connection's path through the crate, in order:
//!
//! 1. [`proxy`] accepts on a listener and spawns one task per connection (bounded by a semaphore).
//! 2. [`mqtt`] reads the device's CONNECT packet, bounded in size and time, without changing a byte.
//! 3. [`device`] picks the device entry whose rules (client id, source address, listener) all hold.
//! 4. [`upstream`] resolves the broker, connects, and completes the TLS handshake with that device's
//!    prebuilt `rustls::ClientConfig` from [`tls`], over a [`tls_stream`] that holds no buffer while idle.
//! 5. [`pipe`] copies bytes both ways, honouring half-close and the device's MQTT keep-alive.
//!
//! Around that path: [`config`] turns the TOML file into a validated [`config::Config`], [`socket`]
//! sets the options both sockets share, [`metrics`] counts what happens on it (and serves `/metrics`),
//! [`reload`] builds a whole new configuration generation on SIGHUP or when a file changes and swaps it in
//! for new connections, and [`systemd`] tells the service manager how mqtls is doing and hands over the
//! sockets it passed.
//! Refusals before the broker is reached are answered with a CONNACK in the device's own protocol
//! version.
//!
//! Off that path, for the operator: [`certs`] makes the device identities on disk (`mqtls certs init-ca`,
//! `issue`, `csr`), and [`inventory`] lists the identities there are and what needs attention in them
//! (`mqtls check`, `mqtls certs list`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod certs;
pub mod config;
pub mod device;
pub mod inventory;
pub mod metrics;
pub mod mqtt;
pub mod pipe;
pub mod proxy;
pub mod reload;
pub mod socket;
pub mod stamp;
pub mod systemd;
pub mod tls;
pub mod tls_stream;
pub mod upstream;

pub use config::Config;
pub use proxy::{Generation, Proxy};
