"""Which modules the lean distribution ships (pyproject.toml holds the rest).

setuptools packs every ``*.py`` of a listed package; ``patchcore`` and ``patchcore.apps`` are
listed only for their ``__init__``, and the service's torch backend stays out: the wheel holds
exactly the torch-free part.
"""

from setuptools import setup
from setuptools.command.build_py import build_py

#: Packages shipped whole (with their sub-packages).
WHOLE = ("patchcore.lean", "patchcore.apps.service")
#: Modules of those packages that need torch (loaded only by the full distribution).
TORCH_ONLY = {"patchcore.apps.service.torch_backend"}


class LeanBuildPy(build_py):
    def find_package_modules(self, package, package_dir):  # noqa: ANN001, ANN201
        found = super().find_package_modules(package, package_dir)
        whole = package in WHOLE or package.startswith(tuple(p + "." for p in WHOLE))
        return [
            (pkg, mod, path)
            for pkg, mod, path in found
            if (mod == "__init__" or whole) and f"{pkg}.{mod}" not in TORCH_ONLY
        ]


setup(cmdclass={"build_py": LeanBuildPy})
