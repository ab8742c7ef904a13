//! Child processes for the crash tests: each re-runs one ignored test of
//! its own binary as a child (the process to kill), through the test kit's
//! [`troupe::testing::Child`].

pub use troupe::testing::Child;

/// Runs the ignored test `name` of this binary with `env` set.
pub fn spawn(name: &str, env: &[(&str, String)]) -> Child {
    Child::spawn(name, env).expect("spawn the child test process")
}
