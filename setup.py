"""Build citer: the C++ page manager (citer._C), the CPU kernels (citer._cpu_kernels,
when torch is importable at build time) plus three package roots.

The public API lives in python/citer; the runtime (engine/) and the Triton kernels
(kernels/) sit at the top level of the repository and are mapped into the package
as citer.engine and citer.kernels.
"""
from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

packages = ["citer." + p for p in find_packages("python/citer")] + ["citer"]
packages += ["citer.engine"] + ["citer.engine." + p for p in find_packages("engine")]
packages += ["citer.kernels"] + ["citer.kernels." + p for p in find_packages("kernels")]
package_dir = {"citer": "python/citer", "citer.engine": "engine", "citer.kernels": "kernels"}

ext_modules = [
    Pybind11Extension(
        "citer._C",
        sources=["csrc/block_manager.cpp", "csrc/bindings.cpp"],
        include_dirs=["csrc"],
        cxx_std=17,
        extra_compile_args=["-O2"],
    )
]
cmdclass = {"build_ext": build_ext}

# citer._cpu_kernels: the CPU decode path's kernels, few-row linear layers at the memory
# bandwidth and paged attention from the block table (AVX-512; used only where the CPU has it). It builds against torch, so only when torch is importable at build
# time (make / pip install --no-build-isolation); without it citer runs torch's own kernels.
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    pass
else:
    isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16"]
    flags = ["-O3", "-fopenmp", "-ffp-contract=off", *isa]  # no contraction: products round as torch's do
    ext_modules.append(CppExtension("citer._cpu_kernels", sources=["csrc/cpu_kernels.cpp"], include_dirs=["csrc"],
                                    extra_compile_args=flags, extra_link_args=["-fopenmp"]))
    cmdclass = {"build_ext": BuildExtension.with_options(use_ninja=False)}

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"citer": ["assets/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
