"""Which network interface each ring hop takes, as the operating system routes it.

A Thunderbolt bridge and a home LAN both on 192.168.1.x: the route to the next Mac may leave
over Wi-Fi (en0 on a MacBook), and every activation then crawls. `doctor` asks, on each rank,
which interface routes to the next rank's address (`ip route get ADDR` on Linux,
`route -n get ADDR` on macOS), what kind of port that is (`networksetup
-listallhardwareports` on macOS, /sys/class/net on Linux), and compares it with the
hostfile's `iface=` for that host. The parsers and the warnings are pure functions, tested
on Linux with sample outputs of both systems.
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

LOOPBACK = {"lo", "lo0"}
WIFI_PORTS = ("wi-fi", "airport", "wlan", "wireless")


@dataclass
class HopRoute:
    """How rank `src` reaches rank `dst` (the next one round the ring)."""

    src: int
    dst: int
    host: str                   # dst's host as the hostfile (or its hostname) names it
    address: str | None = None  # what `host` resolves to on src
    iface: str | None = None    # the interface the route leaves by
    port: str | None = None     # the kind of port: "Wi-Fi", "Thunderbolt Bridge", "Ethernet"
    wifi: bool = False
    local: bool = False         # same host (shared memory) or loopback: no network
    error: str | None = None

    @property
    def label(self) -> str:
        """For doctor's link table: `bridge0 (Thunderbolt Bridge)`, `same host`, `?`."""
        if self.local:
            return "same host"
        if self.iface is None:
            return "?"
        return f"{self.iface} ({self.port})" if self.port else self.iface


def parse_ip_route_get(text: str) -> str | None:
    """Linux `ip route get ADDR` -> the interface, e.g. `192.168.1.20 dev eth0 src ...`."""
    m = re.search(r"\bdev\s+(\S+)", text)
    return m.group(1) if m else None


def parse_route_get(text: str) -> str | None:
    """macOS `route -n get ADDR` -> the interface, from its `interface: bridge0` line."""
    m = re.search(r"^\s*interface:\s*(\S+)", text, re.MULTILINE)
    return m.group(1) if m else None


def parse_hardware_ports(text: str) -> dict[str, str]:
    """macOS `networksetup -listallhardwareports` -> {device: hardware port name}, e.g.
    {"en0": "Wi-Fi", "bridge0": "Thunderbolt Bridge"}."""
    ports, port = {}, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Hardware Port":
            port = value.strip()
        elif key.strip() == "Device" and port is not None:
            ports[value.strip()] = port
            port = None
    return ports


def is_wifi_port(port: str | None) -> bool:
    return port is not None and any(word in port.lower() for word in WIFI_PORTS)


def linux_port(iface: str, sysfs: str | Path = "/sys/class/net") -> str | None:
    """"Wi-Fi" for a wireless interface (it has a `wireless` or `phy80211` entry), else None."""
    folder = Path(sysfs) / iface
    return "Wi-Fi" if (folder / "wireless").exists() or (folder / "phy80211").exists() else None


def route_command(address: str, platform: str = sys.platform) -> list[str]:
    return ["route", "-n", "get", address] if platform == "darwin" else ["ip", "route", "get", address]


def resolve(host: str) -> str:
    """The address `host` names, IPv4 first (what the hostfile's names mostly mean)."""
    for family in (socket.AF_INET, socket.AF_UNSPEC):
        try:
            return socket.getaddrinfo(host, None, family, proto=socket.IPPROTO_TCP)[0][4][0]
        except socket.gaierror:
            if family == socket.AF_UNSPEC:
                raise
    raise OSError(f"no address for {host}")


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=True).stdout


def route_to(src: int, dst: int, host: str, same_host: bool) -> HopRoute:
    """Rank `src` asks its OS how it reaches `host` (rank `dst`). Never raises: what cannot
    be found out is the route's `error`."""
    route = HopRoute(src, dst, host, local=same_host)
    if same_host:
        return route
    try:
        route.address = resolve(host)
    except (OSError, IndexError) as e:
        route.error = f"cannot resolve {host}: {e}"
        return route
    try:
        out = _run(route_command(route.address))
    except (OSError, subprocess.SubprocessError) as e:
        route.error = f"{' '.join(route_command(route.address))} failed: {e}"
        return route
    mac = sys.platform == "darwin"
    route.iface = parse_route_get(out) if mac else parse_ip_route_get(out)
    if route.iface is None:
        route.error = f"no interface in the output of {' '.join(route_command(route.address))}"
    elif route.iface in LOOPBACK:
        route.local = True
    elif mac:
        try:
            route.port = parse_hardware_ports(
                _run(["networksetup", "-listallhardwareports"])).get(route.iface)
        except (OSError, subprocess.SubprocessError):
            pass  # the kind of port is a nicety; the interface is known
    else:
        route.port = linux_port(route.iface)
    route.wifi = is_wifi_port(route.port)
    return route


def route_warnings(routes: list[HopRoute], expected: dict[int, str | None] | None = None,
                   lines: dict[int, int] | None = None) -> list[str]:
    """Warnings about the hops' interfaces. `expected`: per rank, the hostfile's `iface=`
    for reaching its host (None: not declared); `lines`: its hostfile line, for the message."""
    expected, lines = expected or {}, lines or {}
    warnings = []
    networked = [r for r in routes if not r.local and r.iface]
    for r in routes:
        where = f"link {r.src} -> {r.dst}: the route to {r.host}" + (
            f" ({r.address})" if r.address and r.address != r.host else "")
        want = expected.get(r.dst)
        if r.error:
            warnings.append(f"link {r.src} -> {r.dst}: cannot tell which interface reaches "
                            f"{r.host} ({r.error})")
        elif r.local:
            continue
        elif want and r.iface != want:
            line = f" (line {lines[r.dst]})" if r.dst in lines else ""
            warnings.append(f"{where} goes over {r.label}, but the hostfile says iface={want}"
                            f"{line}: is another interface on the same subnet? give the link "
                            f"a subnet of its own")
        elif r.wifi:
            warnings.append(f"{where} goes over {r.label}: if Wi-Fi shares a subnet with the "
                            f"Thunderbolt bridge or Ethernet, give the fast link a subnet of "
                            f"its own (or turn Wi-Fi off on rank {r.src}'s host)")
    ifaces = {r.iface for r in networked}
    if len(ifaces) > 1 and not any(expected.get(r.dst) for r in networked):
        hops = ", ".join(f"{r.src} -> {r.dst} {r.iface}" for r in networked)
        warnings.append(f"the ring's hops leave by different interfaces ({hops}): if that is "
                        f"not meant, some host is reached over the wrong network; `iface=` in "
                        f"the hostfile says which one each host should be reached by")
    return warnings
