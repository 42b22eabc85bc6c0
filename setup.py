"""The compiled front end (lookupd/_fastpath.c; see lookupd/fastpath.py). Optional: without a
C compiler and Python's headers the build goes on and lookupd answers every request through
Python. Everything else is in pyproject.toml."""

from setuptools import Extension, setup

# py_limited_api: one _fastpath.abi3.so for Python 3.11 and every later version (the C file
# defines Py_LIMITED_API), so a newer python3 keeps it without a rebuild.
setup(ext_modules=[Extension("lookupd._fastpath", ["lookupd/_fastpath.c"], optional=True,
                             py_limited_api=True, extra_compile_args=["-O2", "-Wall",
                                                 # a call outside the limited API
                                                 "-Werror=implicit-function-declaration"])],
      options={"bdist_wheel": {"py_limited_api": "cp311"}})
