"""Build glue: declares the CFFI extension `livemig._native` compiled from csrc/.

All metadata lives in pyproject.toml; this file exists only because CFFI's
setuptools integration is declared through `cffi_modules`.
"""
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
