"""Build fusedskip._C: a CUDA extension where a CUDA toolkit and a CUDA build of torch exist,
a CPU-only extension otherwise.

Environment knobs:
  FUSEDSKIP_FORCE_CPU=1          build without CUDA even where it could be built
  FUSEDSKIP_CUDA_ARCHS="8.0;9.0a" compute capabilities to compile for; "native" = the local GPU
  CUDA_HOME                      toolkit root, when the one found from nvcc is not the right one
  CUTLASS_PATH                   a CUTLASS checkout, for its headers (else the nvidia-cutlass
                                 pip package's; without either, no `cutlass` backend)
  FUSEDSKIP_CUTLASS_CONFIGS=1    also build fusedskip._cutlass_configs, the `cutlass` kernel at
                                 several tile shapes, for benchmarks/cutlass_configs.py
  MAX_JOBS                       parallel compile jobs (ninja)
  FUSEDSKIP_DEBUG=1              -O0 -g host code, for a debugger
  FUSEDSKIP_PTXAS_VERBOSE=1      ptxas's registers / shared memory / spills of every kernel
  FUSEDSKIP_WERROR=1             every compiler warning an error (host and device code): CI
                                 builds so, the build must have none
"""

import glob
import os
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """The CUDA toolkit root, or None.

    torch guesses the root from the nvcc on PATH; where that nvcc is a wrapper script
    (e.g. /usr/local/bin/nvcc) the guess (/usr/local) has no headers. Check candidates
    for real toolkit contents instead.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for candidate in candidates:
        if _is_toolkit(candidate):
            return os.path.realpath(candidate)
    return None


def pip_cuda_include_dirs():
    """Header folders of the nvidia-* pip wheels (cuBLAS, cuSPARSE, ... for the cu13 wheels live
    in nvidia/cu13/include; the cu12 wheels use one folder per library)."""
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    found = []
    for root in roots:
        for pattern in ("nvidia/*/include", "nvidia/*/*/include"):
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                path = os.path.realpath(path)
                if path not in found:
                    found.append(path)
    return found


def cutlass_include_dir():
    """CUTLASS 3 headers (cutlass/ and cute/): $CUTLASS_PATH/include, else those the
    nvidia-cutlass pip package ships (`pip install --no-deps nvidia-cutlass`), else None."""
    candidates = []
    if os.environ.get("CUTLASS_PATH"):
        candidates.append(os.path.join(os.environ["CUTLASS_PATH"], "include"))
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    candidates += [os.path.join(root, "cutlass_library", "source", "include") for root in roots]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cutlass", "cutlass.h")) and os.path.isfile(
                os.path.join(path, "cute", "tensor.hpp")):
            return os.path.realpath(path)
    return None


def resolve_archs(spec):
    """'8.0;9.0a' -> ['8.0', '9.0a']; 'native' -> the local GPU's (with 'a' from sm_90 on)."""
    if spec.strip() == "native":
        import torch

        major, minor = torch.cuda.get_device_capability()
        spec = f"{major}.{minor}{'a' if major >= 9 else ''}"
    return [a.strip() for a in spec.replace(",", ";").split(";") if a.strip()]


def arch_flags(archs):
    """['8.0', '9.0a'] -> nvcc -gencode flags: SASS for each, plus PTX of the newest portable one (no
    "a" suffix) so that newer GPUs than any listed can JIT-compile the kernels."""
    flags = []
    for arch in archs:
        if float(arch.rstrip("a")) < 8.0:  # bfloat16 / TF32 tensor cores (WMMA) need sm_80
            raise SystemExit(f"fusedskip: CUDA arch {arch} is not supported (sm_80 or newer); "
                             "set FUSEDSKIP_CUDA_ARCHS, or FUSEDSKIP_FORCE_CPU=1 for a CPU build")
        number = arch.replace(".", "")
        flags.append(f"-gencode=arch=compute_{number},code=sm_{number}")
    portable = [a.replace(".", "") for a in archs if not a.endswith("a")]
    if portable:  # arch-specific ("a") targets have no forward-compatible PTX
        flags.append(f"-gencode=arch=compute_{portable[-1]},code=compute_{portable[-1]}")
    return flags


def want_cuda():
    if os.environ.get("FUSEDSKIP_FORCE_CPU", "0") not in ("", "0"):
        return None
    import torch

    if torch.version.cuda is None:
        return None
    return find_cuda_home()


def extensions():
    cuda_home = want_cuda()
    if cuda_home:
        # Must be set before torch.utils.cpp_extension is imported: it reads CUDA_HOME once.
        os.environ["CUDA_HOME"] = cuda_home
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++20", "-fno-trapping-math", "-Wall", "-Wno-unused-function"]
    if os.environ.get("FUSEDSKIP_DEBUG", "0") not in ("", "0"):
        cxx = ["-O0", "-g", "-std=c++20", "-Wall"]
    werror = os.environ.get("FUSEDSKIP_WERROR", "0") not in ("", "0")
    if werror:
        cxx.append("-Werror")
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not cuda_home:
        print("fusedskip: building the CPU-only extension", file=sys.stderr)
        return [CppExtension("fusedskip._C", sources, include_dirs=include_dirs,
                             extra_compile_args={"cxx": cxx + ["-fopenmp"]},
                             extra_link_args=["-fopenmp"])]

    archs = resolve_archs(os.environ.get("FUSEDSKIP_CUDA_ARCHS", "8.0;9.0a"))
    print(f"fusedskip: building with CUDA from {cuda_home} for {archs}", file=sys.stderr)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo",
            "-Xcompiler=-Wall", "-Xcompiler=-Wno-unused-function"] + arch_flags(archs)
    if os.environ.get("FUSEDSKIP_PTXAS_VERBOSE", "0") not in ("", "0"):
        nvcc.append("-Xptxas=-v")
    if werror:
        nvcc += ["-Werror=all-warnings", "-Xcompiler=-Werror"]
    macros = [("FUSEDSKIP_WITH_CUDA", "1")]
    cutlass = cutlass_include_dir()
    # The CUTLASS kernels (csrc/cuda/*_sm90.cu) are Hopper code: only worth building for 9.0a.
    if cutlass and "9.0a" in archs:
        print(f"fusedskip: with the CUTLASS sm_90a GEMM (headers: {cutlass})", file=sys.stderr)
        include_dirs.append(cutlass)
        macros.append(("FUSEDSKIP_WITH_CUTLASS", "1"))
    elif "9.0a" in archs:
        print("fusedskip: no CUTLASS headers found (pip install --no-deps nvidia-cutlass): "
              "building without the `cutlass` backend", file=sys.stderr)
    built = [CUDAExtension("fusedskip._C", sources,
                           include_dirs=include_dirs + pip_cuda_include_dirs(),
                           define_macros=macros,
                           extra_compile_args={"cxx": cxx + ["-fopenmp"], "nvcc": nvcc},
                           extra_link_args=["-fopenmp"])]
    if os.environ.get("FUSEDSKIP_CUTLASS_CONFIGS", "0") not in ("", "0"):
        if not cutlass or "9.0a" not in archs:
            raise SystemExit("fusedskip: FUSEDSKIP_CUTLASS_CONFIGS needs CUTLASS's headers and 9.0a "
                             "among FUSEDSKIP_CUDA_ARCHS")
        folder = os.path.join("benchmarks", "cutlass_configs")
        built.append(CUDAExtension(
            "fusedskip._cutlass_configs",
            sorted(glob.glob(os.path.join(folder, "*.cpp")) + glob.glob(os.path.join(folder, "*.cu"))),
            include_dirs=include_dirs + [os.path.join(ROOT, folder)] + pip_cuda_include_dirs(),
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": [f for f in nvcc if not f.startswith("-gencode")]
                                + arch_flags(["9.0a"])}))
    return built


def main():
    ext_modules = extensions()  # first: it sets CUDA_HOME before cpp_extension is imported
    import torch
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        def finalize_options(self):
            super().finalize_options()
            # pip's editable build hands build_ext a new temporary folder each run, where ninja
            # finds no objects to reuse: a one-line change recompiled every kernel (~10 minutes
            # on two cores). Objects stay in build/ instead (`make clean` removes it), one folder
            # per Python and torch, whose headers the dependency files may not track.
            tag = f"py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
            self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}")

    setup(
        packages=find_packages(include=["fusedskip", "fusedskip.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": Build.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
