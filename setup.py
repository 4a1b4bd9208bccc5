"""
Kept for tools that still call ``setup.py``: the package is described in
pyproject.toml (metadata, dependencies, the files it installs, among them
the twistd plugin twisted/plugins/happyrobot_ws.py).
"""

from setuptools import setup

setup()
