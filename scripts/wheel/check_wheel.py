"""Checks a repaired release wheel for what auditwheel and twine do not look at.

- its platform tag is manylinux, and it is tagged abi3 exactly when its modules are abi3 modules;
- the MIT license is in its metadata and LICENSE in its dist-info;
- it holds msdiff_fast._C (and, with --expect-cuda-module, msdiff_fast._C_cuda);
- no module needs a symbol without a version other than Python's: linking against an old
  glibc's stubs (scripts/build_wheel.sh) leaves a symbol that glibc added later unversioned,
  which the loader then finds only on new systems, and auditwheel does not notice.

Needs only the standard library and binutils' readelf, so it runs in the manylinux image too.
Usage: python check_wheel.py [--expect-cuda-module] WHEEL_OR_FOLDER ...
"""

import argparse
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

# Resolved by the interpreter that imports the module, so never versioned. Weak undefined
# symbols (w) come from the C runtime's start files and may stay missing.
PYTHON_SYMBOL = re.compile(r"^_?Py")


def unversioned_symbols(module: Path) -> list:
    listing = subprocess.run(["readelf", "--dyn-syms", "--wide", str(module)], check=True, capture_output=True, text=True).stdout
    missing = []
    for line in listing.splitlines():
        fields = line.split()
        # Num: Value Size Type Bind Vis Ndx Name
        if len(fields) < 8 or fields[6] != "UND" or fields[4] == "WEAK":
            continue
        name = fields[7]
        if "@" not in name and not PYTHON_SYMBOL.match(name):
            missing.append(name)
    return missing


def check(wheel: Path, expect_cuda_module: bool) -> list:
    problems = []
    name_parts = wheel.name[: -len(".whl")].split("-")
    abi_tag, platform_tag = name_parts[-2], name_parts[-1]
    if "manylinux" not in platform_tag:
        problems.append(f"platform tag: expected manylinux_*, got {platform_tag}")
    with zipfile.ZipFile(wheel) as archive, tempfile.TemporaryDirectory() as unpacked:
        names = archive.namelist()
        dist_info = next(n.split("/")[0] for n in names if n.split("/")[0].endswith(".dist-info"))
        if f"{dist_info}/licenses/LICENSE" not in names:
            problems.append(f"license file: expected {dist_info}/licenses/LICENSE, got none")
        metadata = archive.read(f"{dist_info}/METADATA").decode()
        if "License-Expression: MIT" not in metadata.splitlines():
            problems.append("metadata: expected 'License-Expression: MIT', got none")
        modules = [n for n in names if n.startswith("msdiff_fast/") and n.endswith(".so")]
        for module_name in ("_C", "_C_cuda"):
            if module_name == "_C_cuda" and not expect_cuda_module:
                continue
            if not any(Path(m).name.startswith(module_name + ".") for m in modules):
                problems.append(f"modules: expected msdiff_fast/{module_name}.*.so, got {[Path(m).name for m in modules]}")
        for module in modules:
            if (abi_tag == "abi3") != module.endswith(".abi3.so"):
                problems.append(
                    f"{module}: a {'abi3' if module.endswith('.abi3.so') else 'version-specific'} module in a wheel tagged {abi_tag}"
                )
            path = Path(archive.extract(module, unpacked))
            missing = unversioned_symbols(path)
            if missing:
                problems.append(f"{module}: expected every libc symbol versioned, got unversioned {', '.join(sorted(missing))}")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", type=Path, help="wheels, or folders of wheels")
    parser.add_argument("--expect-cuda-module", action="store_true", help="require msdiff_fast._C_cuda in every wheel")
    args = parser.parse_args()
    wheels = [w for p in args.paths for w in (sorted(p.glob("*.whl")) if p.is_dir() else [p])]
    if not wheels:
        print(f"check_wheel: expected wheels in {' '.join(map(str, args.paths))}, got none")
        return 1
    failed = False
    for wheel in wheels:
        problems = check(wheel, args.expect_cuda_module)
        print(f"{wheel.name}: {'ok' if not problems else 'FAILED'}")
        for problem in problems:
            print(f"  {problem}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
