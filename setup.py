"""Packaging for the Happy Robot real-time server (twistd plugin ``happyrobot-ws``)."""

from setuptools import find_packages, setup

setup(
    name="happyrobot",
    version="0.1.0",
    description="Happy Robot real-time server: project rooms over WebSocket, on Twisted",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(exclude=["tests", "tests.*"]) + ["twisted.plugins"],
    package_data={
        "twisted": ["plugins/happyrobot_ws.py"],
        "happyrobot": ["static/*"],
        "happyrobot.redis.scripts": ["*.lua"],
    },
    python_requires=">=3.11",
    install_requires=[
        # The floors are tested: scripts/test runs the suite at these
        # versions too (constraints/lowest.txt, kept in step with them).
        "twisted>=24.7,<27",
        # 26.7.1 bounds the inflated size of a permessage-deflate message
        # (GHSA-hxp9-w8x3-p566); it needs txaio 25.12.2.
        "autobahn[twisted,accelerate]>=26.7.1,<27",
        "txaio>=25.12.2,<27",
        # 1.6.0 added the readiness flag the Redis client relies on.
        "txredisapi>=1.6.0,<2",
        # Before 3.9.15 deeply nested input crashes orjson (CVE-2024-27454).
        "orjson>=3.9.15,<4",
        "pyjwt[crypto]>=2.8,<3",
        "treq>=23.11,<27",
        "prometheus_client>=0.20,<1",
    ],
    entry_points={"console_scripts": ["happyrobot = happyrobot.__main__:main"]},
    extras_require={
        "test": ["coverage>=7.4,<8", "hypothesis>=6.100,<7"],
        "dev": ["ruff", "mypy", "mypy-zope"],
    },
    classifiers=[
        "Framework :: Twisted",
        "Programming Language :: Python :: 3",
    ],
)
