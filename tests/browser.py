"""Headless Chromium through selenium for the browser tests (the review page, the report): the `browser`
fixture and helpers. It skips, saying why, where chromium, chromedriver or selenium is missing (CI installs
them: .ci/run). conftest.py blocks the network; `loopback_only` lets selenium reach its local chromedriver."""
from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import socket

import pytest


def _binary(names: tuple[str, ...], debian: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return debian if os.access(debian, os.X_OK) else None


def _is_loopback(host) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def loopback_only():
    """conftest blocks every TCP connection and host lookup; selenium talks to chromedriver over HTTP on this
    machine, so allow connections to loopback addresses (and nothing else) while the browser runs."""
    import _socket

    blocked_connect, blocked_lookup, blocked_create = socket.socket.connect, socket.getaddrinfo, \
        socket.create_connection

    def connect(self, address, *a, **k):
        if self.family in (socket.AF_INET, socket.AF_INET6) and _is_loopback(address[0]):
            return _socket.socket.connect(self, address, *a, **k)
        return blocked_connect(self, address, *a, **k)

    def getaddrinfo(host, *a, **k):
        if _is_loopback(host):
            return _socket.getaddrinfo(host, *a, **k)
        return blocked_lookup(host, *a, **k)

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **k):
        if not _is_loopback(address[0]):
            return blocked_create(address, timeout, source_address, **k)
        error: OSError | None = None
        for family, kind, proto, _, addr in _socket.getaddrinfo(address[0], address[1], 0, socket.SOCK_STREAM):
            sock = socket.socket(family, kind, proto)
            try:
                if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                    sock.settimeout(timeout)
                sock.connect(addr)
                return sock
            except OSError as exc:
                error = exc
                sock.close()
        raise error or OSError(f"cannot connect to {address}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        mp.setattr(socket, "create_connection", create_connection)
        for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
            mp.delenv(var, raising=False)
        mp.setenv("NO_PROXY", "localhost,127.0.0.1,::1")
        mp.setenv("SE_OFFLINE", "true")  # Selenium Manager: never download a driver or browser
        yield


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    chromium = _binary(("chromium", "chromium-browser"), "/usr/bin/chromium")
    driver_bin = _binary(("chromedriver",), "/usr/bin/chromedriver")
    if chromium is None or driver_bin is None:
        pytest.skip(f"no headless browser: chromium {'found' if chromium else 'missing'}, chromedriver "
                    f"{'found' if driver_bin else 'missing'} (Debian: apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("the selenium package is not installed (pip install -c constraints.txt -e '.[test]')")
    work = tmp_path_factory.mktemp("chromium")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--no-first-run",
                "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-default-apps", "--disable-extensions", "--window-size=1280,1000",
                f"--user-data-dir={work / 'profile'}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(work / "downloads"),
                                              "download.prompt_for_download": False})
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    with loopback_only():
        driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_bin,
                                                                   log_output=str(work / "chromedriver.log")))
        try:
            driver.set_page_load_timeout(60)
            yield driver
        finally:
            driver.quit()


def severe_logs(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]


def images_rendered(driver) -> list[list]:
    """[src start, complete, naturalWidth] of every <img> once the page has loaded."""
    return driver.execute_script(
        "return Array.from(document.images).map(i => [i.src.slice(0, 30), i.complete, i.naturalWidth]);")
