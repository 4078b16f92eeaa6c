//! balloon-scheduler: decides how much memory every guest gets and moves balloons to get there.

pub mod actuator;
pub mod api;
pub mod api_server;
pub mod config;
pub mod daemon;
pub mod discovery;
pub mod drivers;
pub mod engine;
#[cfg(test)]
mod fixtures;
pub mod host;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod policy;
pub mod run;
pub mod sim;
pub mod table;
pub mod trace;
pub mod trace_file;
