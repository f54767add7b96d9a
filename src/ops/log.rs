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
    /// Someone waits for what is queued to be written: no gathering.
    urgent: bool,
    /// The writer thread is gathering lines.
    gathering: bool,
    /// No more lines come: the thread writes what it holds and ends.
    closed: bool,
    /// The thread has ended.
    done: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Lines came (the first of a batch, or enough to end the gathering), `urgent` or `closed`.
    wake: Condvar,
    /// A batch was written, or the thread ended.
    written: Condvar,
    dropped: AtomicU64,
    limit: usize,
    write_buffer: usize,
}

/// Marks the writer thread ended however it ends, a panic included, so that nobody waits for it.
struct Ended<'a>(&'a Shared);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.queue().done = true;
        self.0.written.notify_all();
    }
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

    /// The writer thread: waits for a line, gathers for `gather` (or until `write_buffer` bytes
    /// queued), writes them out, again until closed.
    fn run<W: Write>(&self, mut out: W, gather: Duration) {
        let _ended = Ended(self);
        let mut batch = Vec::new();
        // The last write stopped within a line: the next starts on a line of its own.
        let mut broken = false;
        loop {
            let mut q = self.queue();
            while q.bytes.is_empty() && !q.closed {
                q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
            if q.bytes.is_empty() {
                return;
            }
            let until = Instant::now() + gather;
            q.gathering = true;
            while !q.closed && !q.urgent && q.bytes.len() < self.write_buffer {
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
            q.gathering = false;
            std::mem::swap(&mut q.bytes, &mut batch);
            // A flush waits for these lines only: the lines after them are gathered again.
            q.urgent = false;
            let lines = std::mem::take(&mut q.queued);
            q.writing = lines;
            drop(q);
            if broken && write_out(&mut out, b"\n").is_empty() {
                broken = false;
            }
            let unwritten = write_out(&mut out, &batch);
            let written = batch.len() - unwritten.len();
            if written > 0 {
                broken = batch[written - 1] != b'\n';
            }
            if !unwritten.is_empty() {
                // A closed stderr: the lines not written are lost, and counted as dropped.
                let lost = unwritten.iter().filter(|&&b| b == b'\n').count();
                self.dropped.fetch_add(lost as u64, Ordering::Relaxed);
            }
            batch.clear();
            // A burst's buffer is not kept for good.
            if batch.capacity() > 4 * self.write_buffer.max(4096) {
                batch.shrink_to(self.write_buffer.max(4096));
            }
            self.queue().writing = 0;
            self.written.notify_all();
        }
    }

    /// Ends the gathering and waits, at most `timeout`, until what is queued has been written.
    fn flush(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        let mut q = self.queue();
        if q.queued > 0 {
            q.urgent = true;
            self.wake.notify_one();
        }
        while (q.queued + q.writing) > 0 && !q.done {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            q = self
                .written
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Writes `bytes` to `out` as far as it takes them; returns what it did not take.
fn write_out<'a, W: Write>(out: &mut W, bytes: &'a [u8]) -> &'a [u8] {
    let mut rest = bytes;
    while !rest.is_empty() {
        match out.write(rest) {
            Ok(0) => break,
            Ok(n) => rest = &rest[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    let _ = out.flush();
    rest
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

    /// Whether the writer thread has ended.
    #[cfg(test)]
    fn ended(&self) -> bool {
        self.shared.queue().done
    }

    /// Whether the writer thread is gathering lines.
    #[cfg(test)]
    fn gathering(&self) -> bool {
        self.shared.queue().gathering
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
                .written
                .wait_timeout(q, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// A writer for `tracing_subscriber` that queues lines for a thread writing them to `out`, one
/// write a batch (what came within `gather` of its first line, or until `write_buffer` bytes
/// queued), holding up to `limit` lines and dropping (and counting) any beyond.
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
            urgent: false,
            gathering: false,
            closed: false,
            done: false,
        }),
        wake: Condvar::new(),
        written: Condvar::new(),
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

/// Has the process's stderr writer write out what is queued now, waiting at most `timeout`: for
/// a line that must not wait for the gathering, such as a panic's before the process aborts.
pub fn flush_stderr(timeout: Duration) {
    if let Some(shared) = STDERR.get() {
        shared.flush(timeout);
    }
}

/// Queues a line (newline included) for the process's stderr writer, as a `tracing` event's line
/// is queued; `false` when there is no such writer (its line is then not written).
pub fn push_stderr(line: &[u8]) -> bool {
    STDERR.get().map(|s| s.push(line)).is_some()
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
        wait_for("the lines kept", || out.lines() == 16);
        // Lines written make room again: 16 more are all kept.
        log_lines(writer.clone(), 16);
        wait_for("the next lines", || out.lines() == 32);
        assert_eq!(writer.dropped_lines(), 184);
        drop(guard);
        wait_for("the writer thread to end", || writer.ended());
        assert_eq!(out.lines(), 32, "every line kept is written out, once");
    }

    #[test]
    fn lines_that_come_together_go_out_in_one_write_and_the_guard_writes_them_out_at_once() {
        let out = Stuck::opened();
        // A gathering longer than the test: only dropping the guard ends it.
        let (writer, guard) = writer(out.clone(), 1000, 1 << 20, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 100);
        assert_eq!(out.lines(), 0, "the writer thread gathers");
        drop(guard);
        wait_for("the writer thread to end", || writer.ended());
        assert_eq!((out.lines(), out.writes()), (100, 1));
        assert_eq!(writer.dropped_lines(), 0);
    }

    #[test]
    fn a_full_write_buffer_ends_the_gathering() {
        // How long one line is.
        let probe = Stuck::opened();
        let (writer_, guard) = writer(probe.clone(), 10, 0, Duration::ZERO).unwrap();
        log_lines(writer_, 1);
        drop(guard);
        let line = probe.written.lock().unwrap().0.len();
        assert!(line > 20, "a line of {line} bytes");
        // A buffer of one and a half lines: the first line starts a minute of gathering, the
        // second fills the buffer and ends it.
        let out = Stuck::opened();
        let (writer, guard) =
            writer(out.clone(), 1000, line + line / 2, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 1);
        wait_for("the gathering", || writer.gathering());
        log_lines(writer.clone(), 1);
        wait_for("two lines", || out.lines() == 2);
        assert_eq!(out.writes(), 1, "both lines in one write");
        drop(guard);
        assert_eq!(writer.dropped_lines(), 0);
    }

    #[test]
    fn a_flush_writes_out_what_is_queued_without_waiting_for_the_gathering() {
        let out = Stuck::opened();
        let (writer, _guard) = writer(out.clone(), 1000, 1 << 20, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 5);
        assert_eq!(out.lines(), 0, "the writer thread gathers");
        writer.shared.flush(Duration::from_secs(10));
        assert_eq!(out.lines(), 5, "written when the flush returns");
        // The gathering goes on for the lines after.
        log_lines(writer.clone(), 5);
        assert_eq!(out.lines(), 5);
        assert!(!writer.ended());
    }

    #[test]
    fn lines_lost_to_a_closed_stderr_are_counted_as_dropped() {
        // A stderr whose reader went away.
        let (closed, _) = Cut::new(0, false);
        let (writer, guard) = writer(closed, 1000, 1 << 20, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 50);
        drop(guard);
        wait_for("the writer thread to end", || writer.ended());
        assert_eq!(writer.dropped_lines(), 50);
    }

    /// A stderr that takes `room` bytes, then fails: for good, or once when `recovers`.
    struct Cut {
        room: Option<usize>,
        recovers: bool,
        written: Arc<Mutex<Vec<u8>>>,
    }

    impl Cut {
        fn new(room: usize, recovers: bool) -> (Cut, Arc<Mutex<Vec<u8>>>) {
            let written = Arc::new(Mutex::new(Vec::new()));
            let cut = Cut {
                room: Some(room),
                recovers,
                written: written.clone(),
            };
            (cut, written)
        }
    }

    impl Write for Cut {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = match self.room {
                Some(0) => {
                    if self.recovers {
                        self.room = None;
                    }
                    return Err(std::io::ErrorKind::BrokenPipe.into());
                }
                Some(room) => {
                    let n = buf.len().min(room);
                    self.room = Some(room - n);
                    n
                }
                None => buf.len(),
            };
            self.written.lock().unwrap().extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_write_that_fails_part_way_counts_only_the_lines_not_written() {
        let (out, written) = Cut::new(1000, false);
        let (writer, guard) = writer(out, 1000, 1 << 20, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 50);
        drop(guard);
        wait_for("the writer thread to end", || writer.ended());
        let written = written.lock().unwrap();
        assert_eq!(written.len(), 1000);
        let whole = written.iter().filter(|&&b| b == b'\n').count();
        assert!((1..50).contains(&whole), "{whole} whole lines written");
        // The line cut short is counted with those not written at all.
        assert_eq!(writer.dropped_lines(), 50 - whole as u64);
    }

    #[test]
    fn after_a_line_cut_short_the_next_line_starts_on_a_line_of_its_own() {
        let (out, written) = Cut::new(30, true);
        let (writer, _guard) = writer(out, 1000, 1 << 20, Duration::from_secs(60)).unwrap();
        log_lines(writer.clone(), 3);
        writer.shared.flush(Duration::from_secs(10));
        assert_eq!(
            writer.dropped_lines(),
            3,
            "the line cut short and the two after it"
        );
        log_lines(writer.clone(), 1);
        writer.shared.flush(Duration::from_secs(10));
        let written = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = written.lines().collect();
        assert_eq!(lines.len(), 2, "{written:?}");
        assert_eq!(lines[0].len(), 30, "the line cut short: {written:?}");
        assert!(
            lines[1].ends_with("attempt i=0"),
            "a whole line: {written:?}"
        );
        assert_eq!(writer.dropped_lines(), 3);
    }
}
