//! Operations: metrics, the live stream of attempts, retention of the delivery log, and two
//! settings the daemon makes at start (its descriptor table; the storage writer's time slice).

pub mod attempt_log;
pub mod fds;
pub mod log;
pub mod metrics;
pub mod retention;
pub mod sched;
pub mod stream;
