"""The report page rendered by a real headless browser (Debian's Chromium).

The session installs Chromium with apt-get when it is missing and the process
may do so (root, apt-get present); elsewhere the test skips and says why.

A copy of the page gets a small script at the very top of <head> that records
console errors and failed loads, and, once the page has loaded, writes what it
saw into a marker element that ``--dump-dom`` hands back.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_fixtures import standard_run

from harness.report import ReportSettings, build_report

CHROMIUM = "chromium"
_PROBE = """<script>
(function () {
  var errors = [];
  var original = console.error;
  console.error = function () {
    errors.push(Array.prototype.join.call(arguments, " "));
    original.apply(console, arguments);
  };
  // capture phase: also catches <img> and other resources that fail to load
  window.addEventListener("error", function (e) {
    errors.push(e.message || ("failed to load " + (e.target && (e.target.src || e.target.href))));
  }, true);
  window.addEventListener("load", function () {
    var imgs = Array.prototype.slice.call(document.images);
    var decoded = imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; });
    var verdict = document.getElementById("verdict-text");
    var m = document.createElement("pre");
    m.id = "harness-probe";
    m.textContent = "images=" + imgs.length + " decoded=" + decoded.length +
      " errors=" + errors.length + " verdict=" + (verdict ? verdict.textContent : "none") +
      (errors.length ? " first=" + errors[0] : "");
    document.body.appendChild(m);
  });
})();
</script>"""


def _install_chromium() -> str | None:
    """Return why Chromium cannot be had, or None once it is on PATH."""
    if shutil.which(CHROMIUM):
        return None
    apt = shutil.which("apt-get")
    if apt is None:
        return "Chromium is not installed and apt-get is not available to install it"
    if os.geteuid() != 0:
        return "Chromium is not installed and installing it with apt-get needs root"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in ([apt, "update", "-q"], [apt, "install", "-y", "-q", CHROMIUM]):
        try:
            done = subprocess.run(
                cmd, env=env, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL
            )
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` timed out"
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:]
            return f"`{' '.join(cmd)}` failed: {' '.join(tail)}"
    return None if shutil.which(CHROMIUM) else "apt-get ran but chromium is not on PATH"


@pytest.fixture(scope="session")
def chromium() -> str:
    reason = _install_chromium()
    if reason:
        pytest.skip(f"no headless browser for the report page: {reason}")
    return str(shutil.which(CHROMIUM))


def _render(chromium: str, page: Path, profile: Path) -> tuple[str, str]:
    """(DOM after load, browser log) of ``page`` in headless Chromium."""
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--enable-logging=stderr",
            "--v=0",
            # let the load event (and our probe) run before the DOM is dumped
            "--virtual-time-budget=10000",
            "--dump-dom",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout, done.stderr


@pytest.mark.parametrize("post_scale", [1.0, 3.0], ids=["pass", "fail"])
def test_report_renders_in_chromium(chromium: str, tmp_path: Path, post_scale: float) -> None:
    run_dir = standard_run(tmp_path / "run", n=3000, post_scale=post_scale)
    result = build_report(ReportSettings(run_dir=run_dir))
    html = result.report_html.read_text()
    probed = tmp_path / "probed.html"
    probed.write_text(html.replace("<head>", "<head>" + _PROBE, 1))

    dom, log = _render(chromium, probed, tmp_path / "profile")

    found = re.search(r'<pre id="harness-probe">([^<]*)</pre>', dom)
    assert found, "the probe did not run: the page never finished loading"
    probe = dict(part.split("=", 1) for part in found.group(1).split(" ") if "=" in part)
    assert probe["errors"] == "0", found.group(1)
    assert int(probe["images"]) == 4
    assert probe["decoded"] == probe["images"], "a chart image did not decode"
    assert probe["verdict"] == str(result.verdict)
    # the page itself logs nothing; any console line is a problem
    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert not console, console
    assert f'id="verdict-text">{result.verdict}<' in dom
