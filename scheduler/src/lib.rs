//! balloon-scheduler: decides how much memory every guest gets and moves balloons to get there.

pub mod actuator;
pub mod api;
pub mod config;
pub mod drivers;
pub mod engine;
pub mod model;
pub mod policy;
pub mod sim;
pub mod trace;
