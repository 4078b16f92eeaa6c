use clap::Parser;
use vhost_user_keeper::keeper::Keeper;
use vhost_user_keeper::options::Cli;

fn main() {
    let options = match Cli::parse().resolve() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vhost-user-keeper: {e}");
            std::process::exit(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&options.log_level))
        .format_timestamp_millis()
        .init();
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
