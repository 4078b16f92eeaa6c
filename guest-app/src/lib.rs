//! balloon-guest: the user-level balloon application. It claims memory from the guest OS like
//! any program (so the guest decides what to evict), pins it, finds its physical pages in
//! /proc/self/pagemap and reports them to the VM's backend, which returns the host memory
//! behind them. It inflates and deflates at an adaptive rate and gives memory back under
//! sustained pressure.

pub mod app;
pub mod caps;
pub mod chunk;
pub mod meminfo;
pub mod pagemap;
pub mod psi;
pub mod rate;
pub mod transport;
