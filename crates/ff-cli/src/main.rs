//! The `fastflow` program.
fn main() {}
