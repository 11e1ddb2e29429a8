from setuptools import setup

setup(
    name="llmgw",
    version="0.1.0",
    description="An event-driven gateway in front of self-hosted OpenAI-compatible LLM servers",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=[
        "twisted_gw", "twisted_gw.admission", "twisted_gw.apis", "twisted_gw.books", "twisted_gw.proxy",
        "twisted_gw.upstream", "twisted_gw.web", "twisted.plugins",
    ],
    package_data={"twisted_gw": ["py.typed"], "twisted_gw.web": ["static/*.html"]},
    # Lower bounds are the oldest versions tested: tox -e oldest installs exactly these
    # (tests/constraints-oldest.txt).
    install_requires=[
        "twisted>=25.5.0",
        "klein>=24.8.0",
        "treq>=24.9.1",
        "werkzeug>=3.0.0",
        "pyopenssl>=24.3.0",
        "cryptography>=41.0.5",
        "service-identity>=24.1.0",
        "attrs>=23.1.0",
        "zope.interface>=6.0",
        "prometheus_client>=0.20.0",
    ],
    entry_points={
        "console_scripts": [
            "llmgw-keys = twisted_gw.keys:main",
            "llmgw-tls = twisted_gw.tlsgen:main",
            "llmgw-usage = twisted_gw.usage:main",
        ],
    },
    extras_require={
        "test": [
            "pytest>=8.0",
            "hypothesis>=6.100",
            "openai>=1.66",
            "anthropic>=0.40",
            "psycopg[binary]>=3.1",
            "httpx>=0.27",
            "trustme>=1.1",
            "pyyaml>=6.0",
            "selenium>=4.10",
            "txredisapi>=1.6.0",
        ],
        "postgres": ["psycopg[binary]>=3.1"],  # --usage-db postgresql://...
        "cluster": ["txredisapi>=1.6.0"],  # --state redis://...
        "dev": [
            "ruff>=0.6",
            "mypy>=1.10",
            "tox>=4.0",
        ],
    },
)
