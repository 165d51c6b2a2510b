"""A run folder's report.html as a real headless browser renders it, saved as a PNG.

    python benchmarks/report_screenshot.py RUN_DIR [--out benchmarks/results/report_html.png]

Needs Chromium (Debian: apt-get install chromium). It rebuilds report.html from the run folder first,
then loads it from disk with the network off (the page must need nothing else) and screenshots the
whole page. The README shows the PNG.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedslm.report_html import write_html  # noqa: E402

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/report_html.png"))
    parser.add_argument("--size", default="1280,2300", help="window width,height in pixels")
    args = parser.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        print("needs Chromium: apt-get install chromium", file=sys.stderr)
        return 2
    page = write_html(args.run_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", f"--window-size={args.size}",
                               f"--screenshot={args.out.resolve()}", page.resolve().as_uri()],
                              capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not args.out.exists():
        print(done.stderr[-2000:], file=sys.stderr)
        return 1
    print(f"{page} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
