//! `leashctl`: the operator's and responder's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "leashctl",
    version,
    about = "Operate Leash: policy, and (soon) revocations"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Work with policy files.
    #[command(subcommand)]
    Policy(PolicyCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Validate a policy file offline: exits non-zero naming each bad field.
    Check { file: PathBuf },
}

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
