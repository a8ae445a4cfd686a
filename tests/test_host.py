"""`jaxmodels.host`: the kind of CPU that reports and the demo's excerpt records are keyed by."""

import platform

import pytest

from jaxmodels import host

_INFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse2 {flags}

processor\t: 1
vendor_id\t: SomeoneElse
"""


@pytest.fixture
def cpuinfo(monkeypatch, tmp_path):
    """Points `host` at a file of this test's (missing until written); the memo is cleared
    around the test so no other test sees a made-up CPU."""
    path = tmp_path / "cpuinfo"
    monkeypatch.setattr(host, "_CPUINFO", path)
    host.cpu_description.cache_clear()
    yield path
    host.cpu_description.cache_clear()


def _described(path, **fields):
    path.write_text(_INFO.format(**fields))
    host.cpu_description.cache_clear()
    return host.cpu_description()


def test_the_kind_is_architecture_vendor_and_widest_vectors(cpuinfo):
    arch = platform.machine()
    amd = _described(cpuinfo, vendor="AuthenticAMD", model="AMD EPYC", flags="avx avx2 fma")
    assert amd == {"kind": f"{arch}-AuthenticAMD-avx2", "model": "AMD EPYC"}
    intel = _described(cpuinfo, vendor="GenuineIntel", model="Xeon", flags="avx2 avx512f avx512bw")
    assert intel["kind"] == f"{arch}-GenuineIntel-avx512"
    old = _described(cpuinfo, vendor="GenuineIntel", model="Core", flags="sse4_2")
    assert old["kind"] == f"{arch}-GenuineIntel"


def test_without_cpuinfo_the_kind_is_the_architecture(cpuinfo):
    assert host.cpu_description()["kind"] == platform.machine()
