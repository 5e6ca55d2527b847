//! `pooler` binary: not built yet (see the crate docs).

fn main() -> std::process::ExitCode {
    eprintln!("pooler: not implemented yet; see shared/design.md");
    std::process::ExitCode::FAILURE
}
