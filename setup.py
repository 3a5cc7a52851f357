"""Build fastgen: the Python package, the Triton kernels (as fastgen.kernels)
and, when a compiler is present, the native extension fastgen._C.

The extension is optional: without a C++ compiler (or when its build fails) the
package still installs and runs on the Triton and torch backends, and
``fastgen info`` reports why the extension is missing (fastgen/_build_info.json).

Environment knobs:
  FASTGEN_NO_EXTENSION=1  skip the native extension entirely
  FASTGEN_NO_CUDA=1       build only the CPU kernels even if torch has CUDA
  FASTGEN_PORTABLE=1      no -march=native (a binary that runs on any x86-64)
  FASTGEN_CUDA_ARCH       e.g. "8.0;9.0" (default: torch's TORCH_CUDA_ARCH_LIST or 8.0;9.0)
"""

import glob
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _cxx_flags():
    flags = ["-O3", "-std=c++17", "-fopenmp"]
    if not _env_flag("FASTGEN_PORTABLE"):
        flags.append("-march=native")
    return flags


def _nvcc_flags():
    flags = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
    archs = os.environ.get("FASTGEN_CUDA_ARCH") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip().replace("+PTX", "")
        if arch:
            num = arch.replace(".", "")
            flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
    return flags


def _extension_plan():
    """(ext_modules, cmdclass, reason-if-skipped)."""
    if _env_flag("FASTGEN_NO_EXTENSION"):
        return [], {}, "skipped at build time (FASTGEN_NO_EXTENSION=1)"
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        return [], {}, f"torch was not importable at build time ({exc}); install torch first and build with --no-build-isolation"
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return [], {}, f"no C++ compiler found (looked for {cxx!r}; install g++ and reinstall fastgen)"

    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (
        torch.version.cuda is not None
        and cpp_extension.CUDA_HOME is not None
        and not _env_flag("FASTGEN_NO_CUDA")
        and bool(cuda_sources)
    )
    cxx_flags = _cxx_flags()
    common = dict(
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastgen._C",
            sources + cuda_sources,
            define_macros=[("FASTGEN_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags + ["-DFASTGEN_WITH_CUDA"], "nvcc": _nvcc_flags() + ["-DFASTGEN_WITH_CUDA"]},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension("fastgen._C", sources, extra_compile_args={"cxx": cxx_flags}, **common)

    class BuildExt(cpp_extension.BuildExtension):
        """Build the extension, but never fail the install because of it."""

        def run(self):
            info = {"built": False, "with_cuda": with_cuda, "cxx_flags": cxx_flags,
                    "nvcc_flags": _nvcc_flags() if with_cuda else None, "torch": torch.__version__}
            try:
                super().run()
                info["built"] = True
            except Exception as exc:  # a broken toolchain must not break the install
                info["reason"] = f"the native build failed: {type(exc).__name__}: {exc}"[:2000]
                print(f"WARNING: fastgen._C was not built: {info['reason']}", file=sys.stderr)
            self._write_info(info)

        def _write_info(self, info):
            target = os.path.dirname(self.get_ext_fullpath("fastgen._C"))
            os.makedirs(target, exist_ok=True)
            with open(os.path.join(target, "_build_info.json"), "w") as f:
                json.dump(info, f, indent=1)

    return [ext], {"build_ext": BuildExt.with_options(use_ninja=shutil.which("ninja") is not None)}, None


def _write_skip_info(reason):
    with open(os.path.join(ROOT, "fastgen", "_build_info.json"), "w") as f:
        json.dump({"built": False, "reason": reason}, f, indent=1)


ext_modules, cmdclass, skipped = _extension_plan()
if skipped:
    print(f"WARNING: fastgen._C will not be built: {skipped}", file=sys.stderr)
    _write_skip_info(skipped)

setup(
    packages=find_packages(include=["fastgen", "fastgen.*"]) + ["fastgen.kernels"],
    package_dir={"fastgen.kernels": "kernels"},
    package_data={"fastgen": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
