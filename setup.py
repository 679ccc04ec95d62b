"""Builds aotlm's one compiled part: the XLA:CPU paged-attention kernel (an XLA FFI custom call).

It is a plain shared library loaded with ctypes (aotlm/kernels/cpu_attention.py), compiled against
the FFI headers that ship in jaxlib (a build requirement). `-march=native` by default, since it
is built where it is installed; AOTLM_CPU_ARCH=x86-64-v3 (say) builds a portable one.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import Extension, setup


def _jaxlib_include() -> str:
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or spec.origin is None:
        raise RuntimeError("building aotlm's CPU kernel needs jaxlib (its FFI headers) installed")
    return str(Path(spec.origin).parent / "include")


arch = os.environ.get("AOTLM_CPU_ARCH", "native")
flags = ["-std=c++17", "-O3", f"-march={arch}", "-fopenmp-simd"]
header_warnings = ["-Wno-attributes", "-Wno-return-type"]  # the FFI headers' own
setup(
    ext_modules=[
        Extension(
            "aotlm.kernels._cpu_attention",
            sources=["aotlm/kernels/cpu/paged_attention.cc"],
            include_dirs=[_jaxlib_include()],
            language="c++",
            extra_compile_args=[*flags, *header_warnings],
        )
    ]
)
