"""setuptools hook for the cffi out-of-line module (cffi_modules has no pyproject key)."""

from setuptools import setup

setup(cffi_modules=["native/build.py:ffibuilder"])
