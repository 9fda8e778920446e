//! `coordinator`: not yet implemented (see the coordinator issue).

fn main() {
    eprintln!("coordinator: the SpecFuse and CharED strategies are not implemented yet");
    std::process::exit(2);
}
