"""Download every file a `pip install --dry-run --report REPORT` resolved into DEST, surviving dropped connections.

    python scripts/fetch.py REPORT DEST

The registry connection here drops in the middle of large wheels (pyarrow 55 MB, ruff 10.6 MB,
mkdocs-material 9.3 MB, pillow 7.1 MB), often enough that a whole `pip install` fails even with
pip's own resumes. This resumes each file with HTTP range requests for as long as bytes keep coming,
keeps partial files across attempts, and checks every file against the sha256 the report gives.
Files from the machine's own package mirror (file:// URLs) are copied. Then
`pip install --no-index --find-links DEST …` installs exactly what was resolved, with no registry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ATTEMPTS = 200  # range requests per file; each continues where the last one stopped


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def expected_hash(info: dict) -> str | None:
    archive = info.get("archive_info", {})
    if "hashes" in archive and "sha256" in archive["hashes"]:
        return archive["hashes"]["sha256"]
    algorithm, _, value = archive.get("hash", "").partition("=")
    return value if algorithm == "sha256" else None


def download(url: str, target: Path, context: ssl.SSLContext) -> None:
    part = target.with_name(target.name + ".part")
    for attempt in range(ATTEMPTS):
        have = part.stat().st_size if part.exists() else 0
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=60, context=context) as response:
                resumed = have and response.status == 206
                with open(part, "ab" if resumed else "wb") as f:
                    shutil.copyfileobj(response, f, 1 << 20)
            part.replace(target)
            return
        except urllib.error.HTTPError as error:
            if error.code == 416 and have:  # nothing left to send: the part is whole
                part.replace(target)
                return
            reason = error
        except (OSError, EOFError) as error:  # dropped connection, timeout, incomplete read
            reason = error
        got = part.stat().st_size if part.exists() else 0
        print(f"  {target.name}: attempt {attempt + 1} stopped at {got:,} bytes ({reason}); resuming", file=sys.stderr)
        time.sleep(min(10, 1 + attempt))
    raise SystemExit(f"fetch: {url} did not download in {ATTEMPTS} attempts")


def main(report_path: str, dest: str) -> None:
    cafile = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"
    context = ssl.create_default_context(cafile=cafile if os.path.exists(cafile) else None)
    folder = Path(dest)
    folder.mkdir(parents=True, exist_ok=True)
    items = json.loads(Path(report_path).read_text())["install"]
    fetched = 0
    for item in items:
        info = item["download_info"]
        if "dir_info" in info:  # the project itself, installed from its folder
            continue
        url = info["url"].split("#")[0]
        target = folder / urllib.parse.unquote(url.rsplit("/", 1)[-1])
        digest = expected_hash(info)
        for _attempt in range(3):
            if not (target.exists() and (digest is None or sha256(target) == digest)):
                target.unlink(missing_ok=True)
                if url.startswith("file://"):
                    shutil.copyfile(urllib.parse.unquote(urllib.parse.urlparse(url).path), target)
                else:
                    download(url, target, context)
            if digest is None or sha256(target) == digest:
                break
            print(f"  {target.name}: sha256 mismatch, downloading again", file=sys.stderr)
        else:
            raise SystemExit(f"fetch: {target.name} does not match its sha256 {digest}")
        fetched += 1
    print(f"fetch: {fetched} files in {folder}")


if __name__ == "__main__":
    main(*sys.argv[1:])
