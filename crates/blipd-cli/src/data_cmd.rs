//! `blipd data …`: the synthetic-pair data pipeline from the command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Args)]
pub struct DataArgs {
    #[command(subcommand)]
    pub command: DataCommand,
}

#[derive(Subcommand)]
pub enum DataCommand {
    /// Closed-form matting of one image: trimap grey levels ≤ 10% background, ≥ 90% foreground, else
    /// unknown; α written as a 16-bit grey PNG.
    Matte {
        #[arg(long)]
        image: PathBuf,
        #[arg(long)]
        trimap: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Also write the estimated foreground colours (RGB PNG).
        #[arg(long)]
        foreground: Option<PathBuf>,
    },
}

pub fn run(args: DataArgs) -> Result<ExitCode> {
    match args.command {
        DataCommand::Matte {
            image,
            trimap,
            out,
            foreground,
        } => {
            let start = Instant::now();
            let stats = blipd_data::matte_file(&image, &trimap, &out, foreground.as_deref())
                .with_context(|| format!("matting {}", image.display()))?;
            println!(
                "{}: {} unknown pixels, {} CG iterations, {:.2} s → {}",
                image.display(),
                stats.unknown,
                stats.iterations,
                start.elapsed().as_secs_f64(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}
