//! The `reflex` binary: parses the command line and calls the library.

mod cli;

/// mimalloc: the ingest path allocates per request on several threads, where glibc's
/// allocator showed ~10% of the CPU profile.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    cli::main()
}
