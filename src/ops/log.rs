//! Where the daemon's log lines go: formatted on the thread that logs, queued in memory, and
//! written to stderr by one thread of their own, a few milliseconds' worth of lines at a time.
//!
//! A delivery worker never waits on stderr. Before, each line was written to stderr by the
//! worker that logged it, so a reader that stopped reading (a terminal in scroll mode, a stalled
//! journald, a full pipe) stopped every delivery once the pipe's buffer was full. Now up to
//! [`BUFFERED_LINES`] lines wait in memory for stderr; past that, lines are dropped and counted
//! (`dispatcher_log_lines_dropped_total`, and a warning once lines get through again). What an
//! attempt did is never only in the log: the delivery log (`GET /v1/deliveries`) and
//! `dispatcher tail` have every attempt.
//!
//! Why not `tracing-appender`'s non-blocking writer, which this replaced: it hands each line over
//! a channel as an allocation of its own, wakes its thread every few lines, and that thread spins
//! and yields in the channel's receive before it sleeps (tokio-rs/tracing#3446). Under the
//! benchmark that was 3–4% of the daemon's CPU. Here a line is appended to one buffer under a
//! lock, the thread is woken once for the first line of a batch, and it gathers for [`GATHER`]
//! before it writes them all with one `write`.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

/// Lines held for stderr while it is written slower than they come (those being written
/// included). An attempt's line is about 300 bytes, so a reader that stopped reading costs up to
/// about 20 MiB; at 25,000 attempts a second that is 2.6 s of lines.
pub const BUFFERED_LINES: usize = 65_536;

/// How long the writer thread gathers lines after the first one of a batch, before it writes
/// them out: the most a line waits for stderr when stderr keeps up.
const GATHER: Duration = Duration::from_millis(5);

/// Bytes queued that end the gathering early.
const WRITE_BUFFER: usize = 64 * 1024;

/// How long dropping the guard waits for the lines still held to be written.
const WRITE_OUT: Duration = Duration::from_secs(1);

/// The queue of the process's stderr writer, once [`stderr`] made it.
static STDERR: OnceLock<Arc<Shared>> = OnceLock::new();

struct Queue {
    /// Lines waiting for the writer thread, one after another.
    bytes: Vec<u8>,
    /// Lines in `bytes`.
    queued: usize,
    /// Lines the writer thread took and is writing.
    writing: usize,
    /// No more lines come: the thread writes what it holds and ends.
    closed: bool,
    /// The thread has ended.
    done: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Lines came (the first of a batch, or enough to end the gathering), or `closed`.
    wake: Condvar,
    /// The thread ended.
    ended: Condvar,
    dropped: AtomicU64,
    limit: usize,
    write_buffer: usize,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        // A line is only appended under the lock: a panic cannot leave it half done.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn push(&self, line: &[u8]) {
        let mut q = self.queue();
        if q.queued + q.writing >= self.limit || q.closed {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = q.bytes.len();
        q.bytes.extend_from_slice(line);
        q.queued += 1;
        // The thread waits for the first line of a batch, then for the batch to fill.
        if before == 0 || (before < self.write_buffer && q.bytes.len() >= self.write_buffer) {
            self.wake.notify_one();
        }
    }

    /// The writer thread: waits for a line, gathers for [`GATHER`] (or until `write_buffer`
    /// bytes queued), writes them out, again until closed.
    fn run<W: Write>(&self, mut out: W, gather: Duration) {
        let mut batch = Vec::new();
        loop {
            let mut q = self.queue();
            while q.bytes.is_empty() && !q.closed {
                q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.bytes.is_empty() {
                q.done = true;
                self.ended.notify_all();
                return;
            }
            let until = Instant::now() + gather;
            while !q.closed && q.bytes.len() < self.write_buffer {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                q = self
                    .wake
                    .wait_timeout(q, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            std::mem::swap(&mut q.bytes, &mut batch);
            let lines = std::mem::take(&mut q.queued);
            q.writing = lines;
            drop(q);
            if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                // A closed stderr: the lines are lost, and counted as dropped.
                self.dropped.fetch_add(lines as u64, Ordering::Relaxed);
            }
            batch.clear();
            // A burst's buffer is not kept for good.
            batch.shrink_to(self.write_buffer.max(4096));
            self.queue().writing = 0;
        }
    }
}

/// A `tracing_subscriber` writer that queues each line for a thread writing them to stderr.
#[derive(Clone)]
pub struct LogWriter {
    shared: Arc<Shared>,
}

/// One line being written: `tracing_subscriber` formats an event and writes it with one call.
pub struct Line<'a>(&'a Shared);

impl Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for LogWriter {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Line<'a> {
        Line(&self.shared)
    }
}

impl LogWriter {
    /// Lines dropped so far: beyond the limit, or lost to a failed write.
    pub fn dropped_lines(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

/// Writes out the lines still held when dropped (waiting up to a second for stderr), and ends
/// the writer thread.
pub struct LogGuard {
    shared: Arc<Shared>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let mut q = self.shared.queue();
        q.closed = true;
        self.shared.wake.notify_all();
        let until = Instant::now() + WRITE_OUT;
        while !q.done {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            q = self
                .shared
                .ended
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A writer for `tracing_subscriber` that queues lines for a thread writing them to `out` in
/// writes of up to `write_buffer` bytes (or what came within `gather`), holding up to `limit`
/// lines and dropping (and counting) any beyond.
fn writer<W: Write + Send + 'static>(
    out: W,
    limit: usize,
    write_buffer: usize,
    gather: Duration,
) -> std::io::Result<(LogWriter, LogGuard)> {
    let shared = Arc::new(Shared {
        queue: Mutex::new(Queue {
            bytes: Vec::new(),
            queued: 0,
            writing: 0,
            closed: false,
            done: false,
        }),
        wake: Condvar::new(),
        ended: Condvar::new(),
        dropped: AtomicU64::new(0),
        limit,
        write_buffer,
    });
    let thread = shared.clone();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || thread.run(out, gather))?;
    Ok((
        LogWriter {
            shared: shared.clone(),
        },
        LogGuard { shared },
    ))
}

/// The process's stderr writer; its dropped lines are what [`dropped_lines`] reports.
pub fn stderr() -> std::io::Result<(LogWriter, LogGuard)> {
    let (writer, guard) = writer(std::io::stderr(), BUFFERED_LINES, WRITE_BUFFER, GATHER)?;
    let _ = STDERR.set(writer.shared.clone());
    Ok((writer, guard))
}

/// Lines the process's stderr writer dropped so far (0 when logging does not go through it, as
/// in a dispatcher embedded in another program).
pub fn dropped_lines() -> u64 {
    STDERR
        .get()
        .map_or(0, |s| s.dropped.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Condvar, Mutex};
    use tracing_subscriber::layer::SubscriberExt;

    /// A stderr that nobody reads until `open` is called, and that keeps what it was given and
    /// how many writes gave it.
    #[derive(Clone, Default)]
    struct Stuck {
        open: Arc<(Mutex<bool>, Condvar)>,
        written: Arc<Mutex<(Vec<u8>, usize)>>,
    }

    impl Stuck {
        fn opened() -> Stuck {
            let out = Stuck::default();
            out.open();
            out
        }
        fn open(&self) {
            *self.open.0.lock().unwrap() = true;
            self.open.1.notify_all();
        }
        fn lines(&self) -> usize {
            let written = self.written.lock().unwrap();
            written.0.iter().filter(|b| **b == b'\n').count()
        }
        fn writes(&self) -> usize {
            self.written.lock().unwrap().1
        }
    }

    impl Write for Stuck {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut open = self.open.0.lock().unwrap();
            while !*open {
                open = self.open.1.wait(open).unwrap();
            }
            let mut written = self.written.lock().unwrap();
            written.0.extend_from_slice(buf);
            written.1 += 1;
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A stderr whose reader went away.
    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Logs `n` lines through `writer`.
    fn log_lines(writer: LogWriter, n: usize) {
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_writer(writer)
                .with_ansi(false),
        );
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..n {
                tracing::info!(i, "attempt");
            }
        });
    }

    fn wait_for(what: &str, done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn a_stderr_nobody_reads_holds_the_limit_drops_and_counts_the_rest_and_blocks_no_one() {
        let out = Stuck::default();
        // No gathering: the writer thread takes the first lines at once, and its first write to
        // the stuck stderr blocks it.
        let (writer, guard) = writer(out.clone(), 16, 0, Duration::ZERO).unwrap();
        // Returns although nothing is written: the logging thread never waits for stderr.
        log_lines(writer.clone(), 200);
        assert_eq!(out.lines(), 0, "nothing reached the stuck stderr");
        // 16 lines held at most, those the writer thread is stuck on included: the other 184
        // are dropped, all counted.
        assert_eq!(writer.dropped_lines(), 184);
        out.open();
        wait_for("the lines kept", || out.lines() >= 16);
        drop(guard);
        assert_eq!(out.lines(), 16, "every line kept is written out, once");
        // Lines held again take the room of those written.
        assert_eq!(writer.dropped_lines(), 184);
    }

    #[test]
    fn lines_that_come_together_go_out_in_one_write_and_the_guard_writes_them_out_at_once() {
        let out = Stuck::opened();
        // A gathering longer than the test: only dropping the guard ends it.
        let (writer, guard) = writer(out.clone(), 1000, 1 << 20, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 100);
        assert_eq!(out.lines(), 0, "the writer thread gathers");
        let dropping = Instant::now();
        drop(guard);
        assert!(
            dropping.elapsed() < Duration::from_secs(30),
            "the guard ends the gathering"
        );
        assert_eq!((out.lines(), out.writes()), (100, 1));
        assert_eq!(writer.dropped_lines(), 0);
    }

    #[test]
    fn a_full_write_buffer_ends_the_gathering() {
        let out = Stuck::opened();
        // Each line is longer than the 50-byte buffer: none waits out the minute of gathering.
        let (writer, guard) = writer(out.clone(), 1000, 50, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 3);
        wait_for("three lines", || out.lines() == 3);
        drop(guard);
        assert_eq!(writer.dropped_lines(), 0);
    }

    #[test]
    fn lines_lost_to_a_closed_stderr_are_counted_as_dropped() {
        let (writer, guard) = writer(Closed, 1000, 1 << 20, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 50);
        drop(guard);
        assert_eq!(writer.dropped_lines(), 50);
    }
}
