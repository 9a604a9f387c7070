"""Builds the Cython data plane in _fastpath/; everything else is declared in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

COMPILE_ARGS = ["-O3", "-D_GNU_SOURCE", "-Wno-unused-function"]


def fastpath_extension(name: str) -> Extension:
    # The wireguard pump (and its micro-benchmark driver) seal and open with libcrypto's ChaCha20-Poly1305.
    libraries = ["crypto"] if name in ("wg", "drivers") else []
    return Extension(
        f"_fastpath.{name}", [f"_fastpath/{name}.pyx"], extra_compile_args=COMPILE_ARGS, libraries=libraries
    )


setup(
    ext_modules=cythonize(
        [
            fastpath_extension(name)
            for name in ("packet", "routes", "offload", "tun", "udp", "loop", "pump", "drivers", "wg")
        ],
        compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False, "cdivision": True},
    ),
)
