//! Operations: metrics, the live stream of attempts, and retention of the delivery log.

pub mod attempt_log;
pub mod log;
pub mod metrics;
pub mod retention;
pub mod sched;
pub mod stream;
