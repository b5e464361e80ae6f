#!/usr/bin/env python3
"""Fails when a function in the given C++/CUDA sources is longer than the limit.

Function extents come from Universal Ctags (`--fields=+ne`: start line and end line of every function
definition, Debian package universal-ctags). A function's length is end - start + 1 lines, braces and
comments inside it included; lambdas count towards the function that holds them.

    tests/tools/function_length.py [--max-lines 100] [PATH ...]   # PATH: files or folders (default: src)
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys

SUFFIXES = {".cpp", ".hpp", ".cu", ".cuh", ".h", ".cc"}


def sources(paths):
    for p in paths:
        path = pathlib.Path(p)
        if path.is_dir():
            yield from sorted(f for f in path.rglob("*") if f.suffix in SUFFIXES and f.is_file())
        elif path.is_file():
            yield path
        else:
            sys.exit(f"function_length: {p}: no such file or folder")


def functions(files):
    """(path, name, start line, end line) of every function definition ctags finds in `files`."""
    ctags = shutil.which("ctags")
    if ctags is None:
        sys.exit("function_length: ctags not found (install Universal Ctags: apt-get install universal-ctags)")
    command = [ctags, "--output-format=json", "--fields=+ne", "--languages=C++", "--langmap=C++:+.cu.cuh",
               "--kinds-C++=f", "-o", "-", *map(str, files)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        tag = json.loads(line)
        if tag.get("_type") != "tag" or "end" not in tag:
            continue
        name = tag["name"]
        if tag.get("scope") and not name.startswith("__anon"):
            name = f"{tag['scope']}::{name}"
        yield tag["path"], name, int(tag["line"]), int(tag["end"])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-lines", type=int, default=100, help="longest allowed function (lines)")
    parser.add_argument("paths", nargs="*", default=["src"], help="files or folders (default: src)")
    args = parser.parse_args()
    files = list(sources(args.paths))
    if not files:
        sys.exit("function_length: no C++ or CUDA source in " + " ".join(args.paths))
    found = list(functions(files))
    if not found:
        sys.exit("function_length: ctags found no function definition (is it Universal Ctags?)")
    too_long = sorted(((end - start + 1, path, name, start) for path, name, start, end in found
                       if end - start + 1 > args.max_lines), reverse=True)
    for lines, path, name, start in too_long:
        print(f"{path}:{start}: {name} is {lines} lines long (limit {args.max_lines})")
    longest = max(end - start + 1 for _, _, start, end in found)
    print(f"function_length: {len(found)} functions in {len(files)} files, longest {longest} lines, "
          f"{len(too_long)} over {args.max_lines}")
    return 1 if too_long else 0


if __name__ == "__main__":
    sys.exit(main())
