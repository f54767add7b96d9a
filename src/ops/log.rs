//! Where the daemon's log lines go: formatted on the thread that logs, handed over to one thread
//! of their own that writes them to stderr (through `tracing-appender`'s non-blocking writer).
//!
//! A delivery worker never waits on stderr. Before, each line was written to stderr by the
//! worker that logged it, so a reader that stopped reading (a terminal in scroll mode, a stalled
//! journald, a full pipe) stopped every delivery once the pipe's buffer was full. Now up to
//! [`BUFFERED_LINES`] lines wait in memory for stderr; past that, lines are dropped and counted
//! (`dispatcher_log_lines_dropped_total`, and a warning once lines get through again). What an
//! attempt did is never only in the log: the delivery log (`GET /v1/deliveries`) and
//! `dispatcher tail` have every attempt.

use std::io::Write;
use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines held for stderr while it is written slower than they come. An attempt's line is about
/// 300 bytes, so a reader that stopped reading costs up to about 20 MiB; at 25,000 attempts a
/// second that is 2.6 s of lines.
pub const BUFFERED_LINES: usize = 65_536;

/// Bytes gathered before a write to stderr: the writer thread writes what queued meanwhile as
/// one `write`, and writes out what it has whenever the queue runs empty.
const WRITE_BUFFER: usize = 64 * 1024;

/// The counter of the process's stderr writer, once [`stderr`] made it.
static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// A writer for `tracing_subscriber` that hands lines to a thread writing them to `out` in
/// writes of up to `write_buffer` bytes, holding up to `limit` lines in its queue and dropping
/// (and counting) any beyond. Dropping the guard writes out what is held (waiting up to about a
/// second for `out`).
pub fn writer<W: Write + Send + 'static>(
    out: W,
    limit: usize,
    write_buffer: usize,
) -> (NonBlocking, WorkerGuard) {
    NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(limit)
        .thread_name("log-writer")
        .finish(std::io::BufWriter::with_capacity(write_buffer, out))
}

/// The process's stderr writer; its dropped lines are what [`dropped_lines`] reports.
pub fn stderr() -> (NonBlocking, WorkerGuard) {
    let (writer, guard) = writer(std::io::stderr(), BUFFERED_LINES, WRITE_BUFFER);
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// Lines the process's stderr writer dropped so far (0 when logging does not go through it, as
/// in a dispatcher embedded in another program).
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// A stderr that nobody reads until `open` is called, and that keeps what it was given.
    #[derive(Clone, Default)]
    struct Stuck {
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Stuck {
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
        fn lines(&self) -> usize {
            self.written
                .lock()
                .unwrap()
                .iter()
                .filter(|b| **b == b'\n')
                .count()
        }
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut open = self.open.0.lock().unwrap();
            while !*open {
                open = self.open.1.wait(open).unwrap();
            }
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stderr_nobody_reads_holds_the_limit_drops_and_counts_the_rest_and_blocks_no_one() {
        let out = Stuck::default();
        // No write buffer: the writer thread's first write to the stuck stderr blocks it.
        let (writer, guard) = writer(out.clone(), 16, 0);
        let counter = writer.error_counter();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false),
        );
        // Returns although nothing is written: the logging thread never waits for stderr.
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..200 {
                tracing::info!(i, "attempt");
            }
        });
        assert_eq!(out.lines(), 0, "nothing reached the stuck stderr");
        // The writer thread took the first line and is stuck writing it; the queue holds 16
        // more: 17 lines kept at most, 183 dropped at least, all counted.
        let dropped = counter.dropped_lines();
        assert!((183..=184).contains(&dropped), "{dropped} lines dropped");
        out.open();
        let kept = 200 - dropped;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while out.lines() < kept && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        drop(guard);
        assert_eq!(out.lines(), kept, "every line kept is written out, once");
    }
}
