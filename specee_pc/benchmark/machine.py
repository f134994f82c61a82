"""What a benchmark ran on: the machine and the library versions, for its JSON."""
import os
import platform
import sys


def _first_line_with(path: str, key: str) -> str:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def machine_info() -> dict:
    import gguf
    import llama_cpp
    import numpy

    from .. import __version__

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": _first_line_with("/proc/cpuinfo", "model name") or platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "usable_cpus": usable,
        "memory": _first_line_with("/proc/meminfo", "MemTotal"),
        "python": sys.version.split()[0],
        "specee_pc": __version__,
        "llama_cpp_python": llama_cpp.__version__,
        "numpy": numpy.__version__,
        "gguf": getattr(gguf, "__version__", "unknown"),
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip(),
        "gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
    }
