"""`aotlm diff A B`: what changed between two bundles, read from their (digest-checked) manifests.

Useful in review ("this PR adds a token bucket and changes no weights") and before a deploy
("the new bundle only adds a cuda target"). Files compare by sha256, so nothing is re-hashed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from aotlm.bundle import read_manifest

_VERSION_KEYS = ("format_version", "aotlm_version", "jax_version", "jaxlib_version", "name")


def _flatten(obj: Any, prefix: str) -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


def _changed(a: dict, b: dict, prefix: str) -> dict[str, list]:
    fa, fb = _flatten(a, prefix), _flatten(b, prefix)
    return {
        k: [fa.get(k), fb.get(k)] for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)
    }


def _targets(m: dict) -> dict:
    """Per target: its tier and memory plan (`targets`) and compiled fingerprint, not file lists."""
    names = set(m.get("targets", {})) | set(m.get("compiled", {}))
    return {
        t: {
            **m.get("targets", {}).get(t, {}),
            "fingerprint": m.get("compiled", {}).get(t, {}).get("fingerprint"),
        }
        for t in sorted(names)
    }


def _functions(m: dict) -> dict[str, str]:
    """'forward[tokens=16]' -> the sha256 of its exported file."""
    out = {}
    for f in m["functions"]:
        bucket = ",".join(f"{k}={v}" for k, v in sorted(f["bucket"].items()))
        out[f"{f['name']}[{bucket}]"] = m["files"][f["file"]]["sha256"]
    return out


def _added_removed_changed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, list[str]]:
    return {
        "added": sorted(b.keys() - a.keys()),
        "removed": sorted(a.keys() - b.keys()),
        "changed": sorted(k for k in a.keys() & b.keys() if a[k] != b[k]),
    }


def diff_manifests(a: dict, a_digest: str, b: dict, b_digest: str) -> dict:
    """A JSON-ready description of every difference between two written manifests
    (`Manifest.to_dict()`); `identical` when the digests are equal."""
    files_a = {p: e["sha256"] for p, e in a["files"].items()}
    files_b = {p: e["sha256"] for p, e in b["files"].items()}
    files = _added_removed_changed(files_a, files_b)
    sizes = {
        p: [a["files"].get(p, {}).get("size"), b["files"].get(p, {}).get("size")]
        for group in files.values()
        for p in group
    }
    return {
        "a": {"digest": f"sha256:{a_digest}", "name": a["name"]},
        "b": {"digest": f"sha256:{b_digest}", "name": b["name"]},
        "identical": a_digest == b_digest,
        "versions": _changed(
            {k: a.get(k) for k in _VERSION_KEYS}, {k: b.get(k) for k in _VERSION_KEYS}, ""
        ),
        "model": _changed(a["model"], b["model"], "model"),
        "buckets": _changed(a["buckets"], b["buckets"], "buckets"),
        "serving": _changed(a["serving"], b["serving"], "serving"),
        "targets": _changed(_targets(a), _targets(b), "targets"),
        "functions": _added_removed_changed(_functions(a), _functions(b)),
        "files": files,
        "file_sizes": sizes,
    }


def diff_bundles(a: Path | str, b: Path | str) -> dict:
    ma, da = read_manifest(Path(a))
    mb, db = read_manifest(Path(b))
    return diff_manifests(ma.to_dict(), da, mb.to_dict(), db)


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def format_diff(d: dict) -> str:
    """Human-readable diff: one line per changed setting, then functions and files."""
    lines = [
        f"a  {d['a']['digest']}  ({d['a']['name']})",
        f"b  {d['b']['digest']}  ({d['b']['name']})",
    ]
    if d["identical"]:
        return "\n".join([*lines, "identical (same bundle digest)"])
    for section in ("versions", "model", "buckets", "serving", "targets"):
        lines += [f"{k}: {va!r} -> {vb!r}" for k, (va, vb) in d[section].items()]
    for section, marks in (("functions", "+-~"), ("files", "+-~")):
        groups = d[section]
        counts = " ".join(
            f"{m}{len(groups[g])}"
            for m, g in zip(marks, ("added", "removed", "changed"), strict=True)
        )
        lines.append(f"{section}: {counts}")
        for mark, group in zip(marks, ("added", "removed", "changed"), strict=True):
            for name in groups[group]:
                extra = ""
                if section == "files":
                    sa, sb = d["file_sizes"][name]
                    extra = f"  {_size(sa)} -> {_size(sb)}" if sa and sb else f"  {_size(sa or sb)}"
                lines.append(f"  {mark} {name}{extra}")
    return "\n".join(lines)
