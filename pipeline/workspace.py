"""Throw-away copies of the project with a params profile applied (tests, `invoke smoke`).

A workspace is the project's tracked files copied to another folder, with params.yaml
replaced by the default params merged with `profiles/<profile>.yaml`, and its own git
repository so `dvc repro` runs there exactly as it does here. Never touches the source.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "profiles"
# Results of a run in the source tree that must not leak into a fresh workspace.
SKIP = {"dvc.lock"}
SKIP_DIRS = ("metrics/", "plots/")


def merge(base: dict, overlay: dict) -> dict:
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def profile_params(profile: Optional[str], src: Path = ROOT) -> dict:
    params = yaml.safe_load((src / "params.yaml").read_text(encoding="utf-8"))
    if profile:
        path = src / "profiles" / f"{profile}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in (src / "profiles").glob("*.yaml"))
            raise SystemExit(f"error: no profile '{profile}' (have: {', '.join(names)})")
        params = merge(params, yaml.safe_load(path.read_text(encoding="utf-8")) or {})
    return params


def project_files(src: Path):
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=src, check=True, capture_output=True).stdout.decode()
    for name in out.split("\0"):
        if name and name not in SKIP and not name.startswith(SKIP_DIRS) \
                and (src / name).is_file():
            yield name


def create(dst: Path, profile: Optional[str] = None, src: Path = ROOT,
           overrides: Optional[dict] = None) -> Path:
    """Copy the project to `dst` (replaced if present) with the profile's params."""
    dst = Path(dst)
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for name in project_files(src):
        target = dst / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, target)
    params = merge(profile_params(profile, src), overrides or {})
    (dst / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    git = ["git", "-c", "user.name=tokenmeter", "-c", "user.email=tokenmeter@localhost"]
    subprocess.run([*git, "init", "-q"], cwd=dst, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dst, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "workspace"], cwd=dst, check=True)
    return dst


def apply_profile(ws: Path, profile: str) -> Path:
    """Rewrite `ws`/params.yaml as the defaults merged with the profile (the container's
    own workspace copy uses this; a checkout should use `create` instead)."""
    params = profile_params(profile, ws)
    target = Path(ws) / "params.yaml"
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    tmp.replace(target)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dest", type=Path)
    ap.add_argument("--profile", default=None)
    ap.add_argument("--in-place", action="store_true",
                    help="apply the profile to DEST/params.yaml instead of making a copy")
    args = ap.parse_args()
    if args.in_place:
        if not args.profile:
            raise SystemExit("error: --in-place needs --profile NAME")
        print(apply_profile(args.dest, args.profile))
    else:
        print(create(args.dest, args.profile))


if __name__ == "__main__":
    main()
