"""Build fastgen: the Python package, the Triton kernels (as fastgen.kernels)
and, when a compiler is present, the native extension fastgen._C.

The extension is optional: without a C++ compiler (or when its build fails) the
package still installs and runs on the Triton and torch backends, and
``fastgen info`` reports why the extension is missing (fastgen/_build_info.json).

CPU kernels and instruction sets: nothing is built with -march=native, so a
build runs on any machine of its architecture. The CPU kernels
(csrc/cpu/kernels/*.cpp) are compiled once per ISA variant -- portable
(the x86-64 baseline, SSE2), avx2 (AVX2+FMA+F16C), avx512 (AVX-512
F/BW/VL/DQ) and avx512_bf16 (+ AVX512_BF16); off x86-64 only portable -- each
with its own -m flags and into its own namespace (fastgen::cpu::<variant>),
and linked into the one extension after the baseline objects (see
csrc/cpu/kernels/common.h for why that order matters). Everything else is
compiled once for the baseline. At run time the extension takes the highest
variant the CPU supports (FASTGEN_CPU_ISA forces a lower one; see
csrc/cpu/dispatch.h). A variant the compiler cannot target is skipped.

Environment knobs:
  FASTGEN_NO_EXTENSION=1  skip the native extension entirely
  FASTGEN_NO_CUDA=1       build only the CPU kernels even if torch has CUDA
  FASTGEN_PORTABLE=1      build only the portable CPU variant (smallest and
                          fastest build; slower kernels on AVX2 / AVX-512 CPUs)
  FASTGEN_CPU_ISAS        comma list of CPU variants to build, e.g. "portable,avx2"
                          (default: all of the architecture's; portable is always built)
  FASTGEN_CUDA_ARCH       e.g. "8.0;9.0" (default: torch's TORCH_CUDA_ARCH_LIST or 8.0;9.0)
"""

import glob
import json
import os
import platform
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env_flag(name):
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def _cxx_flags():
    # Baseline code only: no -m / -march flags (see the docstring).
    return ["-O3", "-std=c++17", "-fopenmp"]


_AVX2 = ["-mavx", "-mavx2", "-mfma", "-mf16c"]
_AVX512 = _AVX2 + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mprefer-vector-width=512"]
# Flags of each CPU ISA variant, lowest first (the order of the link, too).
_ISA_FLAGS = {
    "portable": [],
    "avx2": _AVX2,
    "avx512": _AVX512,
    "avx512_bf16": _AVX512 + ["-mavx512bf16"],
}
# Flags of every per-ISA object besides the variant's own. The kernels use
# `#pragma omp simd` but no OpenMP runtime (threads come from at::parallel_for).
_ISA_COMMON_FLAGS = ["-O3", "-std=c++17", "-fopenmp-simd"]


def _is_x86_64():
    return platform.machine().lower() in ("x86_64", "amd64")


def _compiler_accepts(cxx, flags):
    """Whether `cxx` compiles a trivial file with `flags`."""
    try:
        res = subprocess.run(
            [cxx, *flags, "-x", "c++", "-c", "-o", os.devnull, "-"],
            input="int fastgen_probe() { return 0; }\n", capture_output=True, text=True, timeout=60,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return res.returncode == 0


def _foreign_comdat_symbols(isa, objects):
    """Weak (COMDAT) definitions in `isa`'s objects outside its own namespace.

    Such a symbol (an inline std:: function emitted out of line, say) would be
    merged with other objects' copies at link time; the link order keeps the
    lowest variant's copy (csrc/cpu/kernels/common.h), so this is a check of
    that the kernels stay self-contained, not a correctness condition. None
    when `nm` is missing.
    """
    nm = shutil.which("nm")
    if nm is None:
        return None
    found = set()
    for obj in objects:
        try:
            out = subprocess.run([nm, "-C", "--defined-only", obj], capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            parts = line.split(None, 2)
            if len(parts) == 3 and parts[1] in ("W", "V", "u"):
                name = parts[2]
                if not name.startswith(f"fastgen::cpu::{isa}::") and f"fastgen::cpu::{isa}::" not in name.split("(")[0] \
                        and not name.startswith("DW.ref."):
                    found.add(name)
    return sorted(found)


def _cpu_isas(cxx):
    """(variants to build, lowest first; {variant: reason} for those skipped)."""
    wanted = list(_ISA_FLAGS) if _is_x86_64() else ["portable"]
    skipped = {}
    if not _is_x86_64():
        skipped = {isa: f"not an x86-64 machine ({platform.machine()})" for isa in _ISA_FLAGS if isa != "portable"}
    if _env_flag("FASTGEN_PORTABLE"):
        skipped.update({isa: "FASTGEN_PORTABLE=1" for isa in wanted if isa != "portable"})
        wanted = ["portable"]
    listed = os.environ.get("FASTGEN_CPU_ISAS", "").strip()
    if listed:
        names = {n.strip() for n in listed.split(",") if n.strip()}
        unknown = names - set(_ISA_FLAGS)
        if unknown:  # a typo must not fail the install: say so and build the rest
            print(f"WARNING: FASTGEN_CPU_ISAS: ignoring unknown variant(s) {sorted(unknown)}; "
                  f"known: {', '.join(_ISA_FLAGS)}", file=sys.stderr)
        skipped.update({isa: "not in FASTGEN_CPU_ISAS" for isa in wanted if isa not in names and isa != "portable"})
        wanted = [isa for isa in wanted if isa in names or isa == "portable"]
    out = []
    for isa in wanted:
        if isa == "portable" or _compiler_accepts(cxx, _ISA_FLAGS[isa]):
            out.append(isa)
        else:
            skipped[isa] = f"{cxx} does not accept {' '.join(_ISA_FLAGS[isa])}"
    return out, skipped


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
    isa_sources = sorted(glob.glob("csrc/cpu/kernels/*.cpp"))
    headers = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    cpu_isas, isa_skipped = _cpu_isas(cxx)
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
        depends=isa_sources + headers,
    )
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            "fastgen._C",
            sources + cuda_sources,
            define_macros=[("FASTGEN_WITH_CUDA", None)],
            extra_compile_args={"cxx": list(cxx_flags) + ["-DFASTGEN_WITH_CUDA"], "nvcc": _nvcc_flags() + ["-DFASTGEN_WITH_CUDA"]},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension("fastgen._C", sources, extra_compile_args={"cxx": list(cxx_flags)}, **common)

    class BuildExt(cpp_extension.BuildExtension):
        """Build the extension, but never fail the install because of it."""

        def run(self):
            self._isas_built = []
            self._isa_skipped = dict(isa_skipped)
            self._isa_comdat = {}
            info = {"built": False, "with_cuda": with_cuda, "cxx_flags": cxx_flags,
                    "nvcc_flags": _nvcc_flags() if with_cuda else None, "torch": torch.__version__}
            try:
                super().run()
                info["built"] = True
            except Exception as exc:  # a broken toolchain must not break the install
                info["reason"] = f"the native build failed: {type(exc).__name__}: {exc}"[:2000]
                print(f"WARNING: fastgen._C was not built: {info['reason']}", file=sys.stderr)
            info["cpu_isas"] = self._isas_built
            info["cpu_isa_flags"] = {isa: _ISA_COMMON_FLAGS + _ISA_FLAGS[isa] for isa in self._isas_built}
            info["cpu_isas_skipped"] = self._isa_skipped
            # Inline code the per-ISA objects share with others (should be empty).
            info["cpu_isa_shared_inline"] = self._isa_comdat
            self._write_info(info)

        def build_extension(self, ext):
            # setuptools compiles every source of an Extension with one set of
            # flags, so the per-ISA kernel objects are compiled here, each
            # variant with its own flags and output folder, and handed to the
            # link as extra objects. setuptools links ext.sources' objects
            # first and extra_objects after them, in order: baseline first,
            # then the variants lowest first (see csrc/cpu/kernels/common.h).
            objects = []
            built = []
            for isa in cpu_isas:
                macros = [("FASTGEN_CPU_CAPABILITY", isa), (f"FASTGEN_CPU_CAPABILITY_{isa.upper()}", None)]
                flags = _ISA_COMMON_FLAGS + _ISA_FLAGS[isa]
                try:
                    objs = self.compiler.compile(
                        isa_sources,
                        output_dir=os.path.join(self.build_temp, f"isa_{isa}"),
                        macros=macros,
                        include_dirs=ext.include_dirs,
                        extra_postargs={"cxx": flags, "nvcc": []},
                        depends=ext.depends,
                    )
                except Exception as exc:
                    if isa == "portable":
                        raise
                    self._isa_skipped[isa] = f"compile failed: {type(exc).__name__}: {exc}"[:500]
                    print(f"WARNING: fastgen._C: skipping the {isa} CPU kernels: {exc}", file=sys.stderr)
                    continue
                objects += objs
                built.append(isa)
                foreign = _foreign_comdat_symbols(isa, objs)
                if foreign:
                    self._isa_comdat[isa] = foreign[:50]
                    print(f"WARNING: fastgen._C: the {isa} kernels define {len(foreign)} inline function(s) outside "
                          f"their namespace (kept from the lowest variant by the link order): {foreign[:5]}",
                          file=sys.stderr)
            ext.extra_objects = list(objects)
            have = [f"-DFASTGEN_CPU_HAVE_{isa.upper()}" for isa in built]
            args = ext.extra_compile_args
            cxx_args = args["cxx"] if isinstance(args, dict) else args
            cxx_args[:] = [a for a in cxx_args if not a.startswith("-DFASTGEN_CPU_HAVE_")] + have
            self._isas_built = built
            super().build_extension(ext)

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
    package_data={"fastgen": ["_build_info.json", "data/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
