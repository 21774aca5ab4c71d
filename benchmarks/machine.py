"""What machine a measurement ran on, recorded beside every throughput figure.

The project's 2-core machines differ from session to session (one measured 2.2-3x slower than
another), and `platform.processor()` says only "x86_64" or nothing, so a results file needs the
CPU's model name, family/model numbers and vector extensions to be read against another.
"""

import os
import pathlib
import platform

# The vector extensions that decide XLA's CPU matmul speed (AVX-512 doubles the width of AVX2).
VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")


def parse_cpuinfo(text: str) -> dict:
    """The first processor's entry of /proc/cpuinfo: model name, family/model, vector flags."""
    first = text.strip().split("\n\n")[0]
    fields = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    flags = set(fields.get("flags", "").split())
    return {
        "model_name": fields.get("model name", "unknown"),
        "cpu_family": fields.get("cpu family", "unknown"),
        "model": fields.get("model", "unknown"),
        "vector_flags": [flag for flag in VECTOR_FLAGS if flag in flags],
    }


def machine_info(cpuinfo: pathlib.Path = pathlib.Path("/proc/cpuinfo")) -> dict:
    info = {"arch": platform.machine(), "cpus": os.cpu_count()}
    if cpuinfo.is_file():
        info.update(parse_cpuinfo(cpuinfo.read_text()))
    return info
