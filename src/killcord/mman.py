"""<sys/mman.h> through ctypes: the memory calls the stdlib does not expose (Python's mmap
object gives no address, has no mincore or mlockall, and holds the GIL while the kernel
populates), nor does psutil. Resolved at import, never at fire time."""

from __future__ import annotations

import ctypes

# Values for x86, arm, riscv and most others (alpha, powerpc and sparc differ).
MCL_CURRENT = 1
MCL_FUTURE = 2
PROT_READ, PROT_WRITE = 0x1, 0x2
MAP_SHARED, MAP_PRIVATE, MAP_ANONYMOUS = 0x01, 0x02, 0x20
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault every page in for writing, or fail
MAP_FAILED = ctypes.c_void_p(-1).value

# CDLL(None): the symbols already loaded into the interpreter, i.e. glibc's; nothing to
# dlopen. A CDLL call releases the GIL while it runs.
_libc = ctypes.CDLL(None, use_errno=True)

mlockall = _libc.mlockall
mlockall.argtypes = [ctypes.c_int]
mlockall.restype = ctypes.c_int

mmap = _libc.mmap
mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
mmap.restype = ctypes.c_void_p

munmap = _libc.munmap
munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
munmap.restype = ctypes.c_int

madvise = _libc.madvise
madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
madvise.restype = ctypes.c_int

mincore = _libc.mincore
mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
mincore.restype = ctypes.c_int
