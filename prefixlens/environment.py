"""The software environment a result was produced in, recorded next to every result.

Upstream releases change numbers under us (transformers 5.24 emptied the bridge's key/value cache),
so every results JSON and benchmark output carries :func:`environment`: the versions of Python and
of the packages prefixlens's numbers depend on, and the git commit of the checkout when there is one.
"""

from __future__ import annotations

import platform
import subprocess
from importlib import metadata
from pathlib import Path

__all__ = ["PACKAGES", "environment", "describe"]

# The packages whose versions a prefixlens number depends on, in the order they are reported.
PACKAGES = ("prefixlens", "torch", "transformers", "transformer-lens", "peft", "numpy")

_CHECKOUT = Path(__file__).resolve().parent.parent


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(
            ["git", *args], cwd=_CHECKOUT, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def environment() -> dict[str, object]:
    """Python, platform, the versions of :data:`PACKAGES` (``None``: not installed), and the git commit
    of the prefixlens checkout (``None`` for an installed copy) with whether its code differs from it."""
    commit = _git("rev-parse", "HEAD") if (_CHECKOUT / ".git").exists() else None
    code_changed = None
    if commit is not None:
        changed = _git("status", "--porcelain", "--untracked-files=no", "--", "prefixlens", "analyses", "benchmarks")
        code_changed = None if changed is None else bool(changed)
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": {name: _version(name) for name in PACKAGES},
        "git_commit": commit,
        "code_differs_from_commit": code_changed,
    }


def describe(env: dict[str, object] | None = None) -> str:
    """One line for a Markdown report: ``python 3.11.7, torch 2.13.0, … , commit 222ec29``."""
    env = environment() if env is None else env
    parts = [f"python {env['python']}"]
    parts += [f"{name} {version}" for name, version in env["packages"].items() if version is not None]
    if env.get("git_commit"):
        parts.append(f"commit {str(env['git_commit'])[:7]}" + (" (modified)" if env.get("code_differs_from_commit") else ""))
    return ", ".join(parts)


if __name__ == "__main__":  # `python -m prefixlens.environment`: what CI prints for each leg
    import json

    print(json.dumps(environment(), indent=1))
