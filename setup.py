"""Packaging for metroem. Metadata lives in pyproject.toml; this file exists for tools that call setup.py."""
from setuptools import setup

setup()
