"""The wheels a GPU machine needs to run clipcap, and their offline install there.

Our GPU machines come with torch, transformers, lightning, peft and torchmetrics (and what those depend
on) but without internet, and take other packages only as wheels carried along, at most 64 MiB in all.
Which of clipcap's runtime dependencies (``pyproject.toml``, extras included) they lack is computed, not
listed: the dependency closure of clipcap's requirements minus the closure of those five, both read from
the installed packages' metadata here (``.venv``, the locked versions). ``pycocoevalcap`` (a 104 MB wheel)
and what only it needs are left out: nothing the GPU check runs imports it.

``download`` (``make gpu-wheels``) fetches exactly those, at the versions installed here, as wheels for the
GPU machines' Python (3.12, manylinux x86-64) into a folder, building one locally where PyPI has only a
source archive, writes ``requirements.txt`` beside them and checks their total size. ``install`` (the first
step of ``make gpu-check``) installs, from that folder and without any index, those of them the machine
does not have, into a target folder (put it on ``PYTHONPATH``); a package the machine already has, at
whatever version, is left as it is.

Run:
    .venv/bin/python -m benchmarks.gpu_wheels download [--dest .gpu-wheels] [--python-version 3.12]
    python3 -m benchmarks.gpu_wheels install [--wheels .gpu-wheels] [--target .gpu-site]
    .venv/bin/python -m benchmarks.gpu_wheels list
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PREINSTALLED = ("torch", "transformers", "lightning", "peft", "torchmetrics")
"""What the GPU machines have installed, with their own dependencies."""
NEVER_CARRIED = ("pycocoevalcap",)
"""Runtime dependencies the GPU check does without (the NLG metrics' Java wrappers)."""
WHEEL_BUDGET = 64 * 2**20
GPU_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
REQUIREMENTS_FILE = "requirements.txt"


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def runtime_requirements(pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """``[project] dependencies`` of ``pyproject``, as written (``name[extras]>=version``)."""
    text = pyproject.read_text()
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the block's quoted lines
        block = re.search(r"^dependencies = \[(.*?)^\]", text, re.MULTILINE | re.DOTALL)
        return re.findall(r'^\s*"([^"]+)"', block.group(1) if block else "", re.MULTILINE)
    return list(tomllib.loads(text)["project"]["dependencies"])


def split_requirement(requirement: str) -> tuple[str, set[str], str]:
    """``name[extra,...]specifier`` → ``(name, extras, specifier)``."""
    match = re.match(r"\s*([A-Za-z0-9_.-]+)\s*(?:\[([^\]]*)\])?\s*(.*)", requirement)
    if not match:
        raise ValueError(f"cannot read the requirement {requirement!r}")
    extras = {extra.strip() for extra in (match.group(2) or "").split(",") if extra.strip()}
    return match.group(1), extras, match.group(3).split(";")[0].strip()


def dependency_closure(requirements: list[str]) -> dict[str, str]:
    """Every installed distribution ``requirements`` need, their extras' and their own dependencies'
    included (markers evaluated for this interpreter): canonical name → installed version. A requirement
    that is not installed here raises ``PackageNotFoundError``."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    extras_seen: dict[str, set[str]] = {}
    pending = [Requirement(text) for text in requirements]
    while pending:
        requirement = pending.pop()
        key = canonical(requirement.name)
        extras = set(requirement.extras)
        if key in extras_seen and extras <= extras_seen[key]:
            continue
        extras_seen.setdefault(key, set()).update(extras)
        distribution = importlib.metadata.distribution(requirement.name)
        found[key] = distribution.version
        for text in distribution.requires or []:
            needed = Requirement(text)
            wanted = extras_seen[key] | {""}
            if needed.marker is None or any(needed.marker.evaluate({"extra": e}) for e in wanted):
                pending.append(needed)
    return found


def missing_on_gpu_machines() -> dict[str, str]:
    """clipcap's runtime dependencies (with theirs) the GPU machines lack: name → version installed here."""
    needed = [r for r in runtime_requirements() if canonical(split_requirement(r)[0]) not in NEVER_CARRIED]
    present = dependency_closure(list(PREINSTALLED))
    return {
        name: version for name, version in sorted(dependency_closure(needed).items()) if name not in present
    }


def wheel_name_matches(path: Path, name: str) -> bool:
    return path.suffix == ".whl" and canonical(path.name.split("-")[0]) == canonical(name)


def download(dest: Path, python_version: str) -> int:
    """Fetches the missing packages' wheels into ``dest``; returns the total size in bytes."""
    packages = missing_on_gpu_machines()
    dest.mkdir(parents=True, exist_ok=True)
    for stale in dest.glob("*.whl"):
        if not any(wheel_name_matches(stale, name) for name in packages):
            stale.unlink()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    for name, version in packages.items():
        if any(wheel_name_matches(path, name) and f"-{version}-" in path.name for path in dest.glob("*.whl")):
            continue
        for path in dest.glob("*.whl"):  # another version of it: one version each, or pip refuses both
            if wheel_name_matches(path, name):
                path.unlink()
        binary = [*pip, "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(dest)]
        binary += ["--python-version", python_version, "--implementation", "cp"]
        binary += [option for platform in GPU_PLATFORMS for option in ("--platform", platform)]
        if subprocess.run([*binary, f"{name}=={version}"], capture_output=True).returncode != 0:
            print(f"{name} {version}: no wheel for Python {python_version} on PyPI; building one here")
            built = [*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(dest), f"{name}=={version}"]
            subprocess.run(built, check=True)
    wheels = sorted(dest.glob("*.whl"))
    for name in packages:
        if not any(wheel_name_matches(path, name) for path in wheels):
            raise RuntimeError(f"no wheel of {name} in {dest}")
    (dest / REQUIREMENTS_FILE).write_text("".join(f"{n}=={v}\n" for n, v in packages.items()))
    total = sum(path.stat().st_size for path in wheels)
    for path in wheels:
        print(f"  {path.stat().st_size / 2**20:7.2f} MiB  {path.name}")
    print(f"  {total / 2**20:7.2f} MiB  in all, {len(wheels)} wheels (limit {WHEEL_BUDGET / 2**20:.0f} MiB)")
    if total > WHEEL_BUDGET:
        raise SystemExit(
            f"the wheels take {total / 2**20:.1f} MiB, over the {WHEEL_BUDGET / 2**20:.0f} MiB limit"
        )
    return total


def install(wheels: Path, target: Path) -> list[str]:
    """Installs from ``wheels`` (no index, no dependencies) the packages of its requirements file that are
    not installed; returns their names."""
    listed = wheels / REQUIREMENTS_FILE
    if not listed.is_file():
        print(f"{listed} is absent (run `make gpu-wheels` where PyPI is reachable): nothing installed")
        return []
    wanted = [line.split("==")[0] for line in listed.read_text().split() if line]
    missing = []
    for name in wanted:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    command += ["--no-index", "--no-deps", "--no-compile", "--find-links", str(wheels)]
    command += ["--target", str(target), "--upgrade"]
    installed, failed = [], []
    for name in missing:  # one at a time: a wheel made for another Python fails alone
        (installed if subprocess.run([*command, name]).returncode == 0 else failed).append(name)
    print(
        f"installed into {target}: {', '.join(installed) or 'nothing'}"
        + (" (all present)" if not missing else "")
    )
    if failed:
        print(f"could not install {', '.join(failed)}: the check's import part names what is then missing")
    return installed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("download", help="fetch the wheels the GPU machines need")
    fetch.add_argument("--dest", type=Path, default=REPO / ".gpu-wheels")
    fetch.add_argument("--python-version", default="3.12", help="the GPU machines' Python")
    put = commands.add_parser("install", help="install the missing ones, offline")
    put.add_argument("--wheels", type=Path, default=REPO / ".gpu-wheels")
    put.add_argument("--target", type=Path, default=REPO / ".gpu-site")
    commands.add_parser("list", help="print what the GPU machines lack")
    args = parser.parse_args(argv)
    if args.command == "download":
        download(args.dest, args.python_version)
    elif args.command == "install":
        install(args.wheels, args.target)
    else:
        for name, version in missing_on_gpu_machines().items():
            print(f"{name}=={version}")


if __name__ == "__main__":
    main()
