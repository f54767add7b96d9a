"""A burst of new connections against a running daemon, and what it costs the daemon's other
connections (README, Performance, the twenty-second session, item 1).

    python3 examples/bench/fd_burst.py N ROUNDS LABEL BINARY [LABEL BINARY ...]

For each round and binary: starts `BINARY serve` on a temp dir (loopback, ephemeral port),
probes GET /healthz over one keep-alive connection from a process of its own, and half a second
in opens N connections from another process, 50 at a time, each sending GET /healthz and
reading the answer before the next 50. Prints the probe's slowest answer, the burst's duration
and the daemon's descriptor table (FDSize) after it. Both client processes have one thread, so
no wait of theirs is the kernel's table growth; the daemon's is what it measures.
"""
import subprocess, sys, tempfile, os, socket, time, multiprocessing
def read_answer(s):
    """Reads one /healthz answer (its JSON body ends the read); fails if the daemon closes."""
    buf = b""
    while b"\r\n\r\n" not in buf or not buf.rstrip().endswith(b"}"):
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError("the daemon closed a connection before answering")
        buf += chunk
def probe(addr, stop_at, q):
    s = socket.create_connection(addr); s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    req = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"; lats = []
    while time.monotonic() < stop_at:
        t = time.monotonic(); s.sendall(req); read_answer(s)
        lats.append(time.monotonic() - t)
    q.put(lats)
def burst(addr, n, q):
    socks = []; t = time.monotonic()
    for i in range(0, n, 50):
        chunk = []
        for _ in range(min(50, n - i)):
            c = socket.create_connection(addr); c.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"); chunk.append(c)
        for c in chunk:
            read_answer(c)
        socks.extend(chunk)
    q.put(time.monotonic() - t)
def run(binary, n):
    d = tempfile.mkdtemp(dir="/tmp")
    cfg = os.path.join(d, "c.toml")
    open(cfg, "w").write(f'[server]\nlisten = "127.0.0.1:0"\n[storage]\npath = "{d}/db"\n')
    p = subprocess.Popen([binary, "serve", "--config", cfg], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    addr = None
    for line in p.stdout:
        if line.startswith("listening on "):
            h, port = line.split()[-1].rsplit(":", 1); addr = (h, int(port)); break
    if addr is None:
        sys.exit(f"{binary} exited without printing `listening on` (exit {p.wait()})")
    q1, q2 = multiprocessing.Queue(), multiprocessing.Queue()
    stop_at = time.monotonic() + 3.0
    pr = multiprocessing.Process(target=probe, args=(addr, stop_at, q1)); pr.start()
    time.sleep(0.5)
    b = multiprocessing.Process(target=burst, args=(addr, n, q2)); b.start()
    took = q2.get(); lats = q1.get(); pr.join(); b.join()
    fds = open(f"/proc/{p.pid}/status").read().split("FDSize:")[1].split()[0]
    p.terminate(); p.wait()
    subprocess.run(["rm", "-rf", d])
    lats.sort()
    return max(lats) * 1000, lats[len(lats) // 2] * 1000, took * 1000, fds
if __name__ == "__main__":
    usage = "usage: fd_burst.py N ROUNDS LABEL BINARY [LABEL BINARY ...]"
    if len(sys.argv) < 5 or len(sys.argv) % 2 == 0:
        sys.exit(usage)
    try:
        n = int(sys.argv[1]); rounds = int(sys.argv[2])
    except ValueError:
        sys.exit(f"N and ROUNDS are counts; {usage}")
    if n < 1 or rounds < 1:
        sys.exit(f"N and ROUNDS must be above 0; {usage}")
    for binary in sys.argv[4::2]:
        if not os.access(binary, os.X_OK):
            sys.exit(f"{binary}: not an executable file")
    for r in range(rounds):
        for label, b in zip(sys.argv[3::2], sys.argv[4::2]):
            mx, p50, took, fds = run(b, n)
            print(f"{label} round {r+1}: probe max {mx:.1f} ms (p50 {p50:.2f}); {n} connections opened and answered in {took:.0f} ms; FDSize after {fds}", flush=True)
