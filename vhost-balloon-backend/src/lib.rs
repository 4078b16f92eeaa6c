//! vhost-balloon-backend: the virtio-balloon device (virtio id 5) as a vhost-user backend
//! process, one per VM. It maps guest RAM from the vhost-user memory table, returns ballooned
//! and reported-free guest pages to the host by discarding them, and serves a control socket.

pub mod device;
pub mod memory;
