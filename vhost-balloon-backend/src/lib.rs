//! vhost-balloon-backend: the virtio-balloon device (virtio id 5) as a vhost-user backend
//! process, one per VM. It maps guest RAM from the vhost-user memory table, returns ballooned
//! and reported-free guest pages to the host by discarding them, and serves a control socket.
//!
//! - `device`: the virtio-balloon device model (features, config, queues, buffer parsing);
//! - `memory`: the guest memory map, page tracking and discards;
//! - `balloon`: the device state and what each queue's buffers do to it;
//! - `vhu_balloon`: the vhost-user glue;
//! - `config_change`: the config-change message vhost 0.18 cannot send;
//! - `control`, `state`, `options`, `daemon`: the control socket, persistence, options, wiring.

pub mod app_channel;
pub mod balloon;
pub mod config_change;
pub mod control;
pub mod daemon;
pub mod device;
pub mod guest_log;
pub mod memory;
pub mod options;
pub mod state;
#[cfg(any(test, feature = "test-support"))]
pub mod testing;
pub mod vhu_balloon;

#[cfg(test)]
mod queue_tests;
