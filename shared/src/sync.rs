//! The CP ⇄ DP sync protocol: JSON messages over one WebSocket per data plane.
//!
//! 1. The DP opens `GET /cluster/v1/sync` on the CP's cluster listener with
//!    `Authorization: Bearer <cluster token>` and sends [`DpMessage::Hello`] with the revision
//!    and hash it holds.
//! 2. The CP answers [`CpMessage::UpToDate`] when those match its current snapshot, else
//!    [`CpMessage::Snapshot`]; afterwards it sends every newer snapshot as it is committed.
//! 3. The DP answers each snapshot with [`DpMessage::Ack`] once applied, or [`DpMessage::Nack`]
//!    with the reason (keeping its previous config), and sends [`DpMessage::Heartbeat`]s.

use serde::{Deserialize, Serialize};

use crate::snapshot::Snapshot;

/// Path of the sync endpoint on the cluster listener.
pub const SYNC_PATH: &str = "/cluster/v1/sync";

/// Version of this protocol; bumped on incompatible changes.
pub const PROTOCOL_VERSION: u32 = 1;

/// Messages a data plane sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DpMessage {
    /// First message on a connection.
    Hello {
        /// Stable id of the node.
        node_id: String,
        /// Host name of the machine.
        hostname: String,
        /// Tollgate version of the node.
        version: String,
        /// Sync protocol version.
        protocol: u32,
        /// Revision the node currently serves, if any.
        revision: Option<i64>,
        /// Content hash of that snapshot.
        hash: Option<String>,
    },
    /// A snapshot was validated, compiled and swapped in.
    Ack {
        /// Its revision.
        revision: i64,
        /// Its content hash as recomputed by the node.
        hash: String,
    },
    /// A snapshot was refused; the node keeps serving its previous one.
    Nack {
        /// The refused revision.
        revision: i64,
        /// Why.
        reason: String,
    },
    /// Liveness, with the revision being served.
    Heartbeat {
        /// Revision served.
        revision: Option<i64>,
        /// API keys used since the previous heartbeat: (key id, last use in Unix ms).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        keys_used: Vec<(String, i64)>,
    },
}

/// Messages a control plane sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum CpMessage {
    /// A full snapshot to apply.
    Snapshot {
        /// Content hash as computed by the CP; the DP checks it.
        hash: String,
        /// The snapshot.
        snapshot: Snapshot,
    },
    /// The node already holds the current snapshot.
    UpToDate {
        /// The current revision.
        revision: i64,
    },
    /// Facts about the cluster, sent on connect and periodically.
    Cluster {
        /// Data planes connected and heard from recently (for `local` limits: each node
        /// enforces limit ÷ this).
        live_data_planes: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_with_a_type_tag() {
        let hello = DpMessage::Hello {
            node_id: "n1".into(),
            hostname: "h".into(),
            version: "0.1.0".into(),
            protocol: PROTOCOL_VERSION,
            revision: None,
            hash: None,
        };
        let json = serde_json::to_value(&hello).expect("serializes");
        assert_eq!(json["type"], "hello");
        assert_eq!(serde_json::from_value::<DpMessage>(json).ok(), Some(hello));
        let up = CpMessage::UpToDate { revision: 3 };
        let text = serde_json::to_string(&up).expect("serializes");
        assert_eq!(text, r#"{"type":"up_to_date","revision":3}"#);
    }
}
