//! Arbitrary CONNECTs for property tests (this module's and the rewrite's): owned fields, and the view
//! that borrows them.

use proptest::prelude::*;

use super::{ConnectView, ProtocolVersion, Will};

/// A will message's owned fields.
#[derive(Debug, Clone)]
pub(crate) struct WillFields {
    pub qos: u8,
    pub retain: bool,
    pub properties: Vec<u8>,
    pub topic: String,
    pub payload: Vec<u8>,
}

/// A CONNECT's owned fields.
#[derive(Debug, Clone)]
pub(crate) struct Fields {
    pub version: ProtocolVersion,
    pub clean: bool,
    pub keep_alive: u16,
    pub properties: Vec<u8>,
    pub client_id: String,
    pub will: Option<WillFields>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl Fields {
    /// The view of these fields.
    pub(crate) fn view(&self) -> ConnectView<'_> {
        ConnectView {
            version: self.version,
            clean_start: self.clean,
            keep_alive: self.keep_alive,
            properties: &self.properties,
            client_id: &self.client_id,
            will: self.will.as_ref().map(|w| Will {
                qos: w.qos,
                retain: w.retain,
                properties: &w.properties,
                topic: &w.topic,
                payload: &w.payload,
            }),
            username: self.username.as_deref(),
            password: self.password.as_deref(),
        }
    }
}

/// Valid CONNECTs of every version, with wills, user names and passwords, and 5.0 properties from
/// `properties` (cleared, with the password of a device without a user name, before 5.0).
pub(crate) fn arb_fields<P>(properties: P) -> impl Strategy<Value = Fields>
where
    P: Strategy<Value = Vec<u8>> + Clone,
{
    let version = prop_oneof![
        Just(ProtocolVersion::V31),
        Just(ProtocolVersion::V311),
        Just(ProtocolVersion::V5),
    ];
    let client_id = prop_oneof![Just(String::new()), Just("ESP8266Client".to_string()), "[^\u{0}]{0,40}",];
    let will = (
        0u8..=2,
        any::<bool>(),
        properties.clone(),
        "[^\u{0}]{0,20}",
        proptest::collection::vec(any::<u8>(), 0..200),
    )
        .prop_map(|(qos, retain, properties, topic, payload)| WillFields {
            qos,
            retain,
            properties,
            topic,
            payload,
        });
    (
        version,
        any::<bool>(),
        any::<u16>(),
        properties,
        client_id,
        proptest::option::of(will),
        proptest::option::of("[^\u{0}]{0,20}"),
        proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
    )
        .prop_map(
            |(version, clean, keep_alive, properties, client_id, will, username, password)| {
                let mut f = Fields {
                    version,
                    clean,
                    keep_alive,
                    properties,
                    client_id,
                    will,
                    username,
                    password,
                };
                if version != ProtocolVersion::V5 {
                    f.properties.clear();
                    if let Some(w) = &mut f.will {
                        w.properties.clear();
                    }
                    if f.username.is_none() {
                        f.password = None;
                    }
                }
                f
            },
        )
}
