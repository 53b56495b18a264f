"""Packaging for metroem; metadata lives in pyproject.toml (this file serves setup.py callers)."""
from setuptools import setup

setup()
