#!/usr/bin/env python3
"""Helpers of benchmarks/gpu/run_suite.sh that are easier in Python than in bash (standard library only).

  suite.py manifest BUNDLE OUT_JSON         check .gpu-build/manifest.json against the files (sizes, sha256)
  suite.py find-libs MANIFEST OUT_JSON      find the CUDA libraries the shipped binaries need; prints the
                                            folders to put on LD_LIBRARY_PATH, one per line
  suite.py ldd BUNDLE OUT_JSON [VAR=VALUE...]  with the shipped binaries' environment, list what each
                                            of them cannot resolve
  suite.py machine OUT_JSON [--no-gpu]      nvidia-smi, driver, toolkit, PyTorch and system versions
  suite.py summarize OUT_DIR RESULTS_DIR [--quiet]
                                            read steps.tsv and the per-step files, write OUT_DIR/summary.json
                                            (atomically), print the summary table (not with --quiet: the
                                            suite's rewrite after every step); exit 1 if a step failed, 3 if
                                            none failed but something was missing or skipped, else 0

Each subcommand writes what it found even when it finds problems, and says so on stdout.
"""

import glob
import hashlib
import json
import os
import platform
import re
import shutil
import site
import subprocess
import sys
import time

PEAK_FLOPS = 989e12  # H100/H200 SXM dense bf16/fp16 tensor-core peak, the MFU reference of the suite

# The CUDA 13 sonames a full build of mptrain links (cudart, cuBLAS/cuBLASLt, cuDNN 9, NCCL 2). The manifest
# adds whatever the shipped binaries really need, so a soname this list misses is still looked for.
EXPECTED_CUDA_SONAMES = ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13", "libcudnn.so.9",
                         "libnccl.so.2"]
DRIVER_SONAME = "libcuda.so.1"


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def run(cmd, timeout=30, env=None):
    """Runs cmd; returns (exit code or None when it could not start or timed out, stdout + stderr)."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, str(e)


# ------------------------------------------------------------------------------------------------ manifest
def cmd_manifest(bundle, out_json):
    manifest = read_json(os.path.join(bundle, "manifest.json"))
    result = {"bundle": bundle, "ok": False, "problems": []}
    if manifest is None:
        result["problems"].append("no readable manifest.json: run benchmarks/gpu/prepare.sh")
        write_json(out_json, result)
        print(f"manifest: MISSING ({bundle}/manifest.json)")
        return 0
    for rel, meta in sorted(manifest.get("files", {}).items()):
        p = os.path.join(bundle, rel)
        if not os.path.isfile(p):
            result["problems"].append(f"missing file {rel}")
            continue
        with open(p, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
        if digest != meta["sha256"]:
            result["problems"].append(f"sha256 mismatch {rel}")
    need, have = manifest.get("glibc_required"), platform.libc_ver()[1]
    if need and have and version_tuple(have) < version_tuple(need):
        result["problems"].append(f"this machine's glibc {have} is older than the {need} the shipped files need")
    result["glibc"] = {"required": need, "machine": have}
    rc, head = run(["git", "rev-parse", "HEAD"])
    head = head if rc == 0 else "unknown"
    built = manifest.get("git_commit", "unknown")
    result.update({"ok": not result["problems"], "files": len(manifest.get("files", {})),
                   "total_bytes": manifest.get("total_bytes"), "git_commit_built": built,
                   "git_commit_checkout": head, "same_commit": built.split("-")[0] == head,
                   "binaries": manifest.get("binaries", []), "gpu_tests": manifest.get("gpu_tests", []),
                   "not_built": manifest.get("not_built", []), "build": manifest.get("build", {}),
                   "cuda_sonames_needed": manifest.get("cuda_sonames_needed", [])})
    write_json(out_json, result)
    state = "ok" if result["ok"] else "PROBLEMS: " + "; ".join(result["problems"][:5])
    print(f"manifest: {state}; {result['files']} files, built from {built}"
          + ("" if result["same_commit"] else f" (checkout is {head}: the bundle may be stale)"))
    if result["not_built"]:
        print(f"manifest: not in this bundle (the tree did not build them): {' '.join(result['not_built'])}")
    return 0


# ------------------------------------------------------------------------------------------------ libraries
def candidate_dirs():
    """(folder, source) pairs in search order: MPTRAIN_CUDA_LIB_DIRS, the Python wheels, the toolkit, the driver."""
    dirs = []
    for d in filter(None, os.environ.get("MPTRAIN_CUDA_LIB_DIRS", "").split(":")):
        dirs.append((d, "MPTRAIN_CUDA_LIB_DIRS"))
    sites = []
    try:
        sites += site.getsitepackages()
    except AttributeError:  # some virtual environments' site module lacks it
        pass
    sites += [site.getusersitepackages()] + [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    try:
        import nvidia  # the wheels' namespace package: its __path__ covers every site folder holding one
        sites += [os.path.dirname(p) for p in nvidia.__path__]
    except ImportError:
        pass
    for s in dict.fromkeys(sites):
        # CUDA 13 wheels share nvidia/cu13/lib; cuDNN and NCCL keep nvidia/cudnn/lib and nvidia/nccl/lib.
        for d in sorted(glob.glob(os.path.join(s, "nvidia", "*", "lib")) +
                        glob.glob(os.path.join(s, "nvidia", "*", "lib64"))):
            dirs.append((d, "python wheel"))
    for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/lib", "/usr/local/cuda/targets/x86_64-linux/lib"):
        dirs.append((d, "CUDA toolkit"))
    for d in ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib", "/usr/lib/x86_64-linux-gnu",
              "/usr/lib64"):
        dirs.append((d, "system/driver"))
    seen, unique = set(), []
    for d, src in dirs:
        real = os.path.realpath(d)
        if os.path.isdir(real) and real not in seen:
            seen.add(real)
            unique.append((d, src))
    return unique


def ldconfig_map():
    rc, text = run(["ldconfig", "-p"]) if shutil.which("ldconfig") else (None, "")
    found = {}
    for line in text.splitlines()[1:] if rc == 0 else []:
        m = re.match(r"\s*(\S+) \(([^)]*)\) => (\S+)", line)
        if m and "x86-64" in m.group(2):
            found.setdefault(m.group(1), m.group(3))
    return found


def version_tuple(v):
    return tuple(int(x) for x in v.split(".") if x.isdigit())


def choose_cxx_runtime(manifest, bundle, ldc):
    """The machine's libstdc++/libgcc_s where they define every symbol version the shipped files need (PyTorch
    already loads them, and a newer one may need a newer glibc than the bundle's), else the bundle's lib/cxx."""
    info = manifest.get("cxx_runtime") or {}
    need = info.get("versions_required") or {}
    shipped_dir = os.path.join(bundle, info.get("dir", "lib/cxx"))
    checks = {"libstdc++.so.6": [f"GLIBCXX_{need[k]}" if k == "GLIBCXX" else f"CXXABI_{need[k]}"
                                 for k in ("GLIBCXX", "CXXABI") if need.get(k)],
              "libgcc_s.so.1": [f"GCC_{need['GCC']}"] if need.get("GCC") else []}
    lacking = []
    system = {}
    for lib, versions in checks.items():
        path = ldc.get(lib) or next((p for p in (f"/usr/lib/x86_64-linux-gnu/{lib}", f"/lib/x86_64-linux-gnu/{lib}",
                                                 f"/usr/lib64/{lib}") if os.path.exists(p)), None)
        system[lib] = os.path.realpath(path) if path else None
        try:
            data = open(path, "rb").read() if path else b""
        except OSError:
            data = b""
        lacking += [f"{lib} ({'absent' if not data else v})" for v in versions
                    if not data or (v.encode() + b"\0") not in data]
    use_shipped = bool(lacking) and os.path.isdir(shipped_dir)
    glibc_need, glibc_have = info.get("glibc_required_with_it"), platform.libc_ver()[1]
    result = {"use_shipped": use_shipped, "shipped_dir": shipped_dir, "system": system, "needed": need,
              "system_lacks": lacking}
    if not info:
        result["reason"] = "no manifest: not checked"
    elif not lacking:
        result["reason"] = f"the machine's ({system['libstdc++.so.6']}) has every version the binaries need"
    elif use_shipped:
        result["reason"] = f"the bundle's, because the machine's lacks {', '.join(lacking)}"
        if glibc_need and glibc_have and version_tuple(glibc_have) < version_tuple(glibc_need):
            result["reason"] += f"; PROBLEM: it needs glibc {glibc_need}, this machine has {glibc_have}"
    else:
        result["reason"] = f"PROBLEM: the machine's lacks {', '.join(lacking)} and the bundle has none"
    return result


def cmd_find_libs(manifest_path, out_json):
    manifest = read_json(manifest_path) or {}
    needed = list(dict.fromkeys(manifest.get("cuda_sonames_needed", []) + EXPECTED_CUDA_SONAMES))
    linked = set(manifest.get("cuda_sonames_needed", []))
    dirs = candidate_dirs()
    ldc = ldconfig_map()
    libs, path_dirs = {}, []
    for soname in needed + [DRIVER_SONAME]:
        entry = {"linked_by_shipped_binaries": soname in linked, "found": False}
        for d, src in dirs:
            p = os.path.join(d, soname)
            if os.path.exists(p):
                entry.update(found=True, path=p, real_path=os.path.realpath(p), source=src, dir=d)
                break
        if not entry["found"] and soname in ldc:
            entry.update(found=True, path=ldc[soname], real_path=os.path.realpath(ldc[soname]),
                         source="ldconfig cache", dir=os.path.dirname(ldc[soname]))
        libs[soname] = entry
        # The driver's folder and the loader's own cache need no LD_LIBRARY_PATH entry; the others do.
        if entry["found"] and entry["source"] not in ("ldconfig cache",) and not (
                soname == DRIVER_SONAME and entry["source"] == "system/driver" and soname in ldc):
            if entry["dir"] not in path_dirs:
                path_dirs.append(entry["dir"])
    cxx = choose_cxx_runtime(manifest, os.path.dirname(os.path.abspath(manifest_path)), ldc)
    if cxx["use_shipped"]:
        path_dirs.insert(0, cxx["shipped_dir"])
    missing_linked = [s for s, e in libs.items() if e["linked_by_shipped_binaries"] and not e["found"]]
    result = {"cxx_runtime": cxx, "searched": [{"dir": d, "source": s} for d, s in dirs], "libraries": libs,
              "ld_library_path_added": path_dirs, "missing_linked": missing_linked,
              "missing_expected": [s for s in EXPECTED_CUDA_SONAMES if not libs[s]["found"]],
              "driver_found": libs[DRIVER_SONAME]["found"]}
    write_json(out_json, result)
    for soname, e in libs.items():
        where = "NOT FOUND"
        if e["found"]:
            real = "" if e["real_path"] == e["path"] else f" -> {e['real_path']}"
            where = f"{e['path']}{real} ({e['source']})"
        tag = "linked" if e["linked_by_shipped_binaries"] else ("driver" if soname == DRIVER_SONAME else "expected")
        print(f"libs: {soname:<20} [{tag:<8}] {where}", file=sys.stderr)
    print(f"libs: C++ runtime: {cxx['reason']}", file=sys.stderr)
    if missing_linked:
        print(f"libs: MISSING libraries the shipped binaries link: {' '.join(missing_linked)}", file=sys.stderr)
    for d in path_dirs:
        print(d)
    return 0


def cmd_ldd(bundle, out_json, env_assignments):
    # Only ldd gets the bundle's environment: this interpreter must not load the bundle's libraries.
    env = dict(os.environ)
    env.update(a.split("=", 1) for a in env_assignments)
    result = {}
    for b in sorted(glob.glob(os.path.join(bundle, "bin", "*"))):
        rc, text = run(["ldd", b], env=env)
        result[os.path.basename(b)] = sorted({ln.split()[0] for ln in text.splitlines() if "not found" in ln})
    write_json(out_json, {"unresolved": result, "ok": not any(result.values())})
    bad = {k: v for k, v in result.items() if v}
    print("ldd: every shipped binary resolves all its libraries" if not bad else
          "ldd: UNRESOLVED " + "; ".join(f"{k}: {' '.join(v)}" for k, v in bad.items()))
    return 0


# ------------------------------------------------------------------------------------------------ machine
def cmd_machine(out_json, no_gpu):
    m = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "hostname": platform.node(),
         "kernel": platform.release(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
         "python_executable": sys.executable}
    try:
        with open("/etc/os-release") as f:
            m["os"] = dict(re.findall(r'^(\w+)="?([^"\n]*)"?$', f.read(), re.M)).get("PRETTY_NAME")
    except OSError:
        m["os"] = None
    m["glibc"] = platform.libc_ver()[1]
    try:
        with open("/proc/meminfo") as f:
            m["mem_total_kib"] = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    except (OSError, AttributeError):
        m["mem_total_kib"] = None
    tools = {"nvcc": ["nvcc", "--version"], "compute_sanitizer": ["compute-sanitizer", "--version"],
             "cmake": ["cmake", "--version"]}
    if not no_gpu:
        tools["nvidia_smi"] = ["nvidia-smi"]
        tools["nvidia_smi_query"] = ["nvidia-smi", "--format=csv",
                                     "--query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,"
                                     "clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,"
                                     "pstate,compute_mode,mig.mode.current"]
    search = os.environ.get("PATH", "") + ":/usr/local/cuda/bin:/usr/local/cuda/compute-sanitizer"
    for name, cmd in tools.items():
        if shutil.which(cmd[0], path=search) is None:
            m[name] = None
            continue
        rc, text = run([shutil.which(cmd[0], path=search)] + cmd[1:])
        m[name] = text if rc == 0 else f"exit {rc}: {text[-2000:]}"
    torch_probe = ("import json, torch; d = {'torch': torch.__version__, 'cuda': torch.version.cuda, "
                   "'cudnn': torch.backends.cudnn.version()}; ")
    torch_probe += ("d['nccl'] = '.'.join(map(str, torch.cuda.nccl.version())); "
                    "d['device_count'] = torch.cuda.device_count(); "
                    "d['devices'] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]; "
                    if not no_gpu else "")
    torch_probe += "print(json.dumps(d))"
    rc, text = run([sys.executable, "-c", torch_probe], timeout=120)
    if rc == 0:
        m["pytorch"] = json.loads(text.splitlines()[-1])
    else:
        m["pytorch"] = {"error": text[-2000:] if text else f"exit {rc}"}
    m["gpu_queried"] = not no_gpu
    write_json(out_json, m)
    gpu = ("not queried (dry run)" if no_gpu else m.get("nvidia_smi_query") or "nvidia-smi NOT FOUND").splitlines()[-1]
    print(f"machine: {m['os']}, glibc {m['glibc']}, {m['cpus']} CPUs; GPU: {gpu}")
    print(f"machine: nvcc {'yes' if m['nvcc'] else 'no'}, compute-sanitizer "
          f"{'yes' if m['compute_sanitizer'] else 'no'}, PyTorch {m['pytorch'].get('torch', 'NOT IMPORTABLE')}")
    return 0


# ------------------------------------------------------------------------------------------------ summary
def gtest_counts(path):
    j = read_json(path)
    if j is None:
        return None
    cases = [t for s in j.get("testsuites", []) for t in s.get("testsuite", [])]
    skipped = [f"{t.get('classname')}.{t.get('name')}" for t in cases if t.get("result") == "SKIPPED"]
    failed = [f"{t.get('classname')}.{t.get('name')}" for t in cases if t.get("failures")]
    return {"tests": len(cases), "failed": len(failed), "skipped": len(skipped),
            "failed_names": failed[:20], "skipped_names": skipped[:20]}


def sanitizer_errors(log):
    try:
        text = open(log, errors="replace").read()
    except OSError:
        return None
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    return int(m[-1]) if m else None


def bench_point(j):
    if not j:
        return None
    tps = j.get("tokens_per_second", {})
    tps = tps.get("median") if isinstance(tps, dict) else tps
    flops = j.get("flops_per_token")
    cfg = j.get("config", {})
    return {"micro_batch": cfg.get("micro_batch"), "tokens_per_second": tps, "parameters": j.get("parameters"),
            "flops_per_token": flops, "mfu_989": tps * flops / PEAK_FLOPS if tps and flops else None,
            "step_seconds_median": (j.get("step_seconds") or {}).get("median")}


def read_steps(results):
    steps = []
    try:
        lines = open(os.path.join(results, "steps.tsv")).read().splitlines()
    except OSError:
        return steps
    for ln in lines:
        f = ln.split("\t")
        if len(f) < 9:
            continue
        steps.append({"name": f[0], "kind": f[1], "status": f[2], "exit_code": int(f[3]) if f[3] else None,
                      "seconds": float(f[4]) if f[4] else None, "timeout_seconds": int(f[5]) if f[5] else None,
                      "log": f[6] or None, "json": f[7] or None, "command": f[8],
                      "note": (f[9] if len(f) > 9 else "") or None})
    return steps


def cmd_summarize(out_dir, results, quiet=False):
    steps = read_steps(results)
    summary = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": steps}
    meta = read_json(os.path.join(results, "suite_meta.json")) or {}
    summary["suite"] = meta
    summary["manifest"] = read_json(os.path.join(results, "manifest_check.json"))
    libs = read_json(os.path.join(results, "libs.json")) or {}
    summary["cuda_libraries"] = {k: (v.get("real_path") if v.get("found") else "NOT FOUND")
                                 for k, v in libs.get("libraries", {}).items()}
    summary["ldd"] = read_json(os.path.join(results, "ldd.json"))

    tests = {}
    for s in steps:
        if s["kind"] in ("gtest", "host-check") and s["json"]:
            tests[s["name"]] = {"status": s["status"], **(gtest_counts(os.path.join(results, s["json"])) or {})}
            try:
                log_text = open(os.path.join(results, s["log"] or ""), errors="replace").read()
            except OSError:
                log_text = ""
            # Every GPU test skips with this message where it finds no device (CI); on the GPU machine that
            # means the binaries did not see the GPU, which defeats the suite.
            tests[s["name"]]["skipped_no_cuda_device"] = "no CUDA device" in log_text
        if s["kind"] == "sanitizer":
            tests[s["name"]] = {"status": s["status"],
                                "memcheck_errors": sanitizer_errors(os.path.join(results, s["log"] or ""))}
    summary["tests"] = tests

    bench = {}
    for s in steps:
        if s["kind"] != "bench" or s["status"] != "passed":
            continue
        shape, side = s["name"].split(".")[1:3]  # bench.<shape>.<side>.b<micro-batch>
        bench.setdefault(shape, {})[side] = bench_point(read_json(os.path.join(results, s["json"])))
    for shape, sides in bench.items():
        m, t = sides.get("mptrain"), sides.get("pytorch")
        if m and t and m["tokens_per_second"] and t["tokens_per_second"]:
            sides["ratio_mptrain_over_pytorch"] = m["tokens_per_second"] / t["tokens_per_second"]
    summary["benchmarks"] = bench

    coll = None
    for s in steps:
        if s["kind"] == "collectives" and s["json"]:
            j = read_json(os.path.join(results, s["json"]))
            if j:
                largest = {}
                for r in j.get("results", []):
                    key = f"{r['op']}.{r['type']}"
                    if key not in largest or r["size_bytes"] > largest[key]["size_bytes"]:
                        largest[key] = r
                coll = {"comm": j.get("comm"), "ranks": j.get("ranks"), "total_wrong": j.get("total_wrong"),
                        "largest_message": {k: {"size_bytes": v["size_bytes"], "algbw_gb_per_s": v["algbw_gb_per_s"],
                                                "busbw_gb_per_s": v["busbw_gb_per_s"]} for k, v in largest.items()}}
    summary["collectives"] = coll

    train = None
    metrics = os.path.join(results, "train_metrics.jsonl")
    if os.path.exists(metrics):
        rows = [json.loads(ln) for ln in open(metrics) if ln.strip()]
        losses = [r["train_loss"] for r in rows if r.get("train_loss") is not None]
        vals = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
        tps = [r["tokens_per_second"] for r in rows if r.get("tokens_per_second")]
        train = {"log_lines": len(rows), "first_train_loss": losses[0] if losses else None,
                 "last_train_loss": losses[-1] if losses else None, "last_val_loss": vals[-1] if vals else None,
                 "last_tokens_per_second": tps[-1] if tps else None,
                 "loss_decreased": bool(losses) and losses[-1] < losses[0]}
    summary["train"] = train

    statuses = [s["status"] for s in steps]
    failed = [s["name"] for s in steps if s["status"] in ("failed", "timeout")]
    # Out of memory is an answer while the micro-batch search goes on; a side with no micro-batch that ran failed.
    for s in steps:  # a training run that exits 0 must also have learned something
        if s["kind"] == "train" and s["status"] == "passed" and not (train and train["loss_decreased"]):
            failed.append(s["name"] + " (no decrease of the training loss in metrics.jsonl)")
    tried = {".".join(s["name"].split(".")[:3]) for s in steps if s["kind"] == "bench" and s["status"] == "oom"}
    failed += sorted(t + " (out of memory at every micro-batch)" for t in tried
                     if not bench.get(t.split(".")[1], {}).get(t.split(".")[2]))
    incomplete = [s["name"] for s in steps if s["status"] in ("missing", "skipped-budget", "skipped")]
    # A GPU test that skipped on the GPU machine means the device was not used: count it as a problem.
    gpu_skips = [n for n, t in tests.items() if t.get("skipped_no_cuda_device") and not meta.get("dry_run")]
    if meta.get("dry_run"):
        overall = "dry-run"
    elif failed or gpu_skips:
        overall = "failed"
    elif incomplete or not steps:
        overall = "incomplete"
    else:
        overall = "passed"
    if quiet and overall == "passed":  # written while the suite runs: what ran passed, the rest has not run
        overall = "running"
    summary.update({"overall": overall, "finished": not quiet, "failed_steps": failed,
                    "missing_or_skipped_steps": incomplete,
                    "gpu_tests_with_skips": gpu_skips,
                    "counts": {st: statuses.count(st) for st in sorted(set(statuses))}})
    write_json(os.path.join(out_dir, "summary.json"), summary)
    if quiet:  # the suite rewrites the summary after every step; the table is printed once, at the end
        return 0

    print("\n=== mptrain GPU suite summary ===")
    for s in steps:
        secs = f"{s['seconds']:.1f}s" if s["seconds"] is not None else "-"
        print(f"  {s['status']:<14} {secs:>7}  {s['name']}" + (f"  ({s['note']})" if s.get("note") else ""))
    for name, t in tests.items():
        if "tests" in t:
            print(f"  tests {name}: {t['tests']} run, {t['failed']} failed, {t['skipped']} skipped")
        if "memcheck_errors" in t and t["memcheck_errors"] is not None:
            print(f"  {name}: {t['memcheck_errors']} memcheck errors")
    if bench:
        print(f"  {'shape':<12} {'side':<8} {'B':>3} {'tokens/s':>12} {'MFU@989':>8}")
        for shape, sides in bench.items():
            for side in ("mptrain", "pytorch"):
                p = sides.get(side)
                if p:
                    mfu = f"{100 * p['mfu_989']:.1f}%" if p["mfu_989"] is not None else "-"
                    print(f"  {shape:<12} {side:<8} {p['micro_batch'] or '-':>3} "
                          f"{p['tokens_per_second'] or 0:>12,.0f} {mfu:>8}")
            if "ratio_mptrain_over_pytorch" in sides:
                print(f"  {shape:<12} mptrain/PyTorch tokens/s = {sides['ratio_mptrain_over_pytorch']:.3f}")
    if coll:
        for k, v in coll["largest_message"].items():
            print(f"  collectives {k} {v['size_bytes']} B: algbw {v['algbw_gb_per_s']:.1f} GB/s, "
                  f"busbw {v['busbw_gb_per_s']:.1f} GB/s")
        print(f"  collectives #wrong total: {coll['total_wrong']}")
    if train:
        print(f"  train: loss {train['first_train_loss']} -> {train['last_train_loss']}, "
              f"val {train['last_val_loss']}, {train['last_tokens_per_second']} tok/s")
    missing_libs = [k for k, v in summary["cuda_libraries"].items() if v == "NOT FOUND"]
    if missing_libs:
        print(f"  CUDA libraries NOT FOUND (libcuda.so.1 is the driver's): {' '.join(missing_libs)}")
    print(f"  overall: {overall}" + (f" (failed: {' '.join(failed)})" if failed else "")
          + (f" (missing/skipped: {' '.join(incomplete)})" if incomplete else "")
          + (f" (skipped with 'no CUDA device' on the GPU machine: {' '.join(gpu_skips)})" if gpu_skips else ""))
    return {"failed": 1, "incomplete": 3}.get(overall, 0)


def main(argv):
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[1], argv[2:]
    if cmd == "manifest" and len(args) == 2:
        return cmd_manifest(*args)
    if cmd == "find-libs" and len(args) == 2:
        return cmd_find_libs(*args)
    if cmd == "ldd" and len(args) >= 2:
        return cmd_ldd(args[0], args[1], args[2:])
    if cmd == "machine" and len(args) in (1, 2):
        return cmd_machine(args[0], no_gpu=args[1:] == ["--no-gpu"])
    if cmd == "summarize" and len(args) in (2, 3) and args[2:] in ([], ["--quiet"]):
        return cmd_summarize(args[0], args[1], quiet=args[2:] == ["--quiet"])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
