"""Runs a command on a pseudo-terminal of 30 rows x 120 columns as its stdin,
stdout and stderr, and writes everything it printed to our stdout (raw bytes);
exits with the command's exit code."""
import fcntl
import os
import pty
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
out = bytearray()
while True:
    try:
        chunk = os.read(master, 65536)
    except OSError:  # EIO: the child closed the terminal
        break
    if not chunk:
        break
    out += chunk
_, status = os.waitpid(pid, 0)
sys.stdout.buffer.write(bytes(out))
sys.stdout.buffer.flush()
sys.exit(os.waitstatus_to_exitcode(status))
