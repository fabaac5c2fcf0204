//! xhost's user-space side: loader, agent and the views `xhost-user` prints.
//! A library so that the tests drive the same code the binary runs.

pub mod adopt;
pub mod agent;
pub mod attach;
pub mod config;
pub mod datapath;
pub mod docker;
pub mod layout;
pub mod migrate;
pub mod net;
pub mod netlink;
pub mod plan;
pub mod report;
pub mod service;
pub mod sources;
pub mod store;
pub mod tunnel;
pub mod views;
pub mod writer;
