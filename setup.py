"""Builds the one compiled extension, ``gradprobe._C``; all metadata lives in pyproject.toml.

* C++ CPU sources (``csrc/*.cpp``, C++17 + OpenMP) are always built.
* CUDA sources (``csrc/*.cu``) are added only when torch was built with CUDA and ``nvcc`` is found,
  and ``GRADPROBE_SKIP_CUDA_BUILD`` is not 1. (The CPU torch wheel has CUDA headers but no CUDA
  libraries, so a CUDA extension cannot be linked against it.)
* ``GRADPROBE_SKIP_BUILD=1`` skips the extension entirely (pure-Python install; ops use the reference).
* ``GRADPROBE_CUDA_ARCHS`` (default "80;90"), ``DEBUG=1`` and ``MAX_JOBS`` are honoured.

Install with ``pip install --no-build-isolation -e .`` so the build uses the torch already installed.
"""

import glob
import os
import shutil

from setuptools import setup


def _extensions():
    if os.environ.get("GRADPROBE_SKIP_BUILD") == "1":
        print("gradprobe: GRADPROBE_SKIP_BUILD=1, not building gradprobe._C")
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    debug = os.environ.get("DEBUG") == "1"
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # -Wno-c++20-extensions: torch >= 2.13 headers use C++20 bit-field initialisers (harmless, but noisy)
    cxx = ["-std=c++17", "-fopenmp", "-Wno-c++20-extensions", *opt]
    sources = sorted(glob.glob("csrc/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/*.cu"))
    define_macros = []
    use_cuda = False
    if cuda_sources:
        if os.environ.get("GRADPROBE_SKIP_CUDA_BUILD") == "1":
            print("gradprobe: GRADPROBE_SKIP_CUDA_BUILD=1, building the CPU part of gradprobe._C only")
        elif torch.version.cuda is None:
            print("gradprobe: torch has no CUDA, building the CPU part of gradprobe._C only")
        elif shutil.which("nvcc") is None and not os.environ.get("CUDA_HOME"):
            print("gradprobe: nvcc not found, building the CPU part of gradprobe._C only")
        else:
            use_cuda = True
    if not sources:
        return [], {}
    kwargs = dict(
        name="gradprobe._C",
        sources=sources + (cuda_sources if use_cuda else []),
        include_dirs=[os.path.abspath("csrc")],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
        define_macros=define_macros,
    )
    if use_cuda:
        archs = os.environ.get("GRADPROBE_CUDA_ARCHS", "80;90").split(";")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs if a]
        kwargs["extra_compile_args"]["nvcc"] = ["-std=c++17", *opt, *gencode]
        kwargs["define_macros"] = define_macros + [("GRADPROBE_WITH_CUDA", "1")]
        ext = CUDAExtension(**kwargs)
    else:
        ext = CppExtension(**kwargs)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
