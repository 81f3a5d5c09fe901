"""The packages a distribution needs, as this interpreter has them installed, for another machine.

    python -m bench.wheel_closure dvc --skip numpy pyyaml   # NAME==VERSION a line, sorted

bench/device_wheels.sh downloads these as wheels for the lent GPU image (CPython 3.12, Linux x86_64).
Each requirement's environment marker is evaluated for that image, not for this machine; `extra`
requirements are left out, and so are the names in --skip (what the image already has) and
everything only they need.
"""

from __future__ import annotations

import argparse
import re
from importlib import metadata

from packaging.markers import Marker

IMAGE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
         "platform_system": "Linux", "implementation_name": "cpython", "os_name": "posix",
         "platform_python_implementation": "CPython", "platform_machine": "x86_64", "extra": ""}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, skip: set[str], env: dict[str, str] = IMAGE) -> dict[str, str]:
    """{normalized name: installed version} of `root` and everything it needs under `env`."""
    skip, seen, todo = {normalize(s) for s in skip}, {}, [root]
    while todo:
        name = normalize(todo.pop())
        if name in seen or name in skip:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError as e:
            raise SystemExit(f"wheel_closure: {name} is needed but not installed in this interpreter") from e
        seen[name] = dist.version
        for req in dist.requires or []:
            spec, _, marker = req.partition(";")
            if not marker or Marker(marker).evaluate(env):
                todo.append(re.split(r"[ <>=!~\[(]", spec.strip())[0])
    return dict(sorted(seen.items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("root")
    ap.add_argument("--skip", nargs="*", default=[])
    a = ap.parse_args(argv)
    print("\n".join(f"{k}=={v}" for k, v in closure(a.root, set(a.skip)).items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
