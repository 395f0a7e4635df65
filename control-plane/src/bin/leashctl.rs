//! `leashctl`: the operator's and responder's command line.

use std::process::ExitCode;

use clap::Parser as _;
use leash_control_plane::cli::{LeashctlCli as Cli, LeashctlCommand as Command, PolicyCommand};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Policy(PolicyCommand::Check { file }) => match leash_api::policy::load(&file) {
            Ok(p) => {
                println!(
                    "{}: ok ({} upstreams, {} grants)",
                    file.display(),
                    p.policy.upstreams.len(),
                    p.policy.grants.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        },
    }
}
