"""keep_freed_memory: after it, a freed 16 MiB tensor stays in the process's heap for the next
step instead of being unmapped (read from glibc's own counters, in a fresh process)."""
import subprocess
import sys

SCRIPT = """
import ctypes, torch
from paco_ray.cpu_allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mapped_and_kept(n=16 << 20):
    x = torch.empty(n, dtype=torch.uint8)
    mapped = libc.mallinfo2().hblkhd
    del x
    return mapped, libc.mallinfo2().fordblks

mapped, kept = mapped_and_kept()
assert mapped >= 16 << 20 and kept < 16 << 20, (mapped, kept)  # glibc's default: its own mapping, unmapped on free
assert keep_freed_memory()
mapped, kept = mapped_and_kept()
assert mapped < 16 << 20 and kept >= 16 << 20, (mapped, kept)  # now from the heap, and kept there
print("kept")
"""


def test_freed_step_memory_stays_in_the_heap():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "kept" in done.stdout, done.stderr[-2000:]
