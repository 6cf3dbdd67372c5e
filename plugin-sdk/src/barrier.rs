//! The delivery barrier behind `epidemic wait`: has every consumer handled every change
//! committed before a moment? A front end that has just created a user asks it before it
//! answers, as the Cyrus Murder design has its front end make sure "all updates have
//! occurred".
//!
//! The host asks the backend for a **fence**, an opaque token for "everything committed
//! in these tables' logs by now" (a snapshot, or the newest log id of each table), then
//! asks, as often as it likes, which consumers have not yet handled everything before it
//! ([`BarrierRequest::Laggards`]). A consumer has handled a change once its cursor moved
//! past it, which happens only after its handler finished the change (or gave it up to
//! the dead letters). Both cross as JSON: a field added later is no ABI change.

use serde::{Deserialize, Serialize};

use crate::backend::Consumer;

/// What the host asks a backend about the barrier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BarrierRequest {
    /// A fence for these tables (their names as watched): everything committed in their
    /// logs by now.
    Fence { tables: Vec<String> },
    /// Which of these consumers have not yet handled every change of their tables that
    /// the fence covers. A consumer that reads none of the fence's tables is never a
    /// laggard; one that is not registered is (with every fenced table it was asked for
    /// — the host asks only for consumers it knows).
    Laggards {
        fence: String,
        consumers: Vec<Consumer>,
    },
}

/// One consumer behind a fence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Laggard {
    pub consumer: Consumer,
    /// The fenced tables it has not caught up with.
    pub tables: Vec<String>,
}

/// A backend's answer to a [`BarrierRequest`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BarrierReply {
    /// The fence (for [`BarrierRequest::Fence`]).
    pub fence: String,
    /// The consumers still behind (for [`BarrierRequest::Laggards`]).
    pub laggards: Vec<Laggard>,
}
