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
//! for new connections, [`certs`] makes and inspects the device identities on disk (`mqtls certs`), and
//! [`systemd`] tells the service manager how mqtls is doing and hands over the sockets it passed.
//! Refusals before the broker is reached are answered with a CONNACK in the device's own protocol
//! version.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod certs;
pub mod config;
pub mod daemon;
pub mod device;
mod duplex;
pub mod metrics;
pub mod mqtt;
mod pipe;
pub mod proxy;
mod refusal;
pub mod reload;
mod socket;
pub mod stamp;
pub mod systemd;
pub mod tls;
mod upstream;

pub use config::Config;
pub use proxy::{Generation, Proxy};
pub use reload::{load, Loaded};
pub use upstream::Connector;
