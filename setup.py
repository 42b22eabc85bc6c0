"""The compiled front end (lookupd/_fastpath.c; see lookupd/fastpath.py). Optional: without a
C compiler and Python's headers the build goes on and lookupd answers every request through
Python. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("lookupd._fastpath", ["lookupd/_fastpath.c"], optional=True,
                             extra_compile_args=["-O2", "-Wall"])])
