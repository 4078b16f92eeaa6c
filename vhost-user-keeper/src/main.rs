use balloon_protocol::daemon;
use clap::Parser;
use vhost_user_keeper::keeper::Keeper;
use vhost_user_keeper::options::Cli;

fn main() {
    let options = daemon::options_or_exit("vhost-user-keeper", Cli::parse().resolve());
    daemon::init_logging(&options.log_level);
    let mut keeper = match Keeper::bind(&options.socket, &options.backend_socket) {
        Ok(k) => k,
        Err(e) => {
            log::error!("{e}");
            std::process::exit(1);
        }
    };
    log::info!(
        "frontend socket {}, backend socket {}",
        options.socket.display(),
        options.backend_socket.display()
    );
    let result = keeper.run();
    keeper.remove_sockets();
    match result {
        Ok(()) => log::info!("shut down"),
        Err(e) => {
            log::error!("{e}");
            std::process::exit(1);
        }
    }
}
