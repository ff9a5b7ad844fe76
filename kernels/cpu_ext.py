"""citer's compiled CPU kernels: citer._cpu_kernels (csrc/cpu_kernels.cpp), built with the
package where torch was importable at build time (setup.py).

`ext` is that module, or None in a build without it; `AVAILABLE` says whether it is there
and this CPU runs it (it is compiled for AVX-512 F/BW/VL/BF16 throughout). Each op's
`*_cpu` wrapper calls it where AVAILABLE and its inputs' layout fit, the torch reference
otherwise.
"""
try:
    import citer._cpu_kernels as ext
except ImportError:  # pragma: no cover - a build without the extension
    ext = None

AVAILABLE = ext is not None and ext.supported()
