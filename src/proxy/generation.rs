//! One configuration generation: everything a new connection is served with.
//!
//! A reload builds a whole new generation and swaps it in; connections keep the generation they
//! started with until their set-up is over (see [`super::connection`]), so a reload never touches a
//! connection already open.

use std::sync::Arc;

use super::retire::Renewals;
use crate::config::{Config, ConfigErrors, Listen, Retire};
use crate::device::DeviceTable;
use crate::upstream::Connector;

/// Who the devices are, how to reach the broker, and the device-side limits, as one configuration
/// says. `B` is how the broker is reached: the real [`Connector`], or a stand-in in unit tests.
#[derive(Debug)]
pub struct Generation<B = Connector> {
    /// Who the devices are.
    pub table: DeviceTable,
    /// How to reach the broker.
    pub(crate) broker: B,
    /// Limits for the device side.
    pub listen: Listen,
    /// When open connections are retired (`[retire]`).
    pub retire: Option<Retire>,
    /// Which devices' certificates reloads replaced: shared by every generation.
    pub(crate) renewals: Arc<Renewals>,
}

impl Generation {
    /// Loads every identity the configuration names and prepares the connector.
    pub fn load(config: &Config) -> Result<Generation, ConfigErrors> {
        Generation::load_after(config, None)
    }

    /// Like [`Generation::load`], keeping the identities of `previous` whose files have not changed, and
    /// its turns to connect (`upstream.max_connecting` holds for the process, not per generation).
    pub fn load_after(config: &Config, previous: Option<&Generation>) -> Result<Generation, ConfigErrors> {
        Ok(Generation {
            table: DeviceTable::build_after(config, previous.map(|g| &g.table))?,
            broker: Connector::new_after(&config.upstream, previous.map(|g| &g.broker)),
            listen: config.listen.clone(),
            retire: config.retire,
            renewals: previous.map(|g| g.renewals.clone()).unwrap_or_default(),
        })
    }

    /// Tells the connections of the devices named in `renewed` (whose certificates this generation
    /// replaced) that they may be retired.
    pub fn renewed<'a>(&self, renewed: impl IntoIterator<Item = &'a str>) {
        for name in renewed {
            self.renewals.renewed(&name.into());
        }
    }
}
