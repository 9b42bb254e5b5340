"""Build of msdiff_fast's compiled kernels: setuptools drives CMake (CMakeLists.txt).

Modules: msdiff_fast._C (CPU kernels, always) and msdiff_fast._C_cuda (CUDA kernels, whenever a
CUDA compiler is found: nvcc on PATH or under CUDA_HOME / CUDA_PATH; never decided by a GPU).
No torch at build time: the modules exchange tensors through DLPack (nanobind). On CPython >= 3.12
they are built for the stable ABI, so one cp312-abi3 wheel serves every later Python as well.

Editable and in-place builds keep CMake's folder in build/cmake-<python tag>/, so a rebuild
compiles only what changed; wheels build in setuptools' own temporary folder.

Environment:
  MSDIFF_FAST_CUDA=0|1         skip the CUDA module / require it (default: build it if nvcc is found)
  MSDIFF_FAST_CUDA_ARCHS="80;90"  CUDA architectures; SASS for each, PTX for the newest
  MSDIFF_FAST_NATIVE=1         compile the CPU kernels for this machine only (-march=native)
  MSDIFF_FAST_VECTORIZE_REPORT=1  print the compiler's list of vectorised loops
  MAX_JOBS=N                   parallel compile jobs (default: CPU count)
  CMAKE_ARGS="-DX=Y ..."       further CMake arguments (scripts/build_wheel.sh passes link flags)
"""

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str):
    """True / False for a set 0/1-style variable, None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return None
    if value in ("1", "on", "true", "yes"):
        return True
    if value in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{name}: expected 0 or 1, got {os.environ[name]!r}")


def _find_nvcc():
    """Path of nvcc (PATH first, then CUDA_HOME / CUDA_PATH), or None."""
    found = shutil.which("nvcc")
    if found:
        return found
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(variable)
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


def _cuda_architectures(value: str) -> str:
    """ "80;90" -> CMake's "80-real;90": SASS for every arch, PTX for the newest as well."""
    archs = sorted({a.strip() for a in value.replace(",", ";").split(";") if a.strip()}, key=lambda a: int(a.rstrip("a")))
    if not archs or not all(a.rstrip("a").isdigit() for a in archs):
        raise ValueError(f"MSDIFF_FAST_CUDA_ARCHS: expected numbers such as '80;90', got {value!r}")
    return ";".join([f"{a}-real" for a in archs[:-1]] + [archs[-1]])


def _build_tools():
    """cmake and ninja: the pip packages of the isolated build environment, else the system's."""
    cmake = ninja = None
    try:
        import cmake as cmake_package

        cmake = str(Path(cmake_package.CMAKE_BIN_DIR) / "cmake")
    except ImportError:
        cmake = shutil.which("cmake")
    try:
        import ninja as ninja_package

        ninja = str(Path(ninja_package.BIN_DIR) / "ninja")
    except ImportError:
        ninja = shutil.which("ninja")
    if cmake is None:
        raise RuntimeError("building msdiff_fast needs CMake >= 3.18: pip install cmake (build isolation installs it)")
    return cmake, ninja


# nanobind builds abi3 modules for CPython >= 3.12 with the GIL (a free-threaded Python has no abi3).
STABLE_ABI = (
    sys.implementation.name == "cpython" and sys.version_info >= (3, 12) and not sysconfig.get_config_var("Py_GIL_DISABLED")
)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[], py_limited_api=STABLE_ABI)


class CMakeBuild(build_ext):
    """Configures and builds CMakeLists.txt once, then places every module where setuptools wants it."""

    def run(self):
        # build_ext.run() clears self.inplace before build_extensions(), so remember it here.
        self.builds_in_tree = self.inplace or self.editable_mode
        super().run()

    def build_extensions(self):
        import nanobind

        cmake, ninja = _build_tools()
        if self.builds_in_tree:
            build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}{'-abi3' if STABLE_ABI else ''}"
        else:
            build_dir = Path(self.build_temp).resolve() / "cmake"
        staging = build_dir / "modules"
        cuda = _wants_cuda()
        definitions = {
            "CMAKE_BUILD_TYPE": "Release",
            "Python_EXECUTABLE": sys.executable,
            "nanobind_DIR": nanobind.cmake_dir(),
            "CMAKE_LIBRARY_OUTPUT_DIRECTORY": str(staging),
            "MSDIFF_FAST_CUDA": "ON" if cuda else "OFF",
            "MSDIFF_FAST_NATIVE": "ON" if _flag("MSDIFF_FAST_NATIVE") else "OFF",
            "MSDIFF_FAST_VECTORIZE_REPORT": "ON" if _flag("MSDIFF_FAST_VECTORIZE_REPORT") else "OFF",
            "MSDIFF_FAST_STABLE_ABI": "ON" if STABLE_ABI else "OFF",
        }
        if cuda:
            definitions["CMAKE_CUDA_COMPILER"] = cuda
            definitions["MSDIFF_FAST_CUDA_ARCHS"] = _cuda_architectures(os.environ.get("MSDIFF_FAST_CUDA_ARCHS", "80;90"))
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"] if ninja else []
        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), *generator] + [f"-D{k}={v}" for k, v in definitions.items()]
        configure += shlex.split(os.environ.get("CMAKE_ARGS", ""))
        # Build isolation puts cmake, ninja and nanobind in a new temporary prefix every time; a
        # cache that names the previous one cannot be reused, so it is rebuilt from scratch.
        fingerprint = hashlib.sha256(json.dumps(configure).encode()).hexdigest()
        stamp = build_dir / "msdiff_configure.sha256"
        if not stamp.is_file() or stamp.read_text() != fingerprint:
            shutil.rmtree(build_dir, ignore_errors=True)
            build_dir.mkdir(parents=True)
            subprocess.run(configure, check=True)
            stamp.write_text(fingerprint)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", jobs], check=True)
        for ext in self.extensions:
            module = ext.name.rsplit(".", 1)[-1]
            built = sorted(p for p in staging.glob(f"{module}.*") if p.suffix in (".so", ".pyd"))
            if not built:
                raise RuntimeError(f"CMake built no {module} module in {staging}")
            destination = Path(self.get_ext_fullpath(ext.name))
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(built[0], destination)


def _wants_cuda():
    """Path of the CUDA compiler to build with, or None to build the CPU module only."""
    requested = _flag("MSDIFF_FAST_CUDA")
    if requested is False:
        return None
    nvcc = _find_nvcc()
    if requested and nvcc is None:
        raise RuntimeError("MSDIFF_FAST_CUDA=1 but no nvcc was found on PATH or under CUDA_HOME / CUDA_PATH")
    return nvcc


extensions = [CMakeExtension("msdiff_fast._C")]
if _wants_cuda():
    extensions.append(CMakeExtension("msdiff_fast._C_cuda"))

setup(
    ext_modules=extensions,
    cmdclass={"build_ext": CMakeBuild},
    options={"bdist_wheel": {"py_limited_api": "cp312"}} if STABLE_ABI else {},
)
