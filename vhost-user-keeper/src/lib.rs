//! vhost-user-keeper: keeps a vhost-user frontend's connection open across restarts of the
//! backend process, and tells each new backend what the frontend told the old one.
//!
//! Why: QEMU 11.1's generic vhost-user device (`vhost-user-test-device-pci`) cannot reconnect
//! to a restarted backend (docs/qemu-vhost-user-base-reconnect.md), so without this a backend
//! crash or upgrade takes the VM's device down for good.

pub mod config_space;
pub mod journal;
pub mod keeper;
pub mod message;
pub mod options;
