use balloon_protocol::daemon;
use clap::Parser;
use vhost_balloon_backend::options::Cli;

fn main() {
    let options = daemon::options_or_exit("vhost-balloon-backend", Cli::parse().resolve());
    daemon::init_logging(&options.log_level);
    if let Err(e) = vhost_balloon_backend::daemon::run(options) {
        log::error!("{e}");
        std::process::exit(1);
    }
}
