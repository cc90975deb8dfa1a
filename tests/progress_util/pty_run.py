"""Runs a command on a pseudo-terminal of 30 rows x 120 columns as its stdin,
stdout and stderr, and writes everything it printed to our stdout (raw bytes);
exits with the command's exit code. With PTY_SIGNAL=INT|TERM and PTY_SIGNAL_AFTER=TEXT
in the environment, sends that signal to the command once TEXT has been printed."""
import fcntl
import os
import pty
import signal
import struct
import sys
import termios

master, slave = pty.openpty()
fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
pid = os.fork()
if pid == 0:
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)
    os.close(master)
    os.close(slave)
    os.execvp(sys.argv[1], sys.argv[1:])
os.close(slave)
sig = os.environ.get("PTY_SIGNAL")
after = os.environ.get("PTY_SIGNAL_AFTER", "").encode()
out = bytearray()
while True:
    try:
        chunk = os.read(master, 65536)
    except OSError:  # EIO: the child closed the terminal
        break
    if not chunk:
        break
    out += chunk
    if sig and after in out:
        os.kill(pid, getattr(signal, "SIG" + sig))
        sig = None
_, status = os.waitpid(pid, 0)
sys.stdout.buffer.write(bytes(out))
sys.stdout.buffer.flush()
sys.exit(os.waitstatus_to_exitcode(status))
