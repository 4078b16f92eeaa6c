use clap::Parser;
use vhost_balloon_backend::options::Cli;

fn main() {
    let options = match Cli::parse().resolve() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("vhost-balloon-backend: {e}");
            std::process::exit(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&options.log_level))
        .format_timestamp_millis()
        .init();
    if let Err(e) = vhost_balloon_backend::daemon::run(options) {
        log::error!("{e}");
        std::process::exit(1);
    }
}
