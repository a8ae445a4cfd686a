"""`jaxmodels.host`: the kind of CPU that reports and the demo's excerpt records are keyed by."""

import platform

from jaxmodels import host

_INFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse2 {flags}

processor\t: 1
vendor_id\t: SomeoneElse
"""


def _described(monkeypatch, tmp_path, **fields):
    path = tmp_path / "cpuinfo"
    path.write_text(_INFO.format(**fields))
    monkeypatch.setattr(host, "_CPUINFO", path)
    host.cpu_description.cache_clear()
    try:
        return host.cpu_description()
    finally:
        host.cpu_description.cache_clear()


def test_the_kind_is_architecture_vendor_and_widest_vectors(monkeypatch, tmp_path):
    arch = platform.machine()
    amd = _described(monkeypatch, tmp_path, vendor="AuthenticAMD", model="AMD EPYC",
                     flags="avx avx2 fma")  # fmt: skip
    assert amd == {"kind": f"{arch}-AuthenticAMD-avx2", "model": "AMD EPYC"}
    intel = _described(monkeypatch, tmp_path, vendor="GenuineIntel", model="Xeon",
                       flags="avx2 avx512f avx512bw")  # fmt: skip
    assert intel["kind"] == f"{arch}-GenuineIntel-avx512"
    old = _described(monkeypatch, tmp_path, vendor="GenuineIntel", model="Core", flags="sse4_2")
    assert old["kind"] == f"{arch}-GenuineIntel"


def test_without_cpuinfo_the_kind_is_the_architecture(monkeypatch, tmp_path):
    monkeypatch.setattr(host, "_CPUINFO", tmp_path / "missing")
    host.cpu_description.cache_clear()
    try:
        assert host.cpu_description()["kind"] == platform.machine()
    finally:
        host.cpu_description.cache_clear()
