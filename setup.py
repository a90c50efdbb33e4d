"""Build the torch-independent C++ core (`shortgpt_fast._C`) with pybind11 and ninja.

The extension takes raw pointers, strides and dtype codes, so it never includes or links torch:
one build works with any installed torch, and building needs no torch at all.
"""
import os
import shlex
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def _packages():
    found = ["shortgpt_fast"]
    for init in sorted((ROOT / "shortgpt_fast").rglob("__init__.py")):
        name = ".".join(init.parent.relative_to(ROOT).parts)
        if name not in found:
            found.append(name)
    return found


class NinjaBuildExt(build_ext):
    """Compile the extension's sources in parallel through a generated build.ninja, then link one module."""

    def build_extension(self, ext):
        import ninja
        import pybind11

        out_path = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_dir = Path(self.build_temp).resolve() / "ninja"
        build_dir.mkdir(parents=True, exist_ok=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)

        cxx = os.environ.get("CXX", "g++")
        includes = [pybind11.get_include(), sysconfig.get_paths()["include"], str(CSRC)]
        cflags = ["-O3", "-std=c++17", "-fPIC", "-fvisibility=hidden", "-fopenmp",
                  "-Wall", "-Wno-unknown-pragmas"] + [f"-I{i}" for i in includes]
        cflags += shlex.split(os.environ.get("SHORTGPT_FAST_CXXFLAGS", ""))
        ldflags = ["-shared", "-fopenmp"]

        # One folder per part: the portable kernel everywhere; the surgery engines (collapse-range, FICLONE,
        # sync_file_range) only on Linux, where elsewhere surgery says it needs Linux and the kernel still builds.
        folders = list(ext.portable_folders)
        if sys.platform.startswith("linux"):
            folders += ext.linux_folders
            cflags.append("-DSGF_WITH_SURGERY=1")
        sources = [CSRC / name for name in ext.top_sources]
        for folder in folders:
            sources += sorted((CSRC / folder).glob("*.cpp"))
        lines = [
            f"cxx = {cxx}",
            f"cflags = {' '.join(shlex.quote(f) for f in cflags)}",
            f"ldflags = {' '.join(ldflags)}",
            "rule cxx",
            "  command = $cxx -MMD -MF $out.d $cflags -c $in -o $out",
            "  depfile = $out.d",
            "  deps = gcc",
            "rule link",
            "  command = $cxx $in -o $out $ldflags",
        ]
        objects = []
        for src in sources:
            # Named by the path under csrc/, so equal file names in two folders never share an object.
            obj = build_dir / ("_".join(src.relative_to(CSRC).with_suffix("").parts) + ".o")
            objects.append(obj)
            lines.append(f"build {obj}: cxx {src}")
        lines.append(f"build {out_path}: link {' '.join(str(o) for o in objects)}")
        (build_dir / "build.ninja").write_text("\n".join(lines) + "\n")
        ninja_bin = os.path.join(ninja.BIN_DIR, "ninja")
        subprocess.check_call([ninja_bin, "-C", str(build_dir)], stdout=sys.stdout, stderr=sys.stderr)


class CoreExtension(Extension):
    def __init__(self):
        super().__init__("shortgpt_fast._C", sources=[])
        self.top_sources = ["module.cpp"]
        self.portable_folders = ["bi_reduce", "dequant"]
        self.linux_folders = ["surgery", "gguf"]


# SHORTGPT_FAST_SKIP_CPP=1 installs the pure-Python package: the torch backend scores, and every feature that needs
# the extension raises one line saying how to build it (shortgpt_fast/_native.py).
SKIP_CPP = os.environ.get("SHORTGPT_FAST_SKIP_CPP", "") not in ("", "0")

setup(
    packages=_packages(),
    ext_modules=[] if SKIP_CPP else [CoreExtension()],
    cmdclass={"build_ext": NinjaBuildExt},
    zip_safe=False,
)
