"""List the Kubernetes API calls that KFP v2's driver and launcher make with the run's service account,
from a kubeflow/pipelines source tree, as the JSON that k8s/upstream/kfp-v2-calls.json holds:

    python scripts/kfp_rbac_calls.py --src ../pipelines --ref 2.17.0 > k8s/upstream/kfp-v2-calls.json

It reads every non-test Go file under backend/src/v2 for typed client-go calls
(``clientSet.CoreV1().Secrets(ns).Get(``) and records each as (API group, resource, verb) with the file,
line and enclosing function. tests/test_k8s.py checks that the pipeline's Role grants each call the
pipeline can reach, so refreshing this file for a new KFP release shows a new call as a failing test.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

# client-go typed clients: group-version accessor → API group
GROUPS = {"CoreV1": "", "AppsV1": "apps", "BatchV1": "batch", "RbacV1": "rbac.authorization.k8s.io",
          "PolicyV1": "policy", "NetworkingV1": "networking.k8s.io", "StorageV1": "storage.k8s.io",
          "AuthorizationV1": "authorization.k8s.io", "AuthenticationV1": "authentication.k8s.io",
          "ArgoprojV1alpha1": "argoproj.io"}
# typed client method → Kubernetes verb
VERBS = {"Get": "get", "List": "list", "Watch": "watch", "Create": "create", "Update": "update",
         "UpdateStatus": "update", "Patch": "patch", "Apply": "patch", "Delete": "delete",
         "DeleteCollection": "deletecollection", "GetLogs": "get"}
CALL = re.compile(r"\.(?P<gv>[A-Z][A-Za-z]*V\d+(?:(?:alpha|beta)\d+)?)\(\)\s*\.\s*(?P<kind>[A-Z][A-Za-z]*)\([^()]*\)"
                  r"\s*\.\s*(?P<method>[A-Z][A-Za-z]*)\(", re.S)
FUNC = re.compile(r"^func\s+(?:\([^)]*\)\s*)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*[\[(]", re.M)


def resource_of(kind: str, method: str) -> str:
    """``Pods`` + ``GetLogs`` → ``pods/log``; otherwise the lower-cased plural the accessor is named by."""
    plural = kind.lower()
    return f"{plural}/log" if method == "GetLogs" else plural


def scan_text(text: str, path: str) -> list[dict]:
    """Every typed client-go call in one Go source file."""
    funcs = [(m.start(), m.group("name")) for m in FUNC.finditer(text)]
    calls = []
    for m in CALL.finditer(text):
        gv, method = m.group("gv"), m.group("method")
        if gv not in GROUPS or method not in VERBS:
            raise SystemExit(f"{path}:{text.count(chr(10), 0, m.start()) + 1}: unknown client-go call "
                             f"{gv}().{m.group('kind')}().{method}(): add it to GROUPS/VERBS")
        func = ([name for start, name in funcs if start < m.start()] or ["(top level)"])[-1]
        calls.append({"group": GROUPS[gv], "resource": resource_of(m.group("kind"), method), "verb": VERBS[method],
                      "at": f"{path}:{text.count(chr(10), 0, m.start()) + 1}", "function": func})
    return calls


def scan_tree(files: dict[str, str]) -> list[dict]:
    """``files``: relative path → Go source. Test files are skipped."""
    out = []
    for path in sorted(files):
        if path.endswith(".go") and not path.endswith("_test.go"):
            out += scan_text(files[path], path)
    return out


def read_tree(src: Path, ref: str | None, root: str = "backend/src/v2") -> dict[str, str]:
    """The Go files under ``root`` of a checkout, or of a git ref in it."""
    if ref is None:
        return {p.relative_to(src).as_posix(): p.read_text() for p in (src / root).rglob("*.go")}
    names = subprocess.run(["git", "-C", str(src), "ls-tree", "-r", "--name-only", ref, "--", root],
                           capture_output=True, text=True, check=True).stdout.split()
    return {n: subprocess.run(["git", "-C", str(src), "show", f"{ref}:{n}"], capture_output=True, text=True,
                              check=True).stdout for n in names if n.endswith(".go")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", required=True, type=Path, help="a kubeflow/pipelines checkout")
    ap.add_argument("--ref", help="a tag or commit in it (default: the work tree)")
    args = ap.parse_args(argv)
    calls = scan_tree(read_tree(args.src, args.ref))
    json.dump({"source": "kubeflow/pipelines", "ref": args.ref or "work tree", "root": "backend/src/v2",
               "calls": calls}, sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
