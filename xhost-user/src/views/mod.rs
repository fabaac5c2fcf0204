//! Views: what the agent applied and the datapath counted, read from the
//! pinned maps and the agent's state file, never written.

pub mod metrics;
pub mod rates;
