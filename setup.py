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
        "twisted>=24.7,<27",
        "autobahn[twisted,accelerate]>=24.4,<27",
        "txaio>=23.1,<27",
        "txredisapi>=1.4.10,<2",
        "orjson>=3.9,<4",
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
