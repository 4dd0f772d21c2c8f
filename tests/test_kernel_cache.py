"""The fused CPU kernels' build and cache (issue 11: a cache that cannot crash or be
hijacked; issue 12: a build without spurious warnings, and a failed build that shows its
first error).

End-to-end cases run in a subprocess with their own ``NORMLAB_CACHE_DIR``: a truncated
library (which used to SIGBUS every process) is rebuilt; a library planted in a directory
others can write, or that another user owns, is never loaded — its constructor, which would
write a marker file, never runs.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normlab.kernels import _cpu_source, cpu

pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"no fused CPU kernels: {cpu.build_error()}")

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _python(code: str, cache: Path, **env) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with NORMLAB_CACHE_DIR=cache."""
    environ = {k: v for k, v in os.environ.items() if k not in ("NORMLAB_NO_COMPILE",)}
    environ.update(NORMLAB_CACHE_DIR=str(cache), PYTHONPATH=SRC + os.pathsep
                   + environ.get("PYTHONPATH", ""), **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=600, env=environ)


def _private_cache(tmp_path: Path) -> Path:
    """A cache directory holding this session's library and its digest (no build needed)."""
    cache = tmp_path / "cache"
    kernels = cache / "kernels"
    kernels.mkdir(parents=True, mode=0o700)
    os.chmod(cache, 0o700)
    os.chmod(kernels, 0o700)
    lib = Path(cpu.library_path())
    if lib.exists() and cpu._verified(lib):
        shutil.copy2(lib, kernels / lib.name)
        shutil.copy2(cpu._digest_file(lib), kernels / (lib.name + ".sha256"))
    return kernels


USE_KERNELS = """
    import torch, normlab
    from normlab.kernels import cpu
    assert cpu.available(), cpu.build_error()
    x = torch.randn(4, 3, 5, 5)
    y = normlab.FilteredBatchNorm2d(3)(x)
    assert torch.isfinite(y).all()
    print(cpu.library_path())
"""


def test_truncated_library_is_rebuilt_not_mapped(tmp_path):
    kernels = _private_cache(tmp_path)
    first = _python(USE_KERNELS, kernels.parent)
    assert first.returncode == 0, first.stderr
    lib = Path(first.stdout.strip().splitlines()[-1])
    assert lib.parent == kernels and cpu._verified(lib)
    data = lib.read_bytes()
    lib.write_bytes(data[: len(data) // 3])  # a torn write / full disk: used to SIGBUS (135)
    second = _python(USE_KERNELS, kernels.parent)
    assert second.returncode == 0, (second.returncode, second.stderr[-2000:])
    assert second.stdout.strip().splitlines()[-1] == str(lib)
    assert cpu._verified(lib) and lib.stat().st_size == len(data)


PLANTED = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void)
{
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("constructor ran\n", f); fclose(f); }
}
"""


def _plant(tmp_path: Path) -> tuple[Path, Path]:
    """A shared library whose constructor writes a marker file (and a matching digest, as
    an attacker who can write the directory would also write)."""
    marker = tmp_path / "marker"
    src = tmp_path / "planted.c"
    src.write_text(PLANTED)
    lib = tmp_path / "planted.so"
    subprocess.run([cpu._compiler(), "-shared", "-fPIC", f'-DMARKER="{marker}"', str(src), "-o",
                    str(lib)], check=True, capture_output=True)
    return lib, marker


PLANT_AND_LOAD = """
    import os, shutil, hashlib, warnings
    from pathlib import Path
    {prelude}
    from normlab.kernels import cpu, _cpu_source
    kernels = Path(os.environ["NORMLAB_CACHE_DIR"]) / "kernels"
    planted = Path({planted!r})
    source = _cpu_source.digest()
    for flags in cpu._FLAG_SETS:  # under every name the loader could look for
        target = kernels / cpu._library_name(source, flags)
        shutil.copy(planted, target)
        cpu._digest_file(target).write_text(hashlib.sha256(target.read_bytes()).hexdigest())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = cpu.available()
    print("available", ok, cpu.library_path())
    for w in caught:
        print("WARNING", w.category.__name__, w.message)
"""


@pytest.mark.parametrize("how", ["world-writable", "group-writable", "foreign-owned"])
def test_library_in_a_directory_others_control_is_never_loaded(tmp_path, how):
    """The planted library's constructor would write the marker the moment it is mapped.
    CC=false: nothing can be built here, so the only library on offer is the planted one."""
    planted, marker = _plant(tmp_path)
    cache = tmp_path / "cache"
    kernels = cache / "kernels"
    kernels.mkdir(parents=True)
    prelude = ""
    if how == "world-writable":
        os.chmod(kernels, 0o777)
    elif how == "group-writable":
        os.chmod(kernels, 0o770)
    else:  # another user owns the directory (seen from a process with another uid)
        os.chmod(kernels, 0o755)
        prelude = "_uid = os.geteuid(); os.geteuid = lambda: _uid + 4242"
    res = _python(PLANT_AND_LOAD.format(prelude=prelude, planted=str(planted)), cache,
                  CC=shutil.which("false") or "false")
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), "the planted library was loaded"
    assert "available False" in res.stdout
    expected = {"world-writable": "writable by group or others",
                "group-writable": "writable by group or others",
                "foreign-owned": "not by this user"}[how]
    warns = [ln for ln in res.stdout.splitlines() if ln.startswith("WARNING RuntimeWarning")]
    assert any(expected in ln and str(kernels) in ln for ln in warns), res.stdout


def test_refused_directory_still_gets_kernels_built_privately(tmp_path):
    """With a world-writable cache the kernels are built in a private temporary directory
    (one RuntimeWarning naming the directory and the fix) and work; the planted library is
    never mapped."""
    planted, marker = _plant(tmp_path)
    cache = tmp_path / "cache"
    (cache / "kernels").mkdir(parents=True)
    os.chmod(cache / "kernels", 0o777)
    res = _python(PLANT_AND_LOAD.format(prelude="", planted=str(planted)) + """
    import torch, normlab
    y = normlab.FilteredBatchNorm2d(3)(torch.randn(4, 3, 5, 5))
    assert torch.isfinite(y).all()
    """, cache)
    assert res.returncode == 0, res.stderr
    assert not marker.exists()
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("available"))
    assert line.startswith("available True") and str(cache) not in line
    warns = [ln for ln in res.stdout.splitlines() if ln.startswith("WARNING")]
    assert len(warns) == 1 and "NORMLAB_CACHE_DIR" in warns[0] and "mode 700" in warns[0]


def test_new_cache_directory_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE_DIR", str(tmp_path / "fresh" / "normlab"))
    directory, why = cpu._cache_location()
    assert why is None and directory == tmp_path / "fresh" / "normlab" / "kernels"
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700


def test_private_directory_rule(tmp_path, monkeypatch):
    d = tmp_path / "d"
    d.mkdir(mode=0o700)
    os.chmod(d, 0o700)
    assert cpu._not_private(d) is None
    os.chmod(d, 0o750)
    assert cpu._not_private(d) is None  # readable by the group: fine
    for mode in (0o770, 0o702, 0o777):
        os.chmod(d, mode)
        assert "writable by group or others" in cpu._not_private(d)
    os.chmod(d, 0o700)
    uid = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: uid + 1)
    assert "not by this user" in cpu._not_private(d)
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    # an ancestor others can write (and rename our directory in): refused; sticky (/tmp): fine
    parent = tmp_path / "open"
    child = parent / "kernels"
    child.mkdir(parents=True)
    os.chmod(child, 0o700)
    os.chmod(parent, 0o777)
    assert "writable by others" in cpu._not_private(child)
    os.chmod(parent, 0o777 | stat.S_ISVTX)
    assert cpu._not_private(child) is None
    (tmp_path / "file").write_text("")
    assert "not a directory" in cpu._not_private(tmp_path / "file")


def test_library_is_verified_by_its_digest_before_loading(tmp_path):
    lib = Path(cpu.library_path())
    copy = tmp_path / lib.name
    shutil.copy2(lib, copy)
    assert not cpu._verified(copy)  # no digest: never loaded
    digest = cpu._digest_file(copy)
    digest.write_text(hashlib.sha256(copy.read_bytes()).hexdigest())
    assert cpu._verified(copy)
    os.chmod(copy, 0o722)
    assert not cpu._verified(copy)  # writable by others
    os.chmod(copy, 0o700)
    data = copy.read_bytes()
    copy.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit changed
    assert not cpu._verified(copy)
    digest.write_text("garbage")
    assert not cpu._verified(copy)


X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 1
model name\t: AMD EPYC 7B13
cpu MHz\t\t: 2450.000
flags\t\t: fpu sse sse2 avx avx2 fma bmi2
bogomips\t: 4900.00

processor\t: 1
cpu MHz\t\t: 2449.998
"""
ARM = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x3
CPU part\t: 0xd0c
CPU revision\t: 1
"""


def test_cache_key_separates_cpus_on_every_architecture(monkeypatch):
    """The key holds the machine and the first processor's description without its volatile
    fields: on aarch64 (no "model name" or "flags", the old key) the part, variant, revision
    and features; on x86 the model and flags. Clock and BogoMIPS do not change it."""
    ident = cpu._cpu_identity
    assert ident(X86) == ident(X86.replace("2450.000", "1800.000").replace("4900.00", "4899.7"))
    assert ident(X86) != ident(X86.replace(" avx2", ""))
    assert ident(X86) != ident(X86.replace("7B13", "7763"))
    assert ident(ARM) == ident(ARM.replace("50.00", "48.00"))
    assert ident(ARM) != ident(ARM.replace("0xd0c", "0xd40"))  # Neoverse N1 vs V1
    assert ident(ARM) != ident(ARM.replace("0x3", "0x1"))
    assert ident(ARM) != ident(ARM.replace(" atomics", ""))
    assert platform.machine() in ident(ARM)
    # no /proc/cpuinfo (macOS, BSD): what gcc resolves -march=native to
    native = ident("")
    assert "-march=" in native and native.split("-march=")[1].split()[0] != "native"
    source, flags = _cpu_source.digest(), cpu._FLAG_SETS[0]
    name = cpu._library_name(source, flags)
    monkeypatch.setattr(cpu, "_cpu_identity", lambda: ident(ARM))
    assert cpu._library_name(source, flags) != name


def test_cached_library_loads_without_a_compiler(tmp_path):
    """Loading a cached (verified) library runs no compiler: PATH empty, CC unset."""
    kernels = _private_cache(tmp_path)
    res = _python(USE_KERNELS, kernels.parent, PATH="", CC="")
    assert res.returncode == 0, res.stderr
    assert Path(res.stdout.strip().splitlines()[-1]).parent == kernels
    assert "RuntimeWarning" not in res.stderr


def test_kernels_build_without_a_warning(tmp_path):
    """-Wall -Wextra -Werror on the real flags: any warning would fail this build."""
    messages = cpu._compile(cpu._compiler(), cpu._FLAG_SETS[0] + ["-Wall", "-Wextra", "-Werror"],
                            tmp_path / "strict.so")
    assert messages.strip() == ""
    assert cpu._verified(tmp_path / "strict.so")


def test_failed_build_shows_the_first_error_line(tmp_path, monkeypatch):
    """Warnings before an error do not hide it: the message names the file, line and error."""
    src = tmp_path / "csrc"
    shutil.copytree(_cpu_source.SOURCE_DIR, src)
    main = src / _cpu_source.MAIN
    lines = main.read_text().splitlines()
    lines[0:0] = ['#warning "noise before the error"'] * 40 + ["int broken = undeclared_name;"]
    main.write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(_cpu_source, "SOURCE_DIR", src)
    with pytest.raises(RuntimeError) as err:
        cpu._compile(cpu._compiler(), cpu._FLAG_SETS[0], tmp_path / "broken.so")
    message = str(err.value)
    assert f"{_cpu_source.MAIN}:41:" in message and "error" in message
    assert "undeclared_name" in message and "noise" not in message
    assert not (tmp_path / "broken.so").exists()


def test_first_error_line():
    log = "a.c:1:2: warning: w\na.c:3:4: error: boom\na.c:5:6: error: later\n"
    assert cpu._first_error(log) == "a.c:3:4: error: boom"
    assert cpu._first_error("cc1: fatal error: no input\n") == "cc1: fatal error: no input"
    assert cpu._first_error("ld: cannot find -lm\n") == "ld: cannot find -lm"
    assert cpu._first_error("a.c:1:1: warning: the error is near\n/usr/bin/ld: cannot find -lq\n"
                            "collect2: error: ld returned 1 exit status\n") == (
        "/usr/bin/ld: cannot find -lq (collect2: error: ld returned 1 exit status)")
    assert cpu._first_error("") == "no output"


def test_source_is_package_data():
    """The .c files ship with the package (pyproject package-data) and compile from there."""
    import importlib.resources

    files = importlib.resources.files("normlab.kernels") / "csrc"
    for name in _cpu_source.FILES:
        assert (files / name).is_file(), name
    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    assert '"normlab.kernels" = ["csrc/*.c", "csrc/*.h"]' in text
