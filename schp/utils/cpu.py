"""What the CPU can do natively, from the kernel's /proc/cpuinfo (no project imports: read by the
precision warning and by the backend choice alike)."""
from typing import Optional

# /proc/cpuinfo flags of CPUs whose bf16 arithmetic is native: AVX-512 BF16, AMX (x86); BF16 (Arm).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> Optional[frozenset]:
    """The CPU feature flags the kernel reports (x86 `flags`, Arm `Features`); None where unknown."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    return None


def native_bf16(flags: Optional[frozenset] = None) -> Optional[bool]:
    """True where the CPU has bf16 units, False where it has none, None where the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    return None if flags is None else bool(flags & BF16_CPU_FLAGS)


def avx2_without_avx512(flags: Optional[frozenset] = None) -> bool:
    """Whether this is an x86 CPU with AVX2 and no AVX-512 (`auto` orders the runtimes by such classes of
    CPU, as measured); False where the flags are unknown."""
    flags = cpu_flags() if flags is None else flags
    return flags is not None and "avx2" in flags and "avx512f" not in flags
